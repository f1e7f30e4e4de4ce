"""Export -> load -> answer on a tiny real setup: a model trained for a few
steps by ``train_and_evaluate`` on a generated world, exported with
``export_from_workdir``, loaded by ``RagPipeline``, ``rag_jax.load_rag`` and
``transformers``; ``rag-jax ask`` on good and bad input; hot index swap."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import rag_jax
from rag_jax.cli import main as cli
from rag_jax.infer import INFERENCE_FILE, RagPipeline, export_from_workdir
from rag_jax.rag.model import RagModel, question_embedder
from rag_jax.retrieval.corpus import read_passages
from rag_jax.retrieval.index import IndexMismatchError
from rag_jax.train.loop import train_and_evaluate
from tests.train_fixtures import make_world, tiny_config


def _random_bert(out: Path, vocab_from: Path, seed: int) -> Path:
    """Another tiny random BERT with the same vocab and width as the fixture's encoder."""
    import shutil

    from transformers import BertConfig, BertModel

    out.mkdir()
    shutil.copy(vocab_from / "vocab.txt", out / "vocab.txt")
    vocab = sum(1 for _ in open(out / "vocab.txt", encoding="utf-8"))
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, initializer_range=0.2),
              add_pooling_layer=False).save_pretrained(out)
    return out


def _build_index(passages: Path, encoder: Path, out: Path) -> Path:
    assert cli(["build-index", "--passages", str(passages), "--encoder", str(encoder), "--out", str(out),
                "--index-type", "exact", "--max-length", "64", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    paths = make_world(root)
    paths["index_revised"] = _build_index(paths["world"] / "passages_revised.tsv", paths["encoder"],
                                          root / "index_revised")
    other = _random_bert(root / "encoder_other", paths["encoder"], seed=1)
    paths["index_other"] = _build_index(paths["world"] / "passages.tsv", other, root / "index_other")

    cfg = tiny_config(paths, steps=2, global_batch_size=4, lr=3e-3)
    cfg.mesh.shape = (1, 1, 1)
    workdir = root / "run"
    out = train_and_evaluate(cfg, workdir, verbose=False, devices=jax.devices()[:1])
    export = root / "export"
    export_from_workdir(cfg, str(workdir), str(export))
    questions = [json.loads(l)["question"] for l in open(paths["test"], encoding="utf-8")][:2]
    return {"paths": paths, "cfg": cfg, "out": out, "export": export, "questions": questions}


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_export_dir_layout_and_params(setup):
    export = setup["export"]
    info = json.loads((export / INFERENCE_FILE).read_text())
    assert Path(info["index_dir"]) == setup["paths"]["index"].resolve()
    assert info["index_encoder_fingerprint"]
    assert info["n_docs"] == setup["cfg"].retrieval.n_docs
    assert (export / "config.json").is_file()
    assert (export / "question_encoder_tokenizer").is_dir() and (export / "generator_tokenizer").is_dir()
    assert not list(export.rglob("*opt*")), "no optimizer state in an inference directory"

    loaded = rag_jax.load_rag(export)
    want, got = _leaves(setup["out"]["params"]), _leaves(loaded.params)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("variant", ["sequence", "token"])
def test_export_load_generate_equals_in_memory(setup, variant):
    out = setup["out"]
    models = out["models"]
    mem = RagModel(out["task"].config, out["params"], models.question_tokenizer, models.generator_tokenizer)
    pipe = RagPipeline.load(setup["export"])
    questions = setup["questions"]

    # Retrieval through the exported question encoder == the training task's.
    r = pipe.retrieve(questions)
    r_mem = out["task"].retrieve(out["params"]["question_encoder"], questions, n_docs=pipe.n_docs)
    assert r.texts == r_mem.texts
    np.testing.assert_array_equal(r.context_input_ids, r_mem.context_input_ids)
    np.testing.assert_allclose(r.doc_scores, r_mem.doc_scores, rtol=1e-5, atol=1e-5)

    ctx = (r.context_input_ids, r.context_attention_mask, r.doc_scores)
    want = mem.generate(*ctx, variant=variant, max_length=8)
    for model in (pipe.rag, rag_jax.load_rag(setup["export"])):
        np.testing.assert_array_equal(np.asarray(model.generate(*ctx, variant=variant, max_length=8)), want)

    texts = [a.answer for a in pipe.answer(questions, variant=variant, max_length=8)]
    assert texts == models.generator_tokenizer.decode(np.asarray(want))


def test_export_loads_in_transformers(setup):
    from transformers import RagSequenceForGeneration

    hf = RagSequenceForGeneration.from_pretrained(str(setup["export"])).eval()
    sd = hf.state_dict()
    p = setup["out"]["params"]
    qe, gen = p["question_encoder"], p["generator"]

    def t(name):
        return sd[name].detach().numpy()

    np.testing.assert_array_equal(
        t("rag.question_encoder.question_encoder.bert_model.embeddings.word_embeddings.weight"),
        np.asarray(qe["word_embeddings"]["embedding"]))
    np.testing.assert_array_equal(t("rag.generator.model.shared.weight"), np.asarray(gen["shared"]["embedding"]))

    # Whole-tower check: HF's question encoder gives our question embeddings.
    loaded = rag_jax.load_rag(setup["export"])
    tok = loaded.question_tokenizer(setup["questions"], max_length=16)
    embed = question_embedder(loaded.config.question_encoder)
    ours = np.asarray(embed(loaded.params["question_encoder"], tok["input_ids"], tok["attention_mask"],
                            tok["token_type_ids"]))
    with torch.no_grad():
        theirs = hf.rag.question_encoder(
            torch.as_tensor(np.asarray(tok["input_ids"]), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(tok["attention_mask"]), dtype=torch.long),
            token_type_ids=torch.as_tensor(np.asarray(tok["token_type_ids"]), dtype=torch.long),
        )[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_ask_prints_answer_and_passages(setup, capsys):
    # Two questions and max_length 8: the decoder shapes compiled by the generate test.
    qs = setup["questions"]
    k = setup["cfg"].retrieval.n_docs
    assert cli(["ask", "--model", str(setup["export"]), "--max-length", "8", *qs]) == 0
    text = capsys.readouterr().out
    for q in qs:
        assert f"Q: {q}" in text
    assert text.count("\nA: ") == len(qs)
    lines = [l for l in text.splitlines() if l.strip().startswith("[")]
    assert len(lines) == k * len(qs)
    probs = [float(l.split("p=")[1].split()[0]) for l in lines[:k]]
    assert abs(sum(probs) - 1.0) < 5e-3

    assert cli(["ask", "--model", str(setup["export"]), "--max-length", "8", "--json", *qs]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [g["question"] for g in got] == qs and len(got[0]["passages"]) == k
    assert {"id", "title", "text", "score", "prob"} <= set(got[0]["passages"][0])


def test_ask_bad_input_exits_2_with_clear_error(setup, capsys, tmp_path):
    export, paths = str(setup["export"]), setup["paths"]
    q = setup["questions"][0]

    assert cli(["ask", "--model", export, "   "]) == 2
    assert "empty" in capsys.readouterr().err

    missing = tmp_path / "no_such_index"
    assert cli(["ask", "--model", export, "--index", str(missing), q]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err

    missing_model = tmp_path / "no_such_model"
    assert cli(["ask", "--model", str(missing_model), q]) == 2
    err = capsys.readouterr().err
    assert str(missing_model) in err and "does not exist" in err

    assert cli(["ask", "--model", export, "--index", str(paths["index_other"]), q]) == 2
    err = capsys.readouterr().err
    assert str(paths["index_other"]) in err and "encoder" in err


def test_pipeline_refuses_index_from_another_encoder(setup):
    other = setup["paths"]["index_other"]
    with pytest.raises(IndexMismatchError, match=str(other)):
        RagPipeline.load(setup["export"], other)
    # The escape hatch still works (same width, so it runs, just retrieves badly).
    pipe = RagPipeline.load(setup["export"], other, allow_other_encoder=True)
    assert pipe.retriever.path == Path(other)


def test_hot_swap_changes_passages_not_params(setup):
    paths = setup["paths"]
    swap = [json.loads(l) for l in open(paths["world"] / "swap.jsonl", encoding="utf-8")]
    questions = [r["question"] for r in swap][:8]
    pipe = RagPipeline.load(setup["export"])
    before_params = _leaves(pipe.rag.params)
    params_obj = pipe.rag.params
    # Every passage, ranked: the check cannot depend on what a 2-step random
    # question encoder happens to rank first.
    k_all = pipe.retriever.index.count
    old = pipe.retrieve(questions, n_docs=k_all)

    pipe.swap_index(paths["index_revised"])
    assert pipe.retriever.path == Path(paths["index_revised"])
    new = pipe.retrieve(questions, n_docs=k_all)
    assert pipe.rag.params is params_obj
    after = _leaves(pipe.rag.params)
    for k in before_params:
        np.testing.assert_array_equal(after[k], before_params[k], err_msg=k)

    original = {p.text for p in read_passages(paths["world"] / "passages.tsv")}
    changed_texts = {p.text for p in read_passages(paths["world"] / "passages_revised.tsv")} - original
    assert changed_texts, "the revised edition must change some passages"
    assert old.texts != new.texts
    assert any(t in changed_texts for row in new.texts for t in row), "swapped index must serve revised passages"
    assert not any(t in changed_texts for row in old.texts for t in row)
