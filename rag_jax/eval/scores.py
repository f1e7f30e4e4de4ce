"""The one entry point evaluation calls to score a task's predictions.

``score(kind, predictions, references, answer_match=...)`` returns a flat
dict of floats in [0, 1] (plus integer counts); the keys per task kind are
stable, so TensorBoard curves and ``metrics`` files keep their names:

=====================  ==========================  ============================================
kind                   references[i]               keys
=====================  ==========================  ============================================
qa                     gold answers (list)         exact_match, f1, count
qa, answer_match=      answer regexes (list)       exact_match, count
"regex"
abstractive            gold answers (list)         bleu_1, rouge_l, distinct_3, count
question_generation    gold questions (list)       q_bleu_1, bleu_1, distinct_3, count
classification         gold label (str, or a       label_accuracy, label_accuracy_2way,
                       one-element list)           count, count_2way
=====================  ==========================  ============================================

``exact_match`` under ``answer_match="regex"`` is CuratedTrec's regex-match
EM (``rag_jax.eval.qa``). ``distinct_3`` is the RAG paper's Table 5 ratio of
distinct to total tri-grams over all predictions. ``kilt_scores`` (KILT's
provenance and KILT-* scores) is re-exported here for the same callers.
Definitions and conventions: ``generation``, ``qbleu``, ``classification``,
``kilt`` and ``qa`` in this package.
"""
from __future__ import annotations

from typing import Sequence

from rag_jax.eval.classification import label_accuracy
from rag_jax.eval.generation import bleu_1, distinct_ngrams, rouge_l
from rag_jax.eval.kilt import kilt_scores
from rag_jax.eval.qa import qa_metrics, regex_qa_metrics
from rag_jax.eval.qbleu import q_bleu_1

__all__ = ["ANSWER_MATCHES", "TASK_KINDS", "kilt_scores", "score"]

TASK_KINDS = ("qa", "abstractive", "question_generation", "classification")
ANSWER_MATCHES = ("string", "regex")
DISTINCT_N = 3  # the paper's Table 5 counts tri-grams


def _labels(references: Sequence[str | Sequence[str]]) -> list[str]:
    out = []
    for i, ref in enumerate(references):
        if isinstance(ref, str):
            out.append(ref)
        elif len(ref) == 1 and isinstance(ref[0], str):
            out.append(ref[0])
        else:
            raise ValueError(f"example {i}: a classification example needs exactly one gold label, got {ref!r}")
    return out


def score(kind: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]], *,
          answer_match: str = "string") -> dict[str, float]:
    """The task kind's scores of ``predictions`` against ``references`` (table in the module docstring)."""
    if kind not in TASK_KINDS:
        raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
    if answer_match not in ANSWER_MATCHES:
        raise ValueError(f"answer match must be one of {ANSWER_MATCHES}, got {answer_match!r}")
    if answer_match == "regex" and kind != "qa":
        raise ValueError(f"answer_match='regex' applies to task kind 'qa' only, not {kind!r}")
    if kind == "qa":
        metric = regex_qa_metrics if answer_match == "regex" else qa_metrics
        return metric(predictions, references)
    if kind == "classification":
        return label_accuracy(predictions, _labels(references))
    refs = references
    out: dict[str, float] = {}
    if kind == "question_generation":
        out["q_bleu_1"] = q_bleu_1(predictions, refs)
    out["bleu_1"] = bleu_1(predictions, refs)
    if kind == "abstractive":
        out["rouge_l"] = rouge_l(predictions, refs)
    out[f"distinct_{DISTINCT_N}"] = distinct_ngrams(predictions, DISTINCT_N)
    out["count"] = len(predictions)
    return out
