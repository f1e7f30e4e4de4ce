"""Padding to length buckets: the batch's longest row rounded up to one of a
few fixed lengths, instead of the configured maximum.

HF pads every RAG context to ``max_combined_length`` (300) although a DPR
passage with its title and question is about half that long. Tokenizing with
the maximum (so truncation stays HF's) and then cutting the columns that no
row of the batch uses changes no token and no mask entry: the step computes
the same loss on fewer positions. Rounding the cut up to a bucket keeps the
set of compiled shapes small and bounded.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

PADDINGS = ("max_length", "bucket")

# The groups of a training batch that share a padded length (its last axis):
# their keys and the key whose nonzero entries are tokens (None: labels, where
# tokens are the entries that are not the pad id).
GROUPS = {
    "question": (("question_input_ids", "question_attention_mask", "question_token_type_ids"),
                 "question_attention_mask"),
    "context": (("context_input_ids", "context_attention_mask"), "context_attention_mask"),
    "target": (("labels",), None),
}


def bucket_set(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The compiled lengths for inputs of at most ``max_length`` tokens: the
    buckets below it, ascending, and ``max_length`` itself (so a row that
    fills the maximum, truncated, still has a bucket)."""
    return tuple(sorted({int(b) for b in buckets if 0 < int(b) < max_length})) + (int(max_length),)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest of ``buckets`` (ascending, from :func:`bucket_set`) holding ``length`` tokens."""
    for b in buckets:
        if length <= b:
            return int(b)
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def used_length(mask: np.ndarray) -> int:
    """Columns of ``mask`` (``[..., L]``, nonzero = token) up to the last one
    any row uses; at least 1 so that no array becomes empty."""
    cols = np.flatnonzero(np.asarray(mask).reshape(-1, mask.shape[-1]).any(axis=0))
    return int(cols[-1]) + 1 if cols.size else 1


def trim_to_buckets(
    batch: Mapping[str, np.ndarray],
    buckets: Mapping[str, Sequence[int]],
    pad_token_id: int,
    agree: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """``batch`` (a training batch padded on the right to the maximum lengths)
    with each group of :data:`GROUPS` named in ``buckets`` cut to its
    bucketed length (``buckets[group]`` from :func:`bucket_set`).

    ``agree`` maps this process's used lengths (one per group, in the order
    of ``buckets``) to their maximum over all processes
    (``host_arrays.process_max``): every process must feed the same global
    shape, so the bucket is chosen from the global batch, not from this
    process's rows.
    """
    # A group absent from this batch (no question tokens with BM25) is not cut.
    groups = [g for g in buckets if (GROUPS[g][1] or "labels") in batch]
    used = []
    for g in groups:
        _, token_key = GROUPS[g]
        mask = batch[token_key] if token_key else np.asarray(batch["labels"]) != pad_token_id
        used.append(used_length(mask))
    used_arr = np.asarray(used, np.int64)
    if agree is not None:
        used_arr = np.asarray(agree(used_arr), np.int64)
    out = dict(batch)
    for g, n in zip(groups, used_arr):
        length = bucket_for(int(n), buckets[g])
        for k in GROUPS[g][0]:
            if k in out:
                out[k] = np.ascontiguousarray(out[k][..., :length])
    return out
