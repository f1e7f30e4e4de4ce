"""Label accuracy for classification tasks generated as text (FEVER).

A prediction is right when it equals the gold label after stripping outer
whitespace and case-folding (the label strings come from a config mapping,
so "SUPPORTS" and "Supports" are the same class).

FEVER is scored two ways in the RAG paper:
* 3-way: every claim, labels SUPPORTS / REFUTES / NOT ENOUGH INFO;
* 2-way: only the claims whose gold label is not NOT ENOUGH INFO; a
  prediction of NOT ENOUGH INFO on one of them counts as wrong. The paper's
  2-way figure comes from a model trained on the 2-way data (so it never
  predicts NEI); on a 2-way dataset both figures are the same number.
"""
from __future__ import annotations

from typing import Sequence

NOT_ENOUGH_INFO = "NOT ENOUGH INFO"  # FEVER's spelling of its third class


def _norm(label: str) -> str:
    return label.strip().casefold()


def label_accuracy(predictions: Sequence[str], labels: Sequence[str],
                   nei_label: str = NOT_ENOUGH_INFO) -> dict[str, float]:
    """``label_accuracy`` over every example and ``label_accuracy_2way`` over
    the examples whose gold label is not ``nei_label``, with both counts.
    Accuracies are in [0, 1]; 0.0 where nothing is counted."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions vs {len(labels)} gold labels")
    for i, y in enumerate(labels):
        if not isinstance(y, str):
            raise ValueError(f"example {i}: a gold label must be a string, got {type(y).__name__}")
    right = [_norm(p) == _norm(y) for p, y in zip(predictions, labels)]
    kept = [r for r, y in zip(right, labels) if _norm(y) != _norm(nei_label)]
    return {
        "label_accuracy": sum(right) / len(right) if right else 0.0,
        "label_accuracy_2way": sum(kept) / len(kept) if kept else 0.0,
        "count": len(right),
        "count_2way": len(kept),
    }
