"""Exact match and F1 with the SQuAD official answer normalization, and the
regular-expression exact match of CuratedTrec.

Normalization, in the official script's order: lowercase, drop ASCII
punctuation, drop the articles a/an/the as whole words, collapse whitespace.
Each prediction scores the max over its gold answers; corpus figures are
plain means over questions (in [0, 1]; multiply by 100 for paper tables).

CuratedTrec gives its answers as regular expressions. A prediction matches a
pattern as in DrQA's ``regex_match_score`` (the EM that DPR and RAG report on
CuratedTrec follows DrQA): flags IGNORECASE | UNICODE | MULTILINE, and
``re.match``, i.e. the pattern must match at the start of the prediction but
may stop before its end ("Paris" matches "Paris, France"; it does not match
"in Paris"). No SQuAD normalization is applied (a pattern spells out its own
variants); both sides are NFD-normalized as DPR does before any regex, and
the prediction's outer whitespace is stripped (a decoded generation may
start with a space). A pattern that does not compile matches nothing, as in
DrQA and DPR.
"""
from __future__ import annotations

import collections
import functools
import re
import string
import unicodedata
from typing import Sequence

from rag_jax.data.regex_targets import compile_pattern

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


@functools.lru_cache(maxsize=4096)
def answer_pattern(pattern: str) -> re.Pattern | None:
    """A CuratedTrec answer pattern compiled as the reader compiles it for
    training targets (NFD; DrQA's/DPR's flags), or None when it does not compile."""
    try:
        return compile_pattern(pattern)
    except re.error:
        return None


def regex_match(prediction: str, pattern: str) -> float:
    """1.0 when ``pattern`` matches at the start of the prediction (DrQA's rule, see the module docstring)."""
    compiled = answer_pattern(pattern)
    if compiled is None:
        return 0.0
    return float(compiled.match(unicodedata.normalize("NFD", prediction.strip())) is not None)


def regex_qa_metrics(predictions: Sequence[str], patterns: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus regex-match EM (in [0, 1], max over each question's patterns) plus the count scored."""
    if len(predictions) != len(patterns):
        raise ValueError(f"{len(predictions)} predictions vs {len(patterns)} answer-pattern lists")
    if not predictions:
        return {"exact_match": 0.0, "count": 0}
    em = sum(max_over_gold(regex_match, p, g) for p, g in zip(predictions, patterns))
    return {"exact_match": em / len(predictions), "count": len(predictions)}
