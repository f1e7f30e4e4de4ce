"""What RAG calls between its two jitted functions: question vectors in, documents out.

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
from typing import Any

import numpy as np

from rag_jax.retrieval.corpus import Corpus
from rag_jax.retrieval.index import IndexMismatchError, LoadedIndex, load_index


@dataclass
class Retrieved:
    """Top-k documents per question, best first; arrays are ``[Q, k]`` (``doc_embeds`` ``[Q, k, D]``)."""

    rows: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    doc_embeds: np.ndarray
    titles: list[list[str]]
    texts: list[list[str]]


class Retriever:
    """Index + corpus behind ``retrieve(question_vectors, k)``, replaceable with :meth:`swap`."""

    def __init__(
        self,
        index: str | os.PathLike | LoadedIndex,
        corpus: str | os.PathLike | Corpus | None = None,
        encoder_fingerprint: str | None = None,
        **load_kw: Any,
    ) -> None:
        self._lock = threading.Lock()
        self._load_kw = load_kw
        self._state = self._open(index, corpus, encoder_fingerprint)

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
        return self._state

    @property
    def path(self) -> Path:
        return self._state.path

    def swap(
        self,
        index: str | os.PathLike | LoadedIndex,
        corpus: str | os.PathLike | Corpus | None = None,
        encoder_fingerprint: str | None = None,
        require_same_dim: bool = True,
    ) -> LoadedIndex:
        """Replaces the index and corpus; returns the old one. Model parameters are untouched."""
        new = self._open(index, corpus, encoder_fingerprint)
        with self._lock:
            old = self._state
            if require_same_dim and new.dim != old.dim:
                raise IndexMismatchError(
                    f"{new.path}: dimension {new.dim} differs from the current index's {old.dim} "
                    "(the question encoder would not fit)"
                )
            self._state = new
        return old

    def retrieve(self, question_vectors: np.ndarray, k: int, exact_scores: bool = True) -> Retrieved:
        """Top-k passages; with ``exact_scores`` the scores are recomputed from the stored float32
        embeddings (``doc_scores = q . d`` as HF RAG), since ScaNN's are from quantized vectors."""
        state = self._state  # one read: a concurrent swap cannot mix two indexes
        q = np.asarray(question_vectors, np.float32)
        rows, scores = state.search(q, k)
        embeds = state.embeddings.get(rows)
        if exact_scores:
            scores = np.einsum("qd,qkd->qk", q, embeds)
            order = np.argsort(-scores, axis=1, kind="stable")
            rows = np.take_along_axis(rows, order, 1)
            scores = np.take_along_axis(scores, order, 1)
            embeds = np.take_along_axis(embeds, order[..., None], 1)
        corpus = state.corpus
        ids = corpus.rows_to_ids(rows)
        titles = [[corpus.title(r) for r in row] for row in rows]
        texts = [[corpus.text(r) for r in row] for row in rows]
        return Retrieved(rows, ids, scores.astype(np.float32), embeds, titles, texts)
