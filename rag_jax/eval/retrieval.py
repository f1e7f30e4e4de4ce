"""Answer recall@k of retrieval, DPR-style ``has_answer``, and gold-passage
recall@k where a QA file names the passages that state the answer.

A passage counts as a hit when the token sequence of a normalized gold
answer occurs contiguously in the normalized passage tokens (whole tokens,
so "art" does not match inside "start"). Normalization is the SQuAD one plus
Unicode NFD (as DPR) so accented and composed forms agree.

With ``match="regex"`` (CuratedTrec, whose answers are regular expressions)
a passage is a hit when a pattern occurs anywhere in it: DPR's
``regex_match`` (``search``, not ``match``, on the NFD text; flags
IGNORECASE | UNICODE | MULTILINE). Answer EM anchors at the start instead
(see ``rag_jax.eval.qa``): a passage contains an answer, a prediction is one.
"""
from __future__ import annotations

import unicodedata
from typing import Sequence

import numpy as np

from rag_jax.eval.qa import answer_pattern, normalize_answer

MATCH_TYPES = ("string", "regex")


def _tokens(text: str) -> list[str]:
    return normalize_answer(unicodedata.normalize("NFD", text)).split()


def _contains(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    if n == 0:
        return False
    first = needle[0]
    for i in range(len(hay) - n + 1):
        if hay[i] == first and hay[i : i + n] == needle:
            return True
    return False


def has_answer(passage: str, answers: Sequence[str]) -> bool:
    """True when any gold answer's normalized tokens appear in the passage."""
    hay = _tokens(passage)
    return any(_contains(hay, _tokens(a)) for a in answers)


def _regex_hit(passage: str, patterns: Sequence[str]) -> bool:
    text = unicodedata.normalize("NFD", passage)
    compiled = (answer_pattern(p) for p in patterns)
    return any(c is not None and c.search(text) is not None for c in compiled)


def answer_hits(passages: Sequence[Sequence[str]], answers: Sequence[Sequence[str]],
                match: str = "string") -> np.ndarray:
    """bool [B, K]: passage k of question b contains a gold answer of b
    (``match="regex"``: the answers are patterns, searched for in the passage)."""
    if match not in MATCH_TYPES:
        raise ValueError(f"answer match must be one of {MATCH_TYPES}, got {match!r}")
    if len(passages) != len(answers):
        raise ValueError(f"{len(passages)} passage lists vs {len(answers)} answer lists")
    widths = {len(p) for p in passages}
    if len(widths) > 1:
        raise ValueError(f"every question needs the same number of passages, got {sorted(widths)}")
    k = widths.pop() if widths else 0
    out = np.zeros((len(passages), k), bool)
    for b, (ps, golds) in enumerate(zip(passages, answers)):
        if match == "regex":
            out[b] = [_regex_hit(p, golds) for p in ps]
            continue
        gold_toks = [t for t in (_tokens(a) for a in golds) if t]
        for j, p in enumerate(ps):
            hay = _tokens(p)
            out[b, j] = any(_contains(hay, g) for g in gold_toks)
    return out


def gold_hits(doc_ids: Sequence[Sequence[object]], positive_ids: Sequence[Sequence[object]]) -> np.ndarray:
    """bool [B, K]: passage k of question b is one of b's gold passages.

    Ids compare as DPR ids (``"wiki:12"`` and ``12`` are the same passage)."""
    from rag_jax.retrieval.embeddings import normalize_dpr_id

    if len(doc_ids) != len(positive_ids):
        raise ValueError(f"{len(doc_ids)} retrieved id lists vs {len(positive_ids)} positive id lists")
    k = len(doc_ids[0]) if len(doc_ids) else 0
    out = np.zeros((len(doc_ids), k), bool)
    for b, (ids, gold) in enumerate(zip(doc_ids, positive_ids)):
        want = {normalize_dpr_id(g) for g in gold}
        out[b] = [normalize_dpr_id(i) in want for i in ids]
    return out


def top_k_accuracy(hits: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of questions with a hit among the first k passages, per k."""
    hits = np.asarray(hits, bool)
    if hits.ndim != 2:
        raise ValueError(f"hits must be [B, K], got shape {hits.shape}")
    out = {}
    for k in ks:
        if not 1 <= k <= hits.shape[1]:
            raise ValueError(f"k={k} outside [1, {hits.shape[1]}]")
        out[int(k)] = float(hits[:, :k].any(axis=1).mean()) if hits.shape[0] else 0.0
    return out
