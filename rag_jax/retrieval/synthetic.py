"""Clustered synthetic embeddings for tests and benchmarks.

Random-normal vectors have no neighbourhood structure, so every approximate
index looks bad on them; real passage embeddings are clustered by topic. A
Gaussian mixture with a spread of cluster sizes is a cheap stand-in.
"""
from __future__ import annotations

import numpy as np


def clustered_embeddings(
    n: int, dim: int, num_clusters: int | None = None, noise: float = 0.35, seed: int = 0, chunk: int = 65536
) -> np.ndarray:
    """``[n, dim]`` float32 points from a Gaussian mixture (topic centres + per-point noise)."""
    rng = np.random.default_rng(seed)
    num_clusters = num_clusters or max(8, int(np.sqrt(n)))
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32) / np.sqrt(dim)
    # Zipf-like topic sizes: a few large topics, many small ones.
    weights = 1.0 / np.arange(1, num_clusters + 1) ** 0.7
    weights /= weights.sum()
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        which = rng.choice(num_clusters, size=m, p=weights)
        pts = centres[which] + rng.standard_normal((m, dim)).astype(np.float32) * (noise / np.sqrt(dim))
        out[start : start + m] = pts
    return out


def clustered_queries(docs: np.ndarray, q: int, noise: float = 0.35, seed: int = 1) -> np.ndarray:
    """Queries near random documents (as questions land near their answer passages)."""
    rng = np.random.default_rng(seed)
    base = docs[rng.integers(0, len(docs), size=q)]
    return (base + rng.standard_normal(base.shape).astype(np.float32) * (noise / np.sqrt(docs.shape[1]))).astype(np.float32)
