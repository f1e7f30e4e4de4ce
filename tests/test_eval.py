"""EM/F1 with SQuAD normalization, answer and gold-passage recall@k, the collapse monitor."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax.eval import monitor as M
from rag_jax.eval import qa as Q
from rag_jax.eval import retrieval as R


@pytest.mark.parametrize("raw,norm", [
    ("The  Quick, brown-fox!", "quick brownfox"),     # case, punctuation, article, spaces
    ("An apple a day", "apple day"),
    ("theater and anthem", "theater and anthem"),    # articles only as whole words
    ("A.B.C.", "abc"),                               # "a" glued by punctuation is no article
    ("  \t Hello\nWorld ", "hello world"),
    ("the", ""),
    ("THE END", "end"),
    ("rock 'n' roll", "rock n roll"),
    ("Ångström", "ångström"),                        # non-ASCII letters kept
    ("¿Qué?", "¿qué"),                               # only ASCII punctuation is removed (as SQuAD)
    ("$1,000.50", "100050"),
])
def test_squad_normalization(raw, norm):
    assert Q.normalize_answer(raw) == norm


def test_em_f1_hand_computed():
    assert Q.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert Q.exact_match("Eiffel", "eiffel tower") == 0.0
    # pred tokens {cat, sat, on, mat}, gold {cat, on, mat}: P=3/4, R=1
    assert Q.f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    # repeated tokens count once per gold occurrence: P=1/3, R=1
    assert Q.f1("cat cat cat", "cat") == pytest.approx(0.5)
    assert Q.f1("dog", "cat") == 0.0
    assert Q.f1("the", "a") == 1.0 and Q.f1("the", "cat") == 0.0  # both empty / one empty
    # max over gold answers
    assert Q.max_over_gold(Q.exact_match, "Paris", ["paris, france", "The Paris"]) == 1.0
    # "new york" -> P=2/3 R=1 (0.8); "york city council" -> P=R=2/3 (0.667)
    assert Q.max_over_gold(Q.f1, "new york city", ["new york", "york city council"]) == pytest.approx(0.8)
    with pytest.raises(TypeError):
        Q.max_over_gold(Q.f1, "x", "x")


def test_corpus_metrics():
    preds = ["Paris", "new york city", "wrong"]
    golds = [["The Paris"], ["new york", "nyc"], ["right"]]
    m = Q.qa_metrics(preds, golds)
    assert m["count"] == 3
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((1.0 + 0.8 + 0.0) / 3)
    with pytest.raises(ValueError, match="2 predictions vs 1"):
        Q.qa_metrics(["a", "b"], [["a"]])


def test_has_answer_and_top_k_accuracy():
    passages = [
        ["Paris is the capital of France.", "Berlin is in Germany."],
        ["The start of the party", "The state of the art museum"],
        ["Wilhelm Röntgen won the first Nobel prize", "nothing"],
        ["I love New-York", "New York, NY is big"],
    ]
    answers = [["paris"], ["the art"], ["Wilhelm Ro\u0308ntgen"], ["New York"]]
    hits = R.answer_hits(passages, answers)
    # "art" must not match inside "start"; NFD makes composed/decomposed umlauts agree;
    # "New-York" normalizes to one token "newyork".
    assert hits.tolist() == [[True, False], [False, True], [True, False], [False, True]]
    assert R.top_k_accuracy(hits, [1, 2]) == {1: 0.5, 2: 1.0}
    assert R.has_answer("the answer is forty two", ["Forty-Two", "forty two"])
    assert not R.has_answer("anything", ["the"])  # an answer that normalizes to nothing never hits
    with pytest.raises(ValueError, match="k=3"):
        R.top_k_accuracy(hits, [3])
    with pytest.raises(ValueError, match="same number of passages"):
        R.answer_hits([["a"], ["a", "b"]], [["a"], ["a"]])


def test_gold_hits_compare_dpr_ids():
    retrieved = [["12", "7", "3"], ["wiki:5", "9", "1"], ["2", "4", "6"]]
    gold = [[7], ["5", "1"], []]
    hits = R.gold_hits(retrieved, gold)
    # "wiki:5" and 5 name the same passage; an empty gold list never hits
    assert hits.tolist() == [[False, True, False], [True, False, True], [False, False, False]]
    assert R.top_k_accuracy(hits[:2], [1, 2]) == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="2 retrieved id lists vs 1"):
        R.gold_hits(retrieved[:2], gold[:1])


def test_collapse_monitor():
    collapsed = np.array([[1, 2], [1, 2], [2, 1]])
    spread = np.array([[1, 2], [3, 4], [5, 6]])
    assert M.distinct_fraction(collapsed) == pytest.approx(2 / 6)
    assert M.distinct_fraction(spread) == 1.0
    assert M.distinct_fraction(np.array([[1, 2], [1, 2], [5, 6]]), valid=[True, False, True]) == 1.0
    # softmax([0, log 3]) = [1/4, 3/4]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    scores = jnp.array([[0.0, math.log(3.0)], [5.0, 5.0]])
    assert float(M.prior_entropy(scores)) == pytest.approx((h + math.log(2)) / 2, rel=1e-6)
    assert float(jax.jit(M.prior_entropy)(scores, jnp.array([True, False]))) == pytest.approx(h, rel=1e-6)
    peaked = jnp.array([[100.0, 0.0, 0.0]])
    assert float(M.prior_entropy(peaked)) < 1e-6
    mon = M.CollapseMonitor()
    mon.add(M.collapse_stats(collapsed, jnp.zeros((3, 2))))
    mon.add(M.collapse_stats(spread, jnp.array([[50.0, 0.0]] * 3)))
    assert set(out := mon.result()) == set(M.CollapseMonitor.KEYS)
    out = mon.result()
    assert out["distinct_doc_fraction"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["doc_prior_entropy_frac"] == pytest.approx(0.5, abs=1e-6)  # flat batch 1.0, peaked 0.0
