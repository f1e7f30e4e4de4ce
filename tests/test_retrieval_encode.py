"""Document encoding job (parity with HF DPRContextEncoder, data-parallel, resumable) and the CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DPRConfig, DPRContextEncoder, DPRContextEncoderTokenizer, DPRQuestionEncoder

import rag_jax
from rag_jax.cli import main as cli_main
from rag_jax.retrieval.corpus import Passage, write_corpus
from rag_jax.retrieval.encode import encode_corpus, make_context_tokenize
from rag_jax.retrieval.index import load_index

WORDS = ("the a of in is was river city born capital mountain paris france warsaw poland music "
         "physicist chemist highest earth europe flows through vienna budapest black sea who where").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "'", "-"] + WORDS + [
    "##s", "##ed", "##ing", "##e", "##a", "##r", "##n", "##t", "##i", "##o"] + list("bcdefghijklmnopqrstuvwxyz")
TINY = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64, initializer_range=0.5)


def _big_init(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    ctx = DPRContextEncoder(DPRConfig(**TINY)).eval()
    _big_init(ctx)
    ctx.save_pretrained(root / "ctx")
    qenc = DPRQuestionEncoder(DPRConfig(**TINY)).eval()
    _big_init(qenc)
    qenc.save_pretrained(root / "q")
    for d in ("ctx", "q"):
        (root / d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    rng = np.random.default_rng(0)
    titles = ["Paris", "Warsaw", "Danube-river", "Everest", "Curie's"]
    passages = []
    for i in range(37):  # not a multiple of the batch: the last batch is padded
        n = int(rng.integers(3, 40))  # some longer than max_length: truncation
        text = " ".join(rng.choice(WORDS + ["straße", "zebras", "ok"], size=n))
        passages.append(Passage(str(i + 1), titles[i % len(titles)], text))
    corpus = write_corpus(passages, root / "corpus", progress=False)
    tsv = root / "psgs.tsv"
    with open(tsv, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for p in passages:
            f.write(f'{p.id}\t"{p.text}"\t{p.title}\n')
    return root, ctx, corpus, passages, tsv


def test_encoding_equals_hf_context_encoder(setup, tmp_path):
    root, ctx, corpus, passages, _ = setup
    enc = rag_jax.load_encoder(root / "ctx")
    assert len(jax.devices()) == 8
    store = encode_corpus(corpus, enc, tmp_path / "emb", batch_size=8, shard_rows=16, max_length=24, progress=False)
    assert store.count == 37 and store.manifest["shards"] == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    assert store.encoder_fingerprint == enc.fingerprint() and store.corpus_checksum == corpus.checksum
    # Reference: HF tokenizer on (title, text) pairs, HF encoder with DPR's zero segment ids.
    tok = DPRContextEncoderTokenizer.from_pretrained(str(root / "ctx"))
    batch = tok([p.title for p in passages], [p.text for p in passages], max_length=24, truncation="longest_first",
                padding="max_length", return_tensors="pt")
    ours = make_context_tokenize(enc.tokenizer, 24)([p.title for p in passages], [p.text for p in passages])
    np.testing.assert_array_equal(ours["input_ids"], batch["input_ids"].numpy())
    np.testing.assert_array_equal(ours["attention_mask"], batch["attention_mask"].numpy())
    with torch.no_grad():
        ref = ctx(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output.numpy()
    got = store.to_array()
    atol = 2e-4 * np.abs(ref).max()
    assert got.shape == ref.shape and np.std(ref, axis=0).mean() > 20 * atol  # documents differ beyond tolerance
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=atol)
    # Trimming padding to a length bucket changes nothing but the compiled shapes.
    trimmed = encode_corpus(corpus, enc, tmp_path / "emb8", batch_size=8, max_length=24, length_bucket=8,
                            progress=False)
    np.testing.assert_allclose(trimmed.to_array(), ref, rtol=2e-4, atol=atol)


def test_length_sorted_batches_are_written_in_corpus_order(setup, tmp_path):
    root, _, corpus, passages, _ = setup
    enc = rag_jax.load_encoder(root / "ctx")
    common = dict(batch_size=8, shard_rows=16, max_length=60, progress=False)
    plain = encode_corpus(corpus, enc, tmp_path / "plain", sort_by_length=False, length_bucket=None, **common)
    seen = []
    original = enc.apply_fn

    def recording(params, ids, mask, types):
        seen.append(ids.shape[1])
        return original(params, ids, mask, types)

    enc.apply_fn = recording  # traced once per shape: records the compiled lengths
    sorted_ = encode_corpus(corpus, enc, tmp_path / "sorted", length_bucket=4, **common)
    assert sorted_.manifest["job"]["sort_by_length"] and not plain.manifest["job"]["sort_by_length"]
    assert len(seen) > 1 and max(seen) <= 60  # several buckets: batches of different lengths
    a, b = plain.to_array(), sorted_.to_array()
    assert np.std(a, axis=0).mean() > 1e-2  # rows differ: a permutation would show
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_killed_and_resumed_job_gives_identical_shards(setup, tmp_path):
    root, _, corpus, _, _ = setup
    enc = rag_jax.load_encoder(root / "ctx")
    jitted = jax.jit(enc.apply_fn)

    def encode_fn(ids, mask):
        return jitted(enc.params, ids, mask, jnp.zeros_like(ids))

    common = dict(tokenizer=enc.tokenizer, batch_size=8, shard_rows=8, max_length=24, encoder_fingerprint="fp",
                  progress=False)
    full = encode_corpus(corpus, encode_fn, tmp_path / "full", **common)

    calls = {"n": 0}

    def dies_after_two_shards(ids, mask):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return encode_fn(ids, mask)

    with pytest.raises(KeyboardInterrupt):
        encode_corpus(corpus, dies_after_two_shards, tmp_path / "resumed", **common)
    # Two complete shards on disk, no manifest, no half-written third shard.
    done = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert done == ["job.json", "shard-00000.npy", "shard-00001.npy"]
    mtimes = {n: (tmp_path / "resumed" / n).stat().st_mtime_ns for n in done if n.startswith("shard")}
    calls["n"] = 0
    encode_corpus(corpus, _counting(encode_fn, calls),
                  tmp_path / "resumed", **common)
    assert calls["n"] == 3  # only the 3 remaining batches were encoded
    for n, t in mtimes.items():
        assert (tmp_path / "resumed" / n).stat().st_mtime_ns == t  # finished shards were not rewritten
    for name in full.manifest["shards"]:
        a = (tmp_path / "full" / name).read_bytes()
        b = (tmp_path / "resumed" / name).read_bytes()
        assert a == b, name
    # Resuming with other settings is refused instead of mixing two jobs.
    with pytest.raises(ValueError, match="different encoding job.*max_length"):
        encode_corpus(corpus, encode_fn, tmp_path / "resumed", **{**common, "max_length": 32})
    # bfloat16 storage, returned as float32 close to the float32 run.
    bf = encode_corpus(corpus, encode_fn, tmp_path / "bf16", **{**common, "shard_rows": 40}, dtype="bfloat16")
    np.testing.assert_allclose(bf.to_array(), full.to_array(), rtol=1e-2, atol=1e-2 * np.abs(full.to_array()).max())


def _counting(fn, calls):
    def wrapped(ids, mask):
        calls["n"] += 1
        return fn(ids, mask)

    return wrapped


def test_cli_build_index_and_search(setup, tmp_path, capsys):
    root, ctx, corpus, passages, tsv = setup
    out = tmp_path / "index"
    rc = cli_main(["build-index", "--passages", str(tsv), "--encoder", str(root / "ctx"), "--out", str(out),
                   "--batch-size", "8", "--max-length", "24", "--index-type", "scann", "--no-progress"])
    assert rc == 0
    assert not (tmp_path / "index.work").exists()
    idx = load_index(out, encoder_fingerprint=rag_jax.load_encoder(root / "ctx").fingerprint())
    assert idx.count == 37 and idx.corpus.checksum == corpus.checksum
    assert idx.manifest["scann"]["brute_force"] is True  # tiny corpus: brute force
    capsys.readouterr()
    rc = cli_main(["search", "--index", str(out), "--encoder", str(root / "q"), "-k", "3", "--json",
                   "where was curie born", "the highest mountain"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["question"] for x in lines] == ["where was curie born", "the highest mountain"]
    # Same answer as brute force with the HF question encoder.
    qenc = rag_jax.load_encoder(root / "q")
    tokd = qenc.tokenizer(["where was curie born"], max_length=64)
    qv = np.asarray(qenc.encode(tokd["input_ids"], tokd["attention_mask"]))
    scores = qv @ idx.embeddings.to_array().T
    best = np.argsort(-scores[0])[:3]
    assert [h["id"] for h in lines[0]["hits"]] == [passages[b].id for b in best]
    assert [h["title"] for h in lines[0]["hits"]] == [passages[b].title for b in best]
    np.testing.assert_allclose([h["score"] for h in lines[0]["hits"]], scores[0, best], rtol=1e-4)
    # Plain-text output names ids, scores and titles.
    cli_main(["search", "--index", str(out), "--encoder", str(root / "q"), "-k", "2", "the highest mountain"])
    text = capsys.readouterr().out
    assert "Q: the highest mountain" in text and "id=" in text and "score=" in text
    # Errors: existing output, malformed passages with the line number.
    assert cli_main(["build-index", "--passages", str(tsv), "--encoder", str(root / "ctx"), "--out", str(out)]) == 2
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\ttext\ttitle\n1\tok\tT\n2\tmissing title\n")
    assert cli_main(["build-index", "--passages", str(bad), "--encoder", str(root / "ctx"),
                     "--out", str(tmp_path / "i2"), "--no-progress"]) == 2
    assert "bad.tsv:3:" in capsys.readouterr().err
