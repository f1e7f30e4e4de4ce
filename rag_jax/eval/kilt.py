"""KILT's scores: page-level provenance retrieval (R-precision, recall@k) and
the KILT variants of the downstream scores, which count an answer only when
its provenance was retrieved.

Semantics follow KILT's ``eval_retrieval.py`` / ``eval_downstream.py``:

* Pages are compared as ``str(id).strip()`` (KILT ranks by ``wikipedia_id``
  by default; titles work the same way if both sides use them). Retrieved
  pages are de-duplicated keeping the first occurrence, so several passages
  of one page take one rank.
* An example's gold provenance is a list of evidence sets, one per gold
  output (each output's provenance pages, de-duplicated).
* R-precision of an evidence set of R pages: how many of the first R
  retrieved pages are in it, over R. The example scores the max over its
  evidence sets.
* recall@k: every evidence set is one item of the ranking, placed where its
  last page is retrieved; a page in no set takes one place, and a page that
  only starts a set holds a provisional place that moves to where the set's
  next page appears. recall@k = sets completed within the first k places,
  over the number of distinct evidence sets. (Evidence sets with no page are
  left out here; KILT counts an output carrying ``"provenance": []`` as a
  set that can never be completed.)
* Downstream: ``accuracy`` is the stripped prediction being one of the
  stripped gold answers verbatim; ``exact_match`` / ``f1`` use SQuAD
  normalization, ROUGE-L is rouge-score's (KILT uses the ``rouge`` package,
  whose figures can differ slightly); all max over gold answers. An empty
  prediction scores 0 everywhere.
* KILT-accuracy / KILT-EM / KILT-F1 / KILT-ROUGE-L: the same per-example
  score when the example's R-precision is exactly 1, else 0.

Every figure is a mean over examples in [0, 1].
"""
from __future__ import annotations

from typing import Hashable, Sequence

from rag_jax.eval.generation import rouge_l_per_example
from rag_jax.eval.qa import exact_match, f1, max_over_gold

PageId = Hashable
_DONE, _MISS = "complete", "miss"


def _pages(ids: Sequence[PageId]) -> list[str]:
    """Ids as KILT compares them, first occurrence kept."""
    out: list[str] = []
    for i in ids:
        key = str(i).strip()
        if key not in out:
            out.append(key)
    return out


def _evidence_sets(provenance: Sequence[Sequence[PageId]]) -> list[set[str]]:
    sets: list[set[str]] = []
    for pages in provenance:
        s = set(_pages(pages))
        if s and s not in sets:
            sets.append(s)
    return sets


def r_precision(retrieved: Sequence[PageId], provenance: Sequence[Sequence[PageId]]) -> float:
    """Max over the evidence sets of (gold pages among the first R retrieved) / R; 0 without provenance."""
    got = _pages(retrieved)
    best = 0.0
    for gold in _evidence_sets(provenance):
        r = len(gold)
        best = max(best, sum(p in gold for p in got[:r]) / r)
    return best


def recall_at_k(retrieved: Sequence[PageId], provenance: Sequence[Sequence[PageId]], k: int) -> float:
    """Evidence sets completed within the first k places of KILT's set ranking, over the number of sets."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    remaining = _evidence_sets(provenance)
    if not remaining:
        return 0.0
    n_sets = len(remaining)
    # One entry per place: _DONE (a set completed here), _MISS (a page in no
    # set) or ("partial", i) (set i started, not yet complete). Tagged values,
    # not bools and ints, because True == 1 and False == 0 in list lookups.
    places: list[object] = []
    for page in _pages(retrieved):
        in_any = False
        for i, rest in enumerate(remaining):
            if page not in rest:
                continue
            in_any = True
            if ("partial", i) in places:
                places.remove(("partial", i))  # the set's place moves to its newest page
            rest.discard(page)
            places.append(_DONE if not rest else ("partial", i))
        if not in_any:
            places.append(_MISS)
    return places[:k].count(_DONE) / n_sets


def kilt_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                retrieved: Sequence[Sequence[PageId]], provenance: Sequence[Sequence[Sequence[PageId]]],
                *, ks: Sequence[int] = (5,)) -> dict[str, float]:
    """KILT's retrieval, downstream and KILT scores for one dataset.

    ``retrieved[b]``: page ids of question b's retrieved passages, best first.
    ``provenance[b]``: its gold evidence sets, one list of page ids per gold output.
    ``answers[b]``: its gold answers (blank ones are ignored, as KILT does).
    Keys: ``r_precision``, ``recall@k`` per k, ``accuracy``, ``exact_match``, ``f1``,
    ``rouge_l``, ``kilt_accuracy``, ``kilt_em``, ``kilt_f1``, ``kilt_rouge_l``, ``count``.
    """
    n = len(predictions)
    if not (len(answers) == len(retrieved) == len(provenance) == n):
        raise ValueError(f"{n} predictions vs {len(answers)} answer lists, {len(retrieved)} retrieved lists, "
                         f"{len(provenance)} provenance lists")
    sums = dict.fromkeys(["r_precision", *(f"recall@{k}" for k in ks), "accuracy", "exact_match", "f1", "rouge_l",
                          "kilt_accuracy", "kilt_em", "kilt_f1", "kilt_rouge_l"], 0.0)
    for b, (pred, golds, got, prov) in enumerate(zip(predictions, answers, retrieved, provenance)):
        rprec = r_precision(got, prov)
        sums["r_precision"] += rprec
        for k in ks:
            sums[f"recall@{k}"] += recall_at_k(got, prov, k)
        golds = [g.strip() for g in golds if g and g.strip()]
        if not golds:
            raise ValueError(f"example {b}: no gold answer to score against")
        guess = pred.strip()
        if not guess:
            continue
        scores = {
            "accuracy": float(guess in golds),
            "exact_match": max_over_gold(exact_match, guess, golds),
            "f1": max_over_gold(f1, guess, golds),
            "rouge_l": rouge_l_per_example([guess], [golds])[0],
        }
        for key, v in scores.items():
            sums[key] += v
            if rprec == 1.0:
                sums["kilt_" + {"exact_match": "em"}.get(key, key)] += v
    out: dict[str, float] = {key: v / n if n else 0.0 for key, v in sums.items()}
    out["count"] = n
    return out
