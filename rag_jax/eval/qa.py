"""Exact match and F1 with the SQuAD official answer normalization.

Normalization, in the official script's order: lowercase, drop ASCII
punctuation, drop the articles a/an/the as whole words, collapse whitespace.
Each prediction scores the max over its gold answers; corpus figures are
plain means over questions (in [0, 1]; multiply by 100 for paper tables).
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        # An empty side (e.g. gold "the") only matches another empty side.
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def max_over_gold(metric, prediction: str, golds: Sequence[str]) -> float:
    if isinstance(golds, str):
        raise TypeError("golds must be a list of answers, not one string")
    if not golds:
        raise ValueError("no gold answers to score against")
    return max(metric(prediction, g) for g in golds)


def qa_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus EM and F1 (means in [0, 1]) plus the count scored."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions vs {len(golds)} gold answer lists")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0, "count": 0}
    em = sum(max_over_gold(exact_match, p, g) for p, g in zip(predictions, golds))
    f = sum(max_over_gold(f1, p, g) for p, g in zip(predictions, golds))
    n = len(predictions)
    return {"exact_match": em / n, "f1": f / n, "count": n}
