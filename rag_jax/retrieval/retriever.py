"""What RAG calls between its two jitted functions: question vectors (and, for
BM25, the questions' text) in, documents out.

Three kinds of retrieval behind one ``retrieve(question_vectors, k,
questions=None)``:

- dense (a ScaNN/exact index): vectors in; ``scores`` are ``q . d`` and
  ``doc_embeds`` the passages' stored vectors;
- BM25 (a ``--index-type bm25`` index): question strings in, vectors unused
  (``needs_vectors`` is False); ``scores`` are the BM25 scores and
  ``doc_embeds`` is None: there is nothing to differentiate, so training
  carries the scores themselves (the paper's frozen-BM25 ablation);
- hybrid (a dense index plus ``bm25=`` a BM25 index of the same corpus):
  both rankings fused (:mod:`rag_jax.retrieval.fusion`) into the order of
  the documents; ``scores`` are still ``q . d`` of the dense index's vectors
  and ``doc_embeds`` those vectors, so the training step's recomputed
  ``doc_scores`` give the question encoder a gradient as with DPR alone.

:class:`Retriever` owns one (index, corpus) pair and can :meth:`swap` it for
another by path while the model keeps its parameters: the paper's
2016 -> 2018 Wikipedia experiment is ``retriever.swap("wiki2018_index")``.
The new pair is fully loaded and checked before it replaces the old one in a
single attribute assignment, so a concurrent ``retrieve`` sees either the old
or the new index, never a mix.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rag_jax.retrieval.corpus import Corpus
from rag_jax.retrieval.fusion import Fusion, fuse
from rag_jax.retrieval.index import IndexMismatchError, LoadedIndex, load_index


@dataclass
class Retrieved:
    """Top-k documents per question, best first; arrays are ``[Q, k]`` (``doc_embeds`` ``[Q, k, D]``,
    None from a BM25 index). ``fused`` ``[Q, k]``: a hybrid retriever's fused scores (the order)."""

    rows: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    doc_embeds: np.ndarray | None
    titles: list[list[str]]
    texts: list[list[str]]
    fused: np.ndarray | None = None


def _shape(index: LoadedIndex) -> str:
    return "a BM25 index" if index.dim is None else f"dimension {index.dim}"


class Retriever:
    """Index + corpus behind ``retrieve(question_vectors, k, questions=None)``, replaceable with :meth:`swap`.

    ``bm25`` (a BM25 index directory of the same corpus, next to a dense
    ``index``) makes it hybrid, fused by ``fusion`` (default reciprocal-rank).
    """

    def __init__(
        self,
        index: str | os.PathLike | LoadedIndex,
        corpus: str | os.PathLike | Corpus | None = None,
        encoder_fingerprint: str | None = None,
        bm25: str | os.PathLike | LoadedIndex | None = None,
        fusion: Fusion | None = None,
        **load_kw: Any,
    ) -> None:
        self._lock = threading.Lock()
        self._load_kw = load_kw
        self.fusion = fusion or Fusion()
        main = self._open(index, corpus, encoder_fingerprint)
        self._state = (main, self._open_sparse(bm25, main))

    def _open_sparse(self, bm25: Any, main: LoadedIndex) -> LoadedIndex | None:
        """The BM25 half of a hybrid retriever, checked against the dense half's corpus."""
        if bm25 is None:
            return None
        if main.kind == "bm25":
            raise ValueError(f"{main.path} is a BM25 index: a hybrid retriever needs a dense index next to bm25")
        sparse = bm25 if isinstance(bm25, LoadedIndex) else load_index(bm25, corpus=main.corpus)
        if sparse.kind != "bm25":
            raise ValueError(f"{sparse.path}: a {sparse.kind} index, not a BM25 one (build-index --index-type bm25)")
        if sparse.manifest.get("corpus_checksum") != main.manifest.get("corpus_checksum"):
            raise IndexMismatchError(f"{sparse.path}: BM25 index of another corpus than {main.path}'s "
                                     "(rows would not match)")
        return sparse

    def _open(self, index: Any, corpus: Any, encoder_fingerprint: str | None) -> LoadedIndex:
        if isinstance(index, LoadedIndex):
            loaded = index
            if corpus is not None:
                raise ValueError("pass the corpus to load_index when giving a LoadedIndex")
        else:
            loaded = load_index(index, corpus=corpus, encoder_fingerprint=encoder_fingerprint, **self._load_kw)
        if loaded.corpus is None:
            raise FileNotFoundError(f"{loaded.path}: no corpus/ inside the index and none given")
        return loaded

    @property
    def index(self) -> LoadedIndex:
        return self._state[0]

    @property
    def bm25(self) -> LoadedIndex | None:
        """The BM25 index of a hybrid retriever (None otherwise)."""
        return self._state[1]

    @property
    def path(self) -> Path:
        return self._state[0].path

    @property
    def needs_vectors(self) -> bool:
        """False for a BM25 index alone: the question encoder need not run."""
        return self._state[0].kind != "bm25"

    @property
    def needs_text(self) -> bool:
        """True when ``retrieve`` needs the ``questions`` strings (BM25 or hybrid)."""
        return self._state[0].kind == "bm25" or self._state[1] is not None

    def swap(
        self,
        index: str | os.PathLike | LoadedIndex,
        corpus: str | os.PathLike | Corpus | None = None,
        encoder_fingerprint: str | None = None,
        require_same_dim: bool = True,
        bm25: str | os.PathLike | LoadedIndex | None = None,
    ) -> LoadedIndex:
        """Replaces the index and corpus; returns the old index. Model parameters are untouched.

        A hybrid retriever needs ``bm25`` too when the new index has another
        corpus (its BM25 index must be of the same corpus)."""
        new = self._open(index, corpus, encoder_fingerprint)
        with self._lock:
            old, old_sparse = self._state
            sparse = self._open_sparse(bm25 if bm25 is not None else old_sparse, new) if (
                bm25 is not None or old_sparse is not None) else None
            if require_same_dim and new.dim != old.dim:
                raise IndexMismatchError(
                    f"{new.path}: {_shape(new)} differs from the current index's {_shape(old)} "
                    "(the question encoder would not fit)"
                )
            self._state = (new, sparse)
        return old

    def retrieve(self, question_vectors: np.ndarray | None, k: int, exact_scores: bool = True,
                 questions: Sequence[str] | None = None) -> Retrieved:
        """Top-k passages; with ``exact_scores`` the scores are recomputed from the stored float32
        embeddings (``doc_scores = q . d`` as HF RAG), since ScaNN's are from quantized vectors.

        ``questions`` (their text) are needed by a BM25 or hybrid retriever
        (:attr:`needs_text`); a BM25 one ignores ``question_vectors``."""
        state, sparse = self._state  # one read: a concurrent swap cannot mix two indexes
        if (state.kind == "bm25" or sparse is not None) and questions is None:
            raise ValueError(f"{state.path}: BM25 retrieval needs the questions' text (retrieve(..., questions=))")
        if state.kind == "bm25":
            rows, scores = state.search(list(questions), k)
            return self._documents(state, rows, scores, None)
        q = np.asarray(question_vectors, np.float32)
        if questions is not None and len(questions) != len(q):
            raise ValueError(f"{len(questions)} questions but {len(q)} question vectors")
        if sparse is not None:
            depth = min(max(k, self.fusion.depth), state.count)
            dense = state.search(q, depth)
            if self.fusion.method == "score":
                dense = (dense[0], np.einsum("qd,qkd->qk", q, state.embeddings.get(dense[0])))  # exact q . d
            rows, fused = fuse(self.fusion, dense, sparse.search(list(questions), depth), k)
            embeds = state.embeddings.get(rows)
            # The fused order is kept; the scores are q . d, what the training step differentiates.
            return self._documents(state, rows, np.einsum("qd,qkd->qk", q, embeds), embeds, fused)
        rows, scores = state.search(q, k)
        embeds = state.embeddings.get(rows)
        if exact_scores:
            scores = np.einsum("qd,qkd->qk", q, embeds)
            order = np.argsort(-scores, axis=1, kind="stable")
            rows = np.take_along_axis(rows, order, 1)
            scores = np.take_along_axis(scores, order, 1)
            embeds = np.take_along_axis(embeds, order[..., None], 1)
        return self._documents(state, rows, scores, embeds)

    @staticmethod
    def _documents(state: LoadedIndex, rows: np.ndarray, scores: np.ndarray, embeds: np.ndarray | None,
                   fused: np.ndarray | None = None) -> Retrieved:
        corpus = state.corpus
        ids = corpus.rows_to_ids(rows)
        titles = [[corpus.title(r) for r in row] for row in rows]
        texts = [[corpus.text(r) for r in row] for row in rows]
        return Retrieved(rows, ids, np.asarray(scores, np.float32), embeds, titles, texts, fused)
