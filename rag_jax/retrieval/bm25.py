"""BM25 over a corpus store, with ``bm25s`` (a sparse-matrix BM25): the paper's
sparse baseline and the sparse half of hybrid retrieval.

Tokenization (``bm25s.tokenization.Tokenizer``, the same for passages and
questions): lower-cased; words are runs of two or more word characters
(bm25s's default pattern ``(?u)\\b\\w\\w+\\b``, scikit-learn's); bm25s's
English stopword list is removed; each remaining word is Porter-stemmed
(NLTK's implementation of Porter's original algorithm). This is the
analysis of Lucene's English analyzer, which produced DPR's BM25 figures
(Lucene through Pyserini) that the RAG paper's BM25 ablation follows:
stemming lets "founded" match "founder" and "rivers" match "river", which
matters for questions paraphrasing a passage. The stemmer runs once per
distinct word (bm25s caches word -> stem), so its cost grows with the
vocabulary, not the corpus. A passage is indexed as ``title + " " + text``
(DPR's BM25 index holds both).

Scoring: bm25s's ``method="lucene"``, Lucene's BM25:
``idf = ln(1 + (N - df + 0.5) / (df + 0.5))`` and, per query word present,
``idf * tf / (tf + k1 * (1 - b + b * |d| / avgdl))``, summed over the
question's words (a repeated question word counts each time). It differs
from Robertson's Okapi BM25 (``rank_bm25.BM25Okapi``) in an idf that is
never negative and in leaving out the constant factor ``(k1 + 1)`` (ranking
unchanged). Defaults ``k1=0.9, b=0.4`` are DPR's Lucene settings.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rag_jax.retrieval.corpus import Corpus, _progress

TOKEN_PATTERN = r"(?u)\b\w\w+\b"
METHODS = ("lucene", "robertson", "atire")
STEMMERS = ("porter", "none")
STOPWORDS = ("english", "none")
_BATCH = 8192  # passages read from the store per step (bounded memory besides the token ids)


@dataclass(frozen=True)
class Bm25Params:
    """What a BM25 index is built with; all of it is recorded in the index manifest."""

    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stemmer: str = "porter"
    stopwords: str = "english"

    def __post_init__(self) -> None:
        if not self.k1 > 0:
            raise ValueError(f"BM25 k1 must be > 0, got {self.k1}")
        if not 0 <= self.b <= 1:
            raise ValueError(f"BM25 b must be in [0, 1], got {self.b}")
        for name, allowed in (("method", METHODS), ("stemmer", STEMMERS), ("stopwords", STOPWORDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"BM25 {name} must be one of {allowed}, got {getattr(self, name)!r}")


@functools.lru_cache(maxsize=None)
def _porter() -> Any:
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer(mode=PorterStemmer.ORIGINAL_ALGORITHM).stem


def make_tokenizer(params: Bm25Params) -> Any:
    """A fresh bm25s tokenizer for ``params`` (empty vocabulary)."""
    import bm25s.tokenization

    return bm25s.tokenization.Tokenizer(
        lower=True, splitter=TOKEN_PATTERN, stopwords="en" if params.stopwords == "english" else None,
        stemmer=_porter() if params.stemmer == "porter" else None,
    )


def passage_text(title: str, text: str) -> str:
    return f"{title} {text}" if title else text


class Bm25Index:
    """A bm25s index and its tokenizer; ``search(questions, k) -> (rows [Q, k], scores [Q, k])``.

    Rows are corpus rows, best first; equal scores keep the lower row first
    (deterministic). A question none of whose words is in the index scores 0
    against every passage, so its rows are the first ``k`` of the corpus.
    """

    kind = "bm25"

    def __init__(self, model: Any, tokenizer: Any, params: Bm25Params, count: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.params = params
        self.count = count

    @classmethod
    def build(cls, corpus: Corpus, params: Bm25Params = Bm25Params(), progress: bool = True) -> "Bm25Index":
        tokenizer, ids = tokenize_corpus(corpus, params, progress)
        return cls.from_ids(tokenizer, ids, params, progress)

    @classmethod
    def from_ids(cls, tokenizer: Any, ids: list[list[int]], params: Bm25Params, progress: bool = True) -> "Bm25Index":
        """The bm25s index of passages already tokenized by ``tokenizer`` (:func:`tokenize_corpus`)."""
        import bm25s

        model = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
        model.index((ids, tokenizer.get_vocab_dict()), show_progress=progress)
        return cls(model, tokenizer, params, len(ids))

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save(str(path), show_progress=False)
        self.tokenizer.save_vocab(str(path))
        (path / "rag_jax_bm25.json").write_text(json.dumps(asdict(self.params), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike, params: Bm25Params, count: int, mmap: bool = True) -> "Bm25Index":
        import bm25s

        path = Path(path)
        saved = json.loads((path / "rag_jax_bm25.json").read_text())
        if saved != asdict(params):
            raise ValueError(f"{path}: BM25 parameters {saved} disagree with the index manifest's {asdict(params)}")
        model = bm25s.BM25.load(str(path), mmap=mmap, show_progress=False, verbosity=0)
        tok = make_tokenizer(params)
        tok.load_vocab(str(path))
        if int(model.scores["num_docs"]) != count:
            raise ValueError(f"{path}: BM25 index has {model.scores['num_docs']} passages, manifest says {count}")
        return cls(model, tok, params, count)

    def question_ids(self, questions: Sequence[str]) -> list[list[int]]:
        """Token ids of the questions; words absent from the index are dropped."""
        # update_vocab=False: nothing is added (a word whose stem is known maps to it).
        return self.tokenizer.tokenize(list(questions), update_vocab=False, show_progress=False,
                                       return_as="ids", allow_empty=False)

    def scores(self, questions: Sequence[str]) -> np.ndarray:
        """``[Q, N]`` BM25 scores of every passage (float32)."""
        return np.stack([self._scores(ids) for ids in self.question_ids(questions)]) if len(questions) else \
            np.zeros((0, self.count), np.float32)

    def _scores(self, ids: list[int]) -> np.ndarray:
        if not ids:
            return np.zeros(self.count, np.float32)
        return np.asarray(self.model.get_scores_from_ids(ids), np.float32)

    def search(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(questions, np.ndarray) and questions.dtype != object:
            raise TypeError("a BM25 index searches question strings, not vectors")
        k = int(k)
        if not 1 <= k <= self.count:
            raise ValueError(f"k={k} must be between 1 and the {self.count} passages in the index")
        rows = np.zeros((len(questions), k), np.int64)
        out = np.zeros((len(questions), k), np.float32)
        for i, ids in enumerate(self.question_ids(questions)):
            rows[i], out[i] = top_k(self._scores(ids), k)
        return rows, out


def tokenize_corpus(corpus: Corpus, params: Bm25Params, progress: bool = True) -> tuple[Any, list[list[int]]]:
    """(the tokenizer, every passage's token ids in corpus order), its vocabulary made from the corpus."""
    tok = make_tokenizer(params)
    ids: list[list[int]] = []
    bar = _progress(progress, "bm25 tokenize", total=len(corpus), unit="psg")
    for start in range(0, len(corpus), _BATCH):
        titles, texts = corpus.batch(start, start + _BATCH)
        # allow_empty: a passage without a word keeps a row (the "" token), so rows stay corpus rows.
        ids.extend(tok.tokenize([passage_text(t, x) for t, x in zip(titles, texts)], update_vocab=True,
                                show_progress=False, return_as="ids", allow_empty=True))
        if bar is not None:
            bar.update(len(titles))
    if bar is not None:
        bar.close()
    return tok, ids


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of a ``[N]`` score vector, best first, ties to the lower row."""
    n = len(scores)
    if k < n:
        cut = np.partition(scores, n - k)[n - k]  # the k-th best value
        cand = np.flatnonzero(scores >= cut)  # every row tied at the cut is a candidate: ascending rows
    else:
        cand = np.arange(n)
    order = np.argsort(-scores[cand], kind="stable")[:k]
    rows = cand[order]
    return rows.astype(np.int64), scores[rows].astype(np.float32)
