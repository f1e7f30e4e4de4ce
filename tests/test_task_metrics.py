"""The paper's other tasks' metrics against hand-computed values: BLEU-1,
ROUGE-L, distinct-n, Q-BLEU-1, regex EM, label accuracy, KILT scores, and the
``score`` dispatch."""
import math

import numpy as np
import pytest

from rag_jax.eval import classification as C
from rag_jax.eval import generation as G
from rag_jax.eval import kilt as K
from rag_jax.eval import qa as Q
from rag_jax.eval import qbleu as QB
from rag_jax.eval import retrieval as R
from rag_jax.eval.scores import score


# ---------------------------------------------------------------- BLEU-1

def test_bleu_1_corpus_pooling_no_brevity_penalty():
    # ex 1: hyp "the cat sat on the mat" vs "the cat is on the mat":
    #   clipped unigrams the 2, cat 1, sat 0, on 1, mat 1 = 5 of 6; ref len 6.
    # ex 2: hyp "dogs bark loudly" (3) vs refs of length 2 and 4: both 1 away, the
    #   shorter (2) is the effective length (if it were 4, r=10 > c=9 and BP < 1);
    #   "loudly" is in the 2nd ref only: clipping takes the max over refs, 3 of 3.
    # corpus: p1 = (5+3)/(6+3) = 8/9, c = 9 >= r = 6+2 = 8 -> BP 1 -> 8/9.
    preds = ["The cat sat on the mat", "dogs bark loudly"]
    refs = [["the cat is on the mat"], ["dogs bark", "the dogs bark loudly"]]
    assert G.bleu_1(preds, refs) == pytest.approx(8 / 9)


def test_bleu_1_brevity_penalty():
    # "the cat" vs "the cat sat on the mat": p1 = 2/2, c = 2 < r = 6,
    # BP = exp(1 - 6/2) = e^-2 -> BLEU-1 = e^-2 = 0.1353.
    assert G.bleu_1(["The Cat"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(-2))


def test_bleu_1_agrees_with_nltk_on_random_multi_reference_corpora():
    # nltk's corpus_bleu with unigram weights is an independent BLEU-1 (closest
    # reference length, max-over-references clipping); lowercase tokens without
    # punctuation make both tokenizations plain whitespace splits.
    import random

    from nltk.translate.bleu_score import corpus_bleu

    rng, vocab = random.Random(1), "a b c d e f g h".split()
    for _ in range(50):
        n = rng.randint(1, 5)
        hyps = [" ".join(rng.choices(vocab, k=rng.randint(1, 7))) for _ in range(n)]
        refs = [[" ".join(rng.choices(vocab, k=rng.randint(1, 7))) for _ in range(rng.randint(1, 3))]
                for _ in range(n)]
        want = corpus_bleu([[r.split() for r in rs] for rs in refs], [h.split() for h in hyps], weights=(1.0,))
        assert G.bleu_1(hyps, refs) == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------- ROUGE-L

def test_rouge_l_lcs_by_hand():
    # ex 1: "the cat sat on the mat" vs "the cat was on a mat": LCS the-cat-on-mat = 4,
    #   P = 4/6, R = 4/6, F = 2/3; vs "cat mat": LCS 2, P = 2/6, R = 1, F = 0.5; max 2/3.
    # ex 2: "a b c" vs "a x c y d": LCS a-c = 2, P = 2/3, R = 2/5, F = (8/15)/(16/15) = 0.5.
    # mean (2/3 + 1/2) / 2 = 7/12.
    preds = ["the cat sat on the mat", "a b c"]
    refs = [["the cat was on a mat", "cat mat"], ["a x c y d"]]
    assert G.rouge_l_per_example(preds, refs) == pytest.approx([2 / 3, 0.5])
    assert G.rouge_l(preds, refs) == pytest.approx(7 / 12)


def test_rouge_l_does_not_stem():
    # With a Porter stemmer "cats running" / "cat run" would be LCS 2 (F = 1).
    assert G.rouge_l(["cats running"], [["cat run"]]) == 0.0


# ---------------------------------------------------------------- distinct-n

def test_distinct_trigrams_pooled_over_the_corpus():
    # tri-grams: (the cat sat) (cat sat on) (sat on the) (on the mat) | (the cat sat) (cat sat down)
    # 6 in all, 5 distinct -> 5/6 (a per-generation mean would be 1.0).
    assert G.distinct_ngrams(["the cat sat on the mat", "The cat sat down"], 3) == pytest.approx(5 / 6)
    # "a b a b a": aba bab aba -> 2 distinct of 3; "hi" holds no tri-gram.
    assert G.distinct_ngrams(["a b a b a", "hi"], 3) == pytest.approx(2 / 3)
    assert G.distinct_ngrams(["a b a b a"], 1) == pytest.approx(2 / 5)
    assert G.distinct_ngrams(["hi"], 3) == 0.0


# ---------------------------------------------------------------- Q-BLEU-1

def test_q_bleu_1_authors_example():
    # The authors' repository test pair. Kinds (hyp | ref):
    #   named entities (capitalised): "Is" | "Is" -> F 1
    #   question words: none | none -> 0
    #   content words: great question | good question -> P = R = 1/2, F 1/2
    #   function words: is this a | is this a -> F 1
    # Answerability = .6*1 + .2*0 + .1*.5 + .1*1 = 0.75; BLEU-1 = 4/5 (no BP)
    # Q-BLEU-1 = .7*.75 + .3*.8 = 0.765, the value their test asserts.
    hyp, ref = "Is this a great question?", "Is this a good question?"
    assert QB.answerability(hyp, ref) == pytest.approx(0.75)
    assert QB.q_bleu_1([hyp], [[ref]]) == pytest.approx(0.765)


def test_q_bleu_1_kinds_and_brevity_penalty():
    hyp, ref = "Which river flows through Paris?", "Which French river flows through Paris?"
    assert QB.question_parts(hyp) == {"question_words": ["which", "river"], "named_entities": ["paris"],
                                      "content_words": ["flows"], "function_words": ["through"]}
    assert QB.question_parts(ref) == {"question_words": ["which", "french"], "named_entities": ["french", "paris"],
                                      "content_words": ["river", "flows"], "function_words": ["through"]}
    # question words: 1 match of 2 each way -> F 1/2
    # entities [paris] vs [french paris]: P = 1/1 * BP exp(1 - 2/1) = e^-1, R = 1/2 -> F = 2PR/(P+R)
    # content [flows] vs [river flows]: the same F; function words: F 1
    p, r = math.exp(-1), 0.5
    f_short = 2 * p * r / (p + r)
    answerable = 0.6 * f_short + 0.2 * 0.5 + 0.1 * f_short + 0.1 * 1.0
    # BLEU-1 of the whole question: 5 of 5 unigrams match, BP exp(1 - 6/5)
    fluency = math.exp(-0.2)
    expected = 0.7 * answerable + 0.3 * fluency
    assert expected == pytest.approx(0.593322, abs=1e-6)
    assert QB.q_bleu_1([hyp], [[ref]]) == pytest.approx(expected)
    # several gold questions: the best one counts
    assert QB.q_bleu_1([hyp], [[ref, hyp]]) == pytest.approx(0.7 * (0.6 + 0.2 + 0.1 + 0.1) + 0.3)


def test_q_bleu_named_entity_stand_in_is_pluggable():
    parts = QB.question_parts("Which river flows through Paris?", named_entities=lambda words: [])
    assert parts["named_entities"] == [] and parts["content_words"] == ["flows", "paris"]
    with pytest.raises(ValueError, match="sum to 1"):
        QB.q_bleu_1(["a"], [["a"]], weights={**QB.DEFAULT_WEIGHTS, "function_words": 0.5})


# ---------------------------------------------------------------- regex EM

def test_regex_match_follows_drqa():
    assert Q.regex_match("Paris, France", "paris") == 1.0       # case-insensitive, may stop early
    assert Q.regex_match("in Paris", "Paris") == 0.0            # re.match: anchored at the start
    assert Q.regex_match("  Paris", "Paris") == 1.0             # outer whitespace stripped
    assert Q.regex_match("Paris\nFrance", "Paris$") == 1.0      # MULTILINE: $ ends a line
    assert Q.regex_match("1000 miles", r"1,?000") == 1.0
    assert Q.regex_match("anything", "(unclosed") == 0.0        # a broken pattern matches nothing
    # max over patterns, mean over questions: 1 and 0 -> 0.5
    m = Q.regex_qa_metrics(["Paris, France", "in Paris"], [["London", "Paris"], ["Paris"]])
    assert m == {"exact_match": 0.5, "count": 2}


def test_regex_passage_hits_search_anywhere():
    hits = R.answer_hits([["He lived in Paris.", "Lyon"]], [["paris|rome"]], match="regex")
    np.testing.assert_array_equal(hits, [[True, False]])
    with pytest.raises(ValueError, match="answer match"):
        R.answer_hits([["x"]], [["x"]], match="fuzzy")


# ---------------------------------------------------------------- label accuracy

def test_label_accuracy_3way_and_2way():
    gold = ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO", "REFUTES", "NOT ENOUGH INFO"]
    pred = [" supports", "REFUTES", "NOT ENOUGH INFO", "NOT ENOUGH INFO", "SUPPORTS"]
    # right: 1 1 1 0 0 -> 3/5; without the NEI-gold examples (2 and 4): 1 1 0 -> 2/3
    assert C.label_accuracy(pred, gold) == {"label_accuracy": 0.6, "label_accuracy_2way": pytest.approx(2 / 3),
                                            "count": 5, "count_2way": 3}


# ---------------------------------------------------------------- KILT

def test_kilt_r_precision_and_recall_at_k():
    # gold sets A = {p1}, B = {p2, p3}; retrieved p2 p9 p1 p3.
    # R-precision: A (R=1): p2 not in A -> 0; B (R=2): p2 in, p9 not -> 1/2; max 1/2.
    # set ranking: p2 opens B [B?]; p9 [B?, miss]; p1 completes A [B?, miss, A];
    #   p3 completes B, whose place moves here [miss, A, B]
    #   -> recall@1 = 0/2, @2 = 1/2, @3 = 2/2.
    got, prov = ["p2", "p9", "p1", "p3"], [["p1"], ["p2", "p3"]]
    assert K.r_precision(got, prov) == 0.5
    assert [K.recall_at_k(got, prov, k) for k in (1, 2, 3)] == [0.0, 0.5, 1.0]
    # passages of one page count once: pages 12 12 7 -> 12 7; ids compare as strings
    assert K.r_precision([12, "12", 7], [["12", "7"]]) == 1.0


def test_kilt_em_counts_only_with_full_r_precision():
    preds = ["Paris", "the Eiffel Tower", "Rome"]
    answers = [["paris"], ["Eiffel Tower"], ["Rome"]]
    retrieved = [[12, 7, 12, 3], ["p2", "p9", "p1", "p3"], ["a"]]
    provenance = [[[12]], [["p1"], ["p2", "p3"]], [["a"], ["b", "c"]]]
    m = K.kilt_scores(preds, answers, retrieved, provenance, ks=(1, 2))
    # R-precision: 1 (12 first), 1/2 (above), 1 (set {a} has R=1) -> 2.5/3
    assert m["r_precision"] == pytest.approx(2.5 / 3)
    # recall@1: 1, 0, 1/2 (of 2 sets only {a} completes); recall@2: 1, 1/2, 1/2
    assert m["recall@1"] == pytest.approx(1.5 / 3) and m["recall@2"] == pytest.approx(2 / 3)
    # EM (normalized) 1 1 1; strict accuracy 0 0 1 ("Paris" != "paris")
    assert m["exact_match"] == 1.0 and m["accuracy"] == pytest.approx(1 / 3)
    # KILT variants keep examples 1 and 3 only (R-precision 1)
    assert m["kilt_em"] == pytest.approx(2 / 3) and m["kilt_accuracy"] == pytest.approx(1 / 3)
    assert m["kilt_f1"] == pytest.approx(2 / 3)
    # ROUGE-L "the eiffel tower" vs "eiffel tower": LCS 2, P 2/3, R 1 -> F 0.8
    assert m["rouge_l"] == pytest.approx(2.8 / 3) and m["kilt_rouge_l"] == pytest.approx(2 / 3)
    assert m["count"] == 3
    # an empty prediction scores 0 downstream even with its page retrieved
    empty = K.kilt_scores([" "], [["x"]], [["a"]], [[["a"]]])
    assert empty["r_precision"] == 1.0 and empty["kilt_em"] == 0.0 and empty["exact_match"] == 0.0


# ---------------------------------------------------------------- dispatch

def test_score_dispatch_keys():
    assert set(score("qa", ["a"], [["a"]])) == {"exact_match", "f1", "count"}
    assert score("qa", ["in Paris"], [["Paris"]], answer_match="regex") == {"exact_match": 0.0, "count": 1}
    assert set(score("abstractive", ["a b c"], [["a b c"]])) == {"bleu_1", "rouge_l", "distinct_3", "count"}
    qg = score("question_generation", ["Is this a great question?"], [["Is this a good question?"]])
    assert set(qg) == {"q_bleu_1", "bleu_1", "distinct_3", "count"} and qg["q_bleu_1"] == pytest.approx(0.765)
    cls = score("classification", ["SUPPORTS", "REFUTES"], [["SUPPORTS"], "SUPPORTS"])
    assert cls["label_accuracy"] == 0.5


@pytest.mark.parametrize("call,message", [
    (lambda: score("summarize", ["a"], [["a"]]), "task kind"),
    (lambda: score("abstractive", ["a"], [["a"]], answer_match="regex"), "'qa' only"),
    (lambda: score("classification", ["a"], [["a", "b"]]), "exactly one gold label"),
    (lambda: score("abstractive", ["a", "b"], [["a"]]), "2 predictions vs 1"),
    (lambda: score("question_generation", ["a"], ["a"]), "not one string"),
    (lambda: score("abstractive", ["a"], [[]]), "no reference"),
])
def test_score_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
