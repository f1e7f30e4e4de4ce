"""Task kinds (config.task): validation, FEVER-style label tokens, classification
training and prediction, evaluation dispatch, and the demo world's task files."""
from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest

from rag_jax.config import load_config_module
from rag_jax.data.qa_formats import QAFormatError
from rag_jax.demo import world as dw
from rag_jax.train import config_checks as C

ROOT = Path(__file__).resolve().parents[1]
FEVER3 = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


def _tiny():
    return load_config_module(ROOT / "configs" / "tiny.py").get_config()


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("fields,needle", [
    ({"kind": "ner"}, "task.kind"),
    ({"answer_match": "fuzzy"}, "task.answer_match"),
    ({"kind": "abstractive", "answer_match": "regex"}, "task.answer_match"),
    ({"labels": ("A", "B")}, "task.labels"),  # labels on a QA task
    ({"kind": "classification"}, "task.labels"),  # no labels
    ({"kind": "classification", "labels": ("A", "A")}, "task.labels"),
    ({"kind": "classification", "labels": ("A", "B"), "label_words": ("a",)}, "task.label_words"),
    ({"kind": "classification", "labels": ("A", "B"), "ignore_labels": ("B",)}, "task.ignore_labels"),
    ({"kind": "classification", "labels": ("A", "")}, "task.labels"),
    ({"kind": "classification", "labels": ("A", "B"), "eval.max_length": 2}, "eval.max_length"),
])
def test_bad_task_names_the_field(fields, needle):
    cfg = _tiny()
    for k, v in fields.items():
        section, _, key = k.rpartition(".")
        cfg[section or "task"][key] = v
    with pytest.raises(ValueError, match=rf"config\.{needle}"):
        C.validate(cfg, 1)


def test_fever_config_is_three_way_and_two_way_by_argument():
    from rag_jax.config import load_config

    three = load_config_module(ROOT / "configs" / "fever.py").get_config()
    two = load_config(f"{ROOT / 'configs' / 'fever.py'}:2way", ["--config.train.lr=1e-5"])  # as rag-jax train reads it
    assert two.train.lr == 1e-5
    for cfg in (three, two):
        C.validate(cfg, 8)
        assert cfg.task.kind == "classification"
    assert tuple(three.task.labels) == FEVER3 and not three.task.ignore_labels
    assert tuple(two.task.labels) == FEVER3[:2] and tuple(two.task.ignore_labels) == (FEVER3[2],)


# ---------------------------------------------------------------- label tokens

@pytest.fixture(scope="module")
def gen_tokenizers(tmp_path_factory):
    """A plain BPE tokenizer and one with FEVER's labels added as whole tokens."""
    from rag_jax.data.tokenize import load_tokenizer
    from rag_jax.data.train_tokenizer import train_bart_tokenizer

    root = tmp_path_factory.mktemp("tok")
    texts = ["The river flows into the lake.", "She was born in the city."] * 20
    plain = load_tokenizer(train_bart_tokenizer(texts, root / "plain", vocab_size=300), "bart")
    labelled = load_tokenizer(train_bart_tokenizer(texts, root / "labels", vocab_size=300, added_tokens=FEVER3),
                              "bart")
    return plain, labelled


def test_label_that_is_several_tokens_is_one_line_error(gen_tokenizers):
    from rag_jax.rag.labels import label_space

    plain, _ = gen_tokenizers
    with pytest.raises(ValueError) as e:
        label_space(FEVER3, (), plain)
    msg = str(e.value)
    assert "\n" not in msg and "config.task.labels" in msg and "'SUPPORTS'" in msg
    assert "generator tokens [" in msg  # its tokenization is shown
    with pytest.raises(ValueError, match=r"config\.task\.label_words: label 'SUPPORTS' \(word 'the river'\)"):
        label_space(FEVER3, ("the river", "lake", "city"), plain)


def test_added_label_tokens_are_single_and_distinct(gen_tokenizers):
    from rag_jax.rag.labels import label_space

    _, tok = gen_tokenizers
    space = label_space(FEVER3, (), tok)
    assert len(set(space.token_ids)) == 3 and space.start_token_id == tok.bos_token_id
    for label, t in zip(FEVER3, space.token_ids):
        ids = tok([label], max_length=8)["input_ids"][0].tolist()
        assert ids[:3] == [tok.bos_token_id, t, tok.eos_token_id]
        assert tok.decode([[t]])[0] == label
    # Text around a label word still tokenizes as before the labels were added.
    plain, _ = gen_tokenizers
    text = "The river flows into the lake."
    assert tok([text], max_length=32)["input_ids"].tolist() == plain([text], max_length=32)["input_ids"].tolist()
    assert space.target_texts(["REFUTES"]) == ["REFUTES"]
    with pytest.raises(ValueError, match="'MAYBE' is not one of config.task.labels"):
        space.target_texts(["MAYBE"])


def test_label_scores_are_the_first_step_rag_marginal():
    """``label_log_probs`` against two brute forces on a random tiny BART:
    ``-nll`` of each one-token target ``<s> label`` under RAG-Token, and the
    marginal ``log sum_z p(z|x) p(label|x,z,<s>)`` from per-document logits."""
    import jax.numpy as jnp

    from rag_jax.generator import init_params
    from rag_jax.models.bart import BartConfig
    from rag_jax.rag.labels import LabelSpace, label_scorer, predict_labels
    from rag_jax.rag.model import RagConfig, RagModel, doc_logits

    cfg = BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
                     init_std=0.5, dropout=0.0, decoder_start_token_id=0)
    rng = np.random.default_rng(0)
    # Random weights drawn in numpy on init's shapes: no init program to compile.
    shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: rng.normal(0.0, 0.5, x.shape).astype(np.float32), shapes)
    b, k, length = 5, 3, 7
    ids = rng.integers(3, 40, (b, k, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, 1, 5:] = 0
    scores = rng.normal(0, 2.0, (b, k)).astype(np.float32)
    space = LabelSpace(("A", "B", "C"), ("a", "b", "c"), (7, 11, 23), 0)

    lp = np.asarray(label_scorer(cfg)(params, ids, mask, scores, 0, np.asarray(space.token_ids)))
    model = RagModel(RagConfig(None, cfg), {"generator": params})
    by_nll = np.stack([-np.asarray(model.nll(ids, mask, scores, np.tile([[0, t]], (b, 1)), variant="token",
                                             epsilon=0.0)) for t in space.token_ids], axis=1)
    logits = jax.jit(functools.partial(doc_logits, cfg))(params, ids, mask, jnp.zeros((b, 1), jnp.int32))
    logits = np.asarray(logits, np.float64)[:, :, 0]
    p_tok = np.exp(logits - logits.max(-1, keepdims=True))
    p_tok /= p_tok.sum(-1, keepdims=True)
    prior = np.exp(scores - scores.max(-1, keepdims=True))
    prior /= prior.sum(-1, keepdims=True)
    by_hand = np.log(np.einsum("bk,bkv->bv", prior, p_tok)[:, list(space.token_ids)])
    np.testing.assert_allclose(lp, by_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp, by_hand, rtol=1e-4, atol=1e-5)
    pred = predict_labels(cfg, params, ids, mask, scores, space)
    np.testing.assert_array_equal(pred, by_hand.argmax(1))
    assert np.ptp(lp, axis=0).min() > 1e-3  # the scores depend on each example's documents


# ---------------------------------------------------------------- evaluation dispatch

def test_string_qa_metrics_are_unchanged():
    from rag_jax.eval.qa import qa_metrics
    from rag_jax.train.evaluate import task_metrics

    preds, refs = ["Paris", "the Rhine", "x"], [["Paris"], ["Rhine", "the Rhine river"], ["y"]]
    assert task_metrics("qa", "string", preds, refs) == dict(qa_metrics(preds, refs))


@pytest.mark.parametrize("kind,match,preds,refs,keys", [
    ("qa", "regex", ["1969", "x"], [[r"19\d\d"], ["y"]], {"exact_match", "count"}),
    ("abstractive", "string", ["the cat sat"], [["the cat sat on the mat"]], {"bleu_1", "rouge_l", "distinct_3",
                                                                              "count"}),
    ("question_generation", "string", ["who wrote it"], [["who wrote the book"]], {"q_bleu_1", "bleu_1",
                                                                                   "distinct_3", "count"}),
    ("classification", "string", ["SUPPORTS", "REFUTES"], [["SUPPORTS"], ["SUPPORTS"]], {"label_accuracy"}),
])
def test_other_kinds_are_scored_by_eval_scores(kind, match, preds, refs, keys):
    from rag_jax.eval.scores import score
    from rag_jax.train.evaluate import task_metrics

    got = task_metrics(kind, match, preds, refs)
    assert got == dict(score(kind, preds, refs, answer_match=match)) and keys <= set(got)
    if kind == "qa":
        assert got["exact_match"] == 0.5
    if kind == "classification":
        assert got["label_accuracy"] == 0.5


# ---------------------------------------------------------------- the demo world's task files

@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return dw.generate_world(tmp_path_factory.mktemp("world"), seed=5, num_people=60, num_orgs=16, num_cities=16,
                             num_countries=4, num_rivers=6)


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_world_fever_claims_cover_three_classes_with_evidence(small_world):
    w = small_world
    facts = _jsonl(w.facts)
    stated = {(f["subject"], f["relation"]): f for f in facts}
    passages = {}
    for line in Path(w.passages).read_text(encoding="utf-8").splitlines()[1:]:
        pid, text, title = line.split("\t")
        passages[int(pid)] = (text, title)
    claims = {s: _jsonl(w.fever_jsonl[s]) for s in dw.SPLITS}
    assert sum(len(c) for c in claims.values()) == len(stated)  # one claim per fact
    for s in dw.SPLITS:
        assert set(Counter(c["label"] for c in claims[s])) == set(dw.FEVER_LABELS), s
    ids = [c["id"] for cs in claims.values() for c in cs]
    assert len(set(ids)) == len(ids)
    for c in claims["train"]:
        assert set(c) == {"id", "claim", "label", "evidence"}
        if c["label"] == "NOT ENOUGH INFO":
            assert c["evidence"] == [[[c["id"], None, None, None]]]
            continue
        for (evidence,) in c["evidence"]:
            _, pid, page, _ = evidence
            text, title = passages[pid]
            assert page == title.replace(" ", "_") and title in c["claim"]
    by_label = Counter()
    for c in claims["train"] + claims["dev"]:
        by_label[c["label"]] += 1
    assert min(by_label.values()) > 0.2 * sum(by_label.values())


def test_world_jeopardy_pairs_name_the_answer_only_as_answer(small_world):
    w = small_world
    pairs = [p for s in dw.SPLITS for p in _jsonl(w.jeopardy_jsonl[s])]
    assert pairs
    for p in pairs:
        assert set(p) == {"category", "question", "answer"}
        assert p["question"].startswith("This ") and p["answer"] not in p["question"]
    qa_subjects = {r["subject"] for s in dw.SPLITS for r in _jsonl(w.qa_jsonl[s])}
    assert {p["answer"] for p in pairs} <= qa_subjects


def test_world_task_files_parse_with_the_readers(small_world):
    """The FEVER and Jeopardy files read as formats "fever" / "jeopardy" (and
    are detected so); FEVER evidence titles are passage titles of the corpus."""
    from rag_jax.data.qa_formats import detect_format, read_qa

    w = small_world
    titles = {line.split("\t")[2] for line in Path(w.passages).read_text(encoding="utf-8").splitlines()[1:]}
    for s in dw.SPLITS:
        raw = _jsonl(w.fever_jsonl[s])
        recs = list(read_qa(w.fever_jsonl[s], "fever"))
        assert detect_format(w.fever_jsonl[s]) == "fever"
        assert [r.question for r in recs] == [c["claim"] for c in raw]
        assert [r.answers for r in recs] == [[c["label"]] for c in raw]
        for r, c in zip(recs, raw):
            assert bool(r.provenance_titles) == (c["label"] != "NOT ENOUGH INFO")
            assert set(r.titles) <= titles
        pairs = _jsonl(w.jeopardy_jsonl[s])
        recs = list(read_qa(w.jeopardy_jsonl[s], "jeopardy"))
        assert [(r.question, r.answers) for r in recs] == [(p["answer"], [p["question"]]) for p in pairs]


# ---------------------------------------------------------------- classification training

@pytest.fixture(scope="module")
def fever_paths(tmp_path_factory):
    """The tiny training setup, with the world's FEVER claims as the data."""
    from tests.train_fixtures import make_world

    paths = make_world(tmp_path_factory.mktemp("fever"))
    return {**paths, "train": paths["world"] / "fever_train.jsonl", "dev": paths["world"] / "fever_dev.jsonl"}


def _fever_config(paths, two_way=False):
    from tests.train_fixtures import tiny_config

    cfg = tiny_config(paths, steps=3, global_batch_size=4, lr=3e-3)
    cfg.data.train_file = str(paths["train"])
    cfg.data.format = "fever"
    cfg.mesh.shape = (1, 1, 1)
    cfg.task.kind = "classification"
    cfg.task.labels = FEVER3[:2] if two_way else FEVER3
    cfg.task.ignore_labels = FEVER3[2:] if two_way else ()
    return cfg


def test_unknown_label_fails_with_file_and_line(tmp_path):
    from rag_jax.train.setup import check_inputs

    f = tmp_path / "claims.jsonl"
    f.write_text("".join(json.dumps({"question": f"claim {i}", "answers": [lab]}) + "\n"
                         for i, lab in enumerate(["SUPPORTS", "REFUTES", "NOT ENOUGH INFO", "SUPPORTS"])))
    cfg = _tiny()
    cfg.data.train_file = str(f)
    cfg.task.kind = "classification"
    cfg.task.labels = ("SUPPORTS", "REFUTES")  # NOT ENOUGH INFO neither a label nor ignored
    with pytest.raises(QAFormatError, match=r"claims\.jsonl:3: label 'NOT ENOUGH INFO' is not in config.task.labels"):
        check_inputs(cfg, need_index=False)
    cfg.task.ignore_labels = ("NOT ENOUGH INFO",)
    check_inputs(cfg, need_index=False)


@pytest.mark.slow  # about a minute on 2 loaded cores
def test_two_way_classification_trains_and_predicts_label_tokens_only(fever_paths, tmp_path):
    """2-way FEVER on the tiny model: the dataset holds no NEI claims, training
    runs, and the prediction is the arg-max of the RAG marginal over the label
    tokens, equal to scoring each label as a one-token target with ``nll``."""
    import tensorflow_datasets as tfds

    from rag_jax.rag.model import RagModel
    from rag_jax.train.loop import train_and_evaluate

    cfg = _fever_config(fever_paths, two_way=True)
    out = train_and_evaluate(cfg, tmp_path / "run", verbose=False, devices=jax.devices()[:1])
    assert len(out["losses"]) == 3 and all(np.isfinite(v) for v in out["losses"].values())
    data_dir = next((tmp_path / "run" / "data").glob("rag_qa/*/*"))
    rows = tfds.builder_from_directory(str(data_dir)).as_data_source(split="train")
    answers = Counter(r["answer"].decode() for r in rows)
    assert set(answers) == {"SUPPORTS", "REFUTES"}

    task, params = out["task"], out["params"]
    claims = [json.loads(line)["claim"] for line in Path(fever_paths["dev"]).read_text().splitlines()[:4]]
    r = task.retrieve(params["question_encoder"], claims)
    pred = task.predict_labels(params["generator"], r)
    assert set(task.labels.names(pred)) <= {"SUPPORTS", "REFUTES"}

    # Brute force: -nll of the one-token target "<s> label" under RAG-Token is
    # log sum_z p(z|x) p(label|x,z,<s>), the first step's marginal (RAG-Sequence's too).
    model = RagModel(task.config, params)
    bos = task.labels.start_token_id
    brute = np.stack([
        -np.asarray(model.nll(r.context_input_ids, r.context_attention_mask, r.doc_scores,
                              np.tile([[bos, t]], (len(claims), 1)), variant="token", epsilon=0.0))
        for t in task.labels.token_ids], axis=1)
    from rag_jax.rag.labels import label_scorer

    lp = np.asarray(label_scorer(task.config.generator)(
        params["generator"], r.context_input_ids, r.context_attention_mask, r.doc_scores, bos,
        np.asarray(task.labels.token_ids)))
    np.testing.assert_allclose(lp, brute, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pred, brute.argmax(1))

    # Evaluation on the dev claims: label accuracy over SUPPORTS/REFUTES only,
    # and KILT's scores from the evidence titles, equal to one kilt_scores call.
    from rag_jax.data.qa_formats import read_qa
    from rag_jax.eval.kilt import kilt_scores
    from rag_jax.train.evaluate import run_eval

    cfg.eval.max_examples = 12
    ev = run_eval(cfg, task, model, params, str(fever_paths["dev"]), progress=False, return_predictions=True)
    recs = [r for r in read_qa(fever_paths["dev"], "fever") if r.answers[0] != "NOT ENOUGH INFO"][:12]
    assert ev["examples"] == 12 and set(ev["predictions"]) <= {"SUPPORTS", "REFUTES"}
    acc = np.mean([p == r.answers[0] for p, r in zip(ev["predictions"], recs)])
    assert ev["label_accuracy"] == pytest.approx(acc)
    got = task.retrieve(params["question_encoder"], [r.question for r in recs])
    want = kilt_scores(ev["predictions"], [r.answers for r in recs], got.titles,
                       [[list(t) for t in r.provenance_titles] for r in recs], ks=[1, 2])
    for key, v in want.items():
        assert ev[f"kilt/{key}"] == pytest.approx(v), key
