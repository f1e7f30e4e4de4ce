"""Reader warm-up and the from-scratch generator's initialisation."""
import json

import numpy as np
import pytest

import rag_jax
from rag_jax.demo.world import generate_world
from rag_jax.data.tokenize import load_tokenizer
from rag_jax.data.train_tokenizer import train_bart_tokenizer
from rag_jax.models.bart import sinusoidal_positions
from rag_jax.retrieval.corpus import read_passages
from rag_jax.train.reader_warmup import gold_examples, warmup_generator

TINY = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=200, init_std=0.1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    w = generate_world(root / "world", seed=5, num_people=30, num_orgs=10, num_cities=10, num_countries=3,
                       num_rivers=4)
    texts = [f"{p.title} / {p.text}" for p in read_passages(w.passages)]
    tok_dir = train_bart_tokenizer(texts, root / "tok", vocab_size=400, min_frequency=1, add_prefix_space=True)
    return w, load_tokenizer(tok_dir, "bart"), root


def test_sinusoidal_table():
    t = np.asarray(sinusoidal_positions(10, 8, 0.5))
    np.testing.assert_allclose(t[0], 0.5 * np.array([0, 1] * 4), atol=1e-7)
    np.testing.assert_allclose(t[3, 0], 0.5 * np.sin(3.0), rtol=1e-6)
    np.testing.assert_allclose(t[3, 1], 0.5 * np.cos(3.0), rtol=1e-6)
    np.testing.assert_allclose(t[3, 2], 0.5 * np.sin(3.0 / 10000 ** (2 / 8)), rtol=1e-6)


def test_prefix_space_tokens_match_inside_a_passage(world):
    _, tok, _ = world
    alone = tok(["Eytazum"], max_length=16)["input_ids"][0]
    inside = tok(["born in Eytazum"], max_length=16)["input_ids"][0]
    body = [i for i in alone if i not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)]
    assert body and any(list(inside[j:j + len(body)]) == body for j in range(len(inside)))


def test_gold_examples_hold_the_answer_passage(world):
    w, tok, _ = world
    ex = gold_examples(w.qa_jsonl["train"], w.passages, tok, 600, 16)
    rows = [json.loads(line) for line in open(w.qa_jsonl["train"], encoding="utf-8")]
    assert ex["input_ids"].shape[0] == ex["labels"].shape[0] == len(rows)
    text = tok.decode(ex["input_ids"][:5])
    for r, t in zip(rows[:5], text):
        assert t.endswith("// " + r["question"])
        assert r["answers"][0] in t


def test_gold_examples_errors_name_the_line(world, tmp_path):
    w, tok, _ = world
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "answers": ["a"], "positive_ids": []}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*positive_ids"):
        gold_examples(bad, w.passages, tok, 64, 8)
    bad.write_text(json.dumps({"question": "q?", "answers": ["a"], "positive_ids": [1]}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        gold_examples(bad, w.passages, tok, 64, 8)
    bad.write_text(json.dumps({"question": "q?", "answers": ["a"], "positive_ids": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: positive_ids must be a list"):
        gold_examples(bad, w.passages, tok, 64, 8)
    bad.write_text(json.dumps({"question": "q?", "answers": ["a"], "positive_ids": [999999]}) + "\n")
    with pytest.raises(ValueError, match="999999"):
        gold_examples(bad, w.passages, tok, 64, 8)


def test_short_examples_keep_the_answer_sentence_and_its_neighbours(world):
    w, tok, _ = world
    rows = [json.loads(line) for line in open(w.qa_jsonl["train"], encoding="utf-8")]
    full = gold_examples(w.qa_jsonl["train"], w.passages, tok, 600, 16)
    short = gold_examples(w.qa_jsonl["train"], w.passages, tok, 600, 16, window=0)
    wide = gold_examples(w.qa_jsonl["train"], w.passages, tok, 600, 16, window=1)
    # the demo world states every answer inside one sentence of its passage
    assert short["labels"].shape == full["labels"].shape == (len(rows), 16)
    lengths = [e["attention_mask"].sum(1) for e in (short, wide, full)]
    assert (lengths[0] < lengths[1]).mean() > 0.9 and (lengths[1] < lengths[2]).all()
    for r, t in zip(rows[:20], tok.decode(short["input_ids"][:20])):
        title, rest = t.split(" / ", 1)
        sentence, question = rest.split(" // ")
        assert title == r["subject"] or r["relation"] == "spouse"
        assert question == r["question"] and r["answers"][0] in sentence
        assert sentence.count(". ") == 0  # one sentence


def test_short_examples_need_an_answer_inside_a_sentence(world, tmp_path):
    w, tok, _ = world
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "answers": ["no such words"], "positive_ids": [1]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: no answer occurs inside a sentence"):
        gold_examples(bad, w.passages, tok, 64, 8, window=1)


def test_warmup_writes_a_loadable_generator_that_starts_at_bos(world, capsys):
    w, tok, root = world
    sources = [(w.qa_jsonl["train"], w.passages), (w.qa_jsonl["dev"], w.passages)]
    out = warmup_generator(TINY, tok, sources, root / "gen", steps=4, batch_size=4, short_steps=3,
                           short_batch_size=4, max_combined_length=192)
    log = capsys.readouterr().out
    assert "short: 3 steps of 4" in log and "contexts of 64 tokens" in log
    assert "full: 4 steps of 4" in log and "contexts of 192 tokens" in log
    g = rag_jax.load_generator(out)
    assert g.config.decoder_start_token_id == tok.bos_token_id
    assert g.config.vocab_size == tok.vocab_size
    table = np.asarray(g.params["encoder_positions"]["embedding"])
    # started as a sin/cos table: after 7 small steps it is still close to one
    np.testing.assert_allclose(table, np.asarray(sinusoidal_positions(*table.shape, 0.15)), atol=0.03)
    mtime = (out / "config.json").stat().st_mtime
    assert warmup_generator(TINY, tok, sources, root / "gen", steps=4) == out  # cached
    assert (out / "config.json").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="no .* sources"):
        warmup_generator(TINY, tok, [], root / "gen2")
