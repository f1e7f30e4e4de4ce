"""Scores for free-text generation: corpus BLEU-1, ROUGE-L and distinct-n.

* BLEU-1 is sacrebleu's corpus BLEU with the n-gram order cut to 1, so it is
  BP * p1: clipped unigram matches pooled over the corpus, over hypothesis
  unigrams, times the corpus brevity penalty exp(1 - r/c) when the total
  hypothesis length c is below the total effective reference length r. Each
  example's effective reference is its closest-length reference (ties go to
  the shorter), clipping uses the max count over an example's references.
  That is the MS-MARCO official script's Bleu_1 (pycocoevalcap corpus BLEU
  with "closest" reference lengths on lowercased tokens); we lowercase too,
  and tokenize with sacrebleu's 13a instead of spaCy (punctuation split off
  either way).
* ROUGE-L is rouge-score's LCS F-measure (beta = 1), max over an example's
  references, mean over examples. No stemming: neither the MS-MARCO script
  nor KILT's (the ``rouge`` package) stems, and the RAG paper says nothing
  that would. MS-MARCO's script combines max precision and max recall with
  beta = 1.2 instead, so its figures run a little different from these.
* distinct-n is distinct n-grams over total n-grams, both pooled over every
  generation of the corpus: the RAG paper's Table 5 ("ratio of distinct to
  total tri-grams"). Pooling matters: a single short answer rarely repeats a
  tri-gram, so a per-generation mean sits near 1, while the paper's figures
  (70-90%) measure repetition across generations. Li et al. (2016) divide by
  the number of generated tokens instead; that variant is not used here.

All scores are in [0, 1] (papers print them x100).
"""
from __future__ import annotations

import functools
from typing import Sequence

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

_TOKENIZE_13A = Tokenizer13a()


@functools.cache
def _rouge_scorer():
    # rouge-score imports nltk (seconds): loaded when ROUGE is first asked for.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def check_references(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raises ValueError unless every prediction has a non-empty list of reference strings."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(f"example {i}: references must be a list of strings, not one string")
        if not refs:
            raise ValueError(f"example {i}: no reference to score against")


def bleu_1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-1 (sacrebleu, lowercased, 13a tokens) in [0, 1]; any number of references per example."""
    check_references(predictions, references)
    if not predictions:
        return 0.0
    # sacrebleu takes reference *streams* (stream j = every example's j-th
    # reference); examples with fewer references pad with None, which it skips.
    width = max(len(r) for r in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    metric = BLEU(max_ngram_order=1, lowercase=True, tokenize="13a")
    return metric.corpus_score(list(predictions), streams).score / 100.0


def rouge_l_per_example(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """rouge-score's ROUGE-L F (no stemming) of each prediction, max over its references."""
    check_references(predictions, references)
    scorer = _rouge_scorer()
    return [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of ``rouge_l_per_example``."""
    scores = rouge_l_per_example(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


def distinct_ngrams(generations: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams, pooled over all generations (lowercased 13a tokens).

    0.0 when the generations hold no n-gram at all."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in generations:
        toks = _TOKENIZE_13A(text.lower()).split()
        grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0
