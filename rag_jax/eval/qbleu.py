"""Q-BLEU-1 (Nema & Khapra 2018, "Towards a Better Metric for Evaluating
Question Generation Systems"), the RAG paper's Jeopardy metric.

Q-BLEU = delta * Answerability + (1 - delta) * BLEU-1, per question, averaged
over questions. Answerability compares four kinds of words of the generated
and the gold question:

* question words: what, which, why, who, whom, whose, where, when, how, plus
  the word after "what" / "which" (it names the answer type);
* named entities;
* relevant content words: the words left after removing question words,
  named entities and function words;
* function words: a fixed stop-word list (``FUNCTION_WORDS``, the script's).

For each kind, precision is the sentence BLEU-1 of the generated words
against the gold ones (clipped unigram precision times the brevity penalty)
and recall the same with the sides swapped; the kind scores their harmonic
mean, and Answerability is the weighted sum of the four. This is how the
authors' released script (github.com/PrekshaNema25/Answerability-Metric)
computes it, brevity penalty included; a kind that is empty on either side
scores 0 (the script's 1e-15/1e-9 smoothing gives ~1e-6).

Defaults are the weights of that repository's README example and tests:
named entities 0.6, question words 0.2, content words 0.1, function words
0.1 (= 1 - the other three), delta 0.7. The RAG paper does not state the
weights it used for Jeopardy. Jeopardy clues seldom hold a question word, so
that kind is usually empty on both sides and a perfect generation scores
0.7 * 0.8 + 0.3 = 0.86 with these weights.

What differs from the released script, and why:
* Named entities: the paper uses an NER tagger; the released script (and
  this default) takes the capitalised words, skipping a leading question
  word, so a capitalised sentence-initial word counts too. No NER model is
  available offline here; ``named_entities`` takes any callable
  (words -> entity words) to plug a real tagger in.
* Tokenization: the script runs the Stanford PTB tokenizer (Java) and drops
  punctuation tokens; here text is lowercased and split into runs of word
  characters, punctuation dropped ("don't" gives "don" "t", PTB "do" "n't").
  Words are classified after stripping punctuation glued to them ("it," is
  the function word "it"), where the script would keep "it," as a content
  word.
* Several gold questions: the script takes one; here the example scores the
  max over its references.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Callable, Mapping, Sequence

from rag_jax.eval.generation import check_references

QUESTION_WORDS = frozenset({"what", "which", "why", "who", "whom", "whose", "where", "when", "how"})
_TYPE_NAMING = frozenset({"what", "which"})  # the next word names the answer type

# The authors' script's stop-word list: NLTK's English list of the time
# without its question words (which form their own kind), 119 words.
FUNCTION_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can did do does doing don down during each few for from further had has have having he her here
hers herself him himself his i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own s same she should so some such t than that the
their theirs them themselves then there these they this those through to too under until up very was we
were while will with you your yours yourself yourselves
""".split())

DEFAULT_WEIGHTS = {"named_entities": 0.6, "question_words": 0.2, "content_words": 0.1, "function_words": 0.1}
DEFAULT_DELTA = 0.7

_EDGE_PUNCT = re.compile(r"^\W+|\W+$")
_WORDS = re.compile(r"[^\W_]+")

NamedEntities = Callable[[Sequence[str]], Sequence[str]]


def capitalised_words(words: Sequence[str]) -> list[str]:
    """The named-entity stand-in of the authors' script: capitalised words,
    except a first word that is a question word."""
    start = 1 if words and words[0].lower() in QUESTION_WORDS else 0
    return [w for w in words[start:] if w[:1].isupper()]


def _tokens(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def question_parts(question: str, named_entities: NamedEntities = capitalised_words) -> dict[str, list[str]]:
    """The question's words of each kind (lowercased word tokens), keyed as ``DEFAULT_WEIGHTS``."""
    words = [w for w in (_EDGE_PUNCT.sub("", raw) for raw in question.split()) if w]
    qwords: list[str] = []
    for i, w in enumerate(words):
        if w.lower() in QUESTION_WORDS:
            qwords.append(w)
            if w.lower() in _TYPE_NAMING and i + 1 < len(words):
                qwords.append(words[i + 1])
    entities = list(named_entities(words))
    # As in the script, a word removed as a question word / entity is removed everywhere.
    taken = set(qwords) | set(entities)
    content = [w for w in words if w not in taken and w.lower() not in FUNCTION_WORDS]
    function = [w for w in words if w.lower() in FUNCTION_WORDS]
    parts = {"question_words": qwords, "named_entities": entities, "content_words": content,
             "function_words": function}
    return {kind: _tokens(" ".join(ws)) for kind, ws in parts.items()}


def sentence_bleu_1(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """Clipped unigram precision of ``hyp`` against ``ref`` times the brevity
    penalty exp(1 - |ref|/|hyp|) when ``hyp`` is shorter; 0 when either is empty."""
    if not hyp or not ref:
        return 0.0
    matches = sum((collections.Counter(hyp) & collections.Counter(ref)).values())
    bp = 1.0 if len(hyp) >= len(ref) else math.exp(1.0 - len(ref) / len(hyp))
    return matches / len(hyp) * bp


def _kind_f(hyp: Sequence[str], ref: Sequence[str]) -> float:
    p, r = sentence_bleu_1(hyp, ref), sentence_bleu_1(ref, hyp)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def answerability(hypothesis: str, reference: str, *, weights: Mapping[str, float] = DEFAULT_WEIGHTS,
                  named_entities: NamedEntities = capitalised_words) -> float:
    """Weighted sum over the four kinds of words of the harmonic mean of their BLEU-1 both ways."""
    h = question_parts(hypothesis, named_entities)
    r = question_parts(reference, named_entities)
    return sum(w * _kind_f(h[kind], r[kind]) for kind, w in weights.items())


def q_bleu_1_per_example(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                         weights: Mapping[str, float] = DEFAULT_WEIGHTS, delta: float = DEFAULT_DELTA,
                         named_entities: NamedEntities = capitalised_words) -> list[float]:
    """Q-BLEU-1 of each generated question, max over its gold questions."""
    check_references(predictions, references)
    if set(weights) != set(DEFAULT_WEIGHTS):
        raise ValueError(f"Q-BLEU weights must name exactly {sorted(DEFAULT_WEIGHTS)}, got {sorted(weights)}")
    if not math.isclose(sum(weights.values()), 1.0) or min(weights.values()) < 0:
        raise ValueError(f"Q-BLEU weights must be >= 0 and sum to 1, got {dict(weights)}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"Q-BLEU delta must be in [0, 1], got {delta}")

    def one(hyp: str, ref: str) -> float:
        fluency = sentence_bleu_1(_tokens(hyp), _tokens(ref))
        answerable = answerability(hyp, ref, weights=weights, named_entities=named_entities)
        return delta * answerable + (1.0 - delta) * fluency

    return [max(one(p, r) for r in refs) for p, refs in zip(predictions, references)]


def q_bleu_1(predictions: Sequence[str], references: Sequence[Sequence[str]], **kwargs) -> float:
    """Mean over questions of ``q_bleu_1_per_example`` (same keyword arguments), in [0, 1]."""
    scores = q_bleu_1_per_example(predictions, references, **kwargs)
    return sum(scores) / len(scores) if scores else 0.0
