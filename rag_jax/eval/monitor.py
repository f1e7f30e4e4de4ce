"""Retrieval-collapse monitor, which HF RAG lacks.

Collapse means the query encoder learns to return the same few documents for
every input (the generator then ignores them). Two cheap signals per batch:
* distinct fraction: distinct document ids / (B * K); it falls to
  K / (B * K) = 1/B when every question gets the same K documents;
* prior entropy: entropy of softmax(doc_scores) over the K retrieved docs,
  averaged over questions; near 0 when one document takes all the mass
  (the paper's failure mode on FEVER-like tasks), log K when flat.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def distinct_fraction(doc_ids: Any, valid: Any | None = None) -> float:
    """Distinct ids over the retrieved slots of the batch ([B, K] ints, host side)."""
    ids = np.asarray(doc_ids)
    if ids.ndim != 2:
        raise ValueError(f"doc_ids must be [B, K], got shape {ids.shape}")
    if valid is not None:
        ids = ids[np.asarray(valid, bool)]
    if ids.size == 0:
        return 0.0
    return float(np.unique(ids).size / ids.size)


def prior_entropy(doc_scores: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mean over questions of the entropy (nats) of softmax(doc_scores); jit-safe."""
    logp = jax.nn.log_softmax(doc_scores.astype(jnp.float32), axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    if valid is None:
        return jnp.mean(ent)
    w = valid.astype(jnp.float32)
    return jnp.sum(ent * w) / jnp.maximum(jnp.sum(w), 1.0)


def collapse_stats(doc_ids: Any, doc_scores: Any, valid: Any | None = None) -> dict[str, float]:
    """Both signals for one batch, plus the entropy as a fraction of log K."""
    scores = jnp.asarray(doc_scores)
    k = scores.shape[-1]
    ent = float(prior_entropy(scores, None if valid is None else jnp.asarray(valid)))
    return {
        "distinct_doc_fraction": distinct_fraction(doc_ids, valid),
        "doc_prior_entropy": ent,
        "doc_prior_entropy_frac": ent / float(np.log(k)) if k > 1 else 0.0,
    }


class CollapseMonitor:
    """Averages ``collapse_stats`` over batches (e.g. one eval pass)."""

    KEYS = ("distinct_doc_fraction", "doc_prior_entropy", "doc_prior_entropy_frac")

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._n = 0

    def add(self, stats: dict[str, float]) -> None:
        """One batch's ``collapse_stats`` (computed wherever its batch was decoded)."""
        for k, v in stats.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1

    def result(self) -> dict[str, float]:
        return {k: v / self._n for k, v in self._sums.items()} if self._n else {}
