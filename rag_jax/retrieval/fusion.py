"""Hybrid retrieval: fusing a dense (DPR) and a sparse (BM25) ranking into one.

Two rules, over each ranker's top ``depth`` candidates per question:

- ``rrf``, reciprocal-rank fusion (Cormack, Clarke & Buettcher 2009):
  ``fused(d) = sum over rankers of 1 / (c + rank(d))``, ranks from 1, a
  document absent from a ranker's list adding nothing; ``c = 60`` by default
  (the paper's constant). It needs no score calibration, which is why it is
  the default: BM25 scores (unbounded, per-question scale) and inner products
  do not live on one scale.
- ``score``: each ranker's candidate scores are min-max normalised to [0, 1]
  per question (all equal -> all 1), then
  ``fused(d) = w * dense(d) + (1 - w) * sparse(d)``, a document absent from
  a list counting 0 for it. ``w`` (default 0.5) weighs the dense side.

Ties in the fused score keep the order in which the documents first appear
reading the dense list, then the sparse list (deterministic).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

FUSIONS = ("rrf", "score")


@dataclass(frozen=True)
class Fusion:
    """How a hybrid retriever fuses its two rankings (see the module docstring)."""

    method: str = "rrf"
    rrf_k: float = 60.0
    weight: float = 0.5  # "score": the dense ranking's weight
    depth: int = 100  # candidates taken from each ranker per question

    def __post_init__(self) -> None:
        if self.method not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.method!r}")
        if not self.rrf_k > 0:
            raise ValueError(f"rrf_k must be > 0, got {self.rrf_k}")
        if not 0 <= self.weight <= 1:
            raise ValueError(f"fusion weight must be in [0, 1], got {self.weight}")
        if self.depth < 1:
            raise ValueError(f"fusion depth must be >= 1, got {self.depth}")


def _candidates(lists: Sequence[np.ndarray]) -> list[int]:
    """The rows of ``lists`` in first-appearance order, each once."""
    seen: dict[int, None] = {}
    for rows in lists:
        for r in rows.tolist():
            seen.setdefault(int(r), None)
    return list(seen)


def _top(cands: list[int], fused: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-fused, kind="stable")[:k]  # stable: ties keep first-appearance order
    return np.asarray(cands, np.int64)[order], fused[order]


def rrf_one(rankings: Sequence[np.ndarray], k: int, c: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal-rank fusion of one question's rankings (rows, best first) -> top ``k`` (rows, fused)."""
    cands = _candidates(rankings)
    pos = {r: i for i, r in enumerate(cands)}
    fused = np.zeros(len(cands), np.float64)
    for rows in rankings:
        for rank, r in enumerate(rows.tolist(), 1):
            fused[pos[int(r)]] += 1.0 / (c + rank)
    return _top(cands, fused, k)


def _minmax(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    lo, hi = s.min(), s.max()
    return np.ones_like(s) if hi == lo else (s - lo) / (hi - lo)


def score_one(dense: tuple[np.ndarray, np.ndarray], sparse: tuple[np.ndarray, np.ndarray], k: int,
              weight: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Normalised score fusion of one question's (rows, scores) pairs -> top ``k`` (rows, fused)."""
    cands = _candidates([dense[0], sparse[0]])
    pos = {r: i for i, r in enumerate(cands)}
    fused = np.zeros(len(cands), np.float64)
    for (rows, scores), w in ((dense, weight), (sparse, 1.0 - weight)):
        for r, s in zip(rows.tolist(), _minmax(scores)):
            fused[pos[int(r)]] += w * s
    return _top(cands, fused, k)


def fuse(fusion: Fusion, dense: tuple[np.ndarray, np.ndarray], sparse: tuple[np.ndarray, np.ndarray],
         k: int) -> tuple[np.ndarray, np.ndarray]:
    """``[Q, n]`` dense and sparse (rows, scores), best first -> fused ``[Q, k]`` (rows, fused scores)."""
    q = len(dense[0])
    rows = np.zeros((q, k), np.int64)
    out = np.zeros((q, k), np.float32)
    for i in range(q):
        if fusion.method == "rrf":
            r, s = rrf_one([dense[0][i], sparse[0][i]], k, fusion.rrf_k)
        else:
            r, s = score_one((dense[0][i], dense[1][i]), (sparse[0][i], sparse[1][i]), k, fusion.weight)
        if len(r) < k:
            raise ValueError(f"only {len(r)} distinct candidates for k={k}; raise the fusion depth")
        rows[i], out[i] = r, s
    return rows, out
