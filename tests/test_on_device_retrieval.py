"""Retrieval inside the step (``retrieval.on_device``) on 8 fake devices:

* the string split behind token-space assembly equals HF's context string;
* contexts assembled on device from the passage token table equal HF's string
  path (``build_context_strings`` + the generator tokenizer) token for token,
  on the demo corpus and on odd titles (quotes, double spaces, non-ASCII,
  passages longer than ``max_combined_length``), for byte-level BPE with and
  without ``add_prefix_space``;
* the sharded search returns the rows of host exact search;
* the token table is versioned by corpus, tokenizer and format;
* a train step with on-device retrieval gives the loss of host retrieval.
"""
import itertools
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax.data.tokenize import load_tokenizer
from rag_jax.data.train_tokenizer import train_bart_tokenizer
from rag_jax.parallel.mesh import make_mesh
from rag_jax.rag.inputs import build_context_strings, context_string, passage_string, question_string, split_doc_sep
from rag_jax.retrieval.corpus import build_corpus
from rag_jax.retrieval.index import ExactIndex
from rag_jax.retrieval.on_device import assemble_contexts, bytes_per_device, place_index, retrieve
from rag_jax.retrieval.token_table import ContextFormat, encode_rows, ensure_table, open_table, table_fingerprint

AXES = ("data", "fsdp")
LONG = " ".join(f"word{i} and  more" for i in range(120))  # far past any max_combined_length below
ODD_TITLES = ['"Quoted"', '""Twice quoted""', 'Half "quote', "Two  spaces", "Three   spaces", "Ünïcödé Straße",
              "東京 タワー", "emoji 🙂 title", " leading space", "trailing space ", "", "dash — dash", '"', "a//b",
              "<s> special", "tab\there"]
ODD_TEXTS = ["plain text.", "double  space  text", "ends with space ", "  starts with spaces", "Ünïcödé ok",
             LONG, "x", "", "  ", "quote \" in text", "trailing double  ", "中文段落。", "a / b // c"]
ODD_QUESTIONS = ["who founded it", " leading question", "trailing question ", "double  space?", "Ünï?",
                 '"quoted question"', "?", "what is <mask>", "a  b   c    d", LONG[:300]]


def test_split_reproduces_context_string():
    rng = random.Random(0)
    pieces = ["a", " ", "  ", '"', "é", "/", "//", "x y", "\t", "東"]
    seps = [(" / ", " // "), (" | ", " ## "), (" / ", " //  "), ("/", "\t// ")]
    for _ in range(3000):
        t, x, q = ("".join(rng.choice(pieces) for _ in range(rng.randint(0, 6))) for _ in range(3))
        prefix = rng.choice([None, "", "answer: ", "p  "])
        title_sep, doc_sep = rng.choice(seps)
        assert passage_string(t, x, prefix, title_sep, doc_sep) + question_string(q, doc_sep) == \
            context_string(t, x, q, prefix, title_sep, doc_sep)
    for bad in (" ", " //", "//", "  "):
        with pytest.raises(ValueError, match="doc_sep"):
            split_doc_sep(bad)


def _write_passages(path, titles, texts):
    with open(path, "w", encoding="utf-8") as f:
        for i, (t, x) in enumerate(zip(titles, texts)):
            f.write(json.dumps({"id": str(i + 1), "title": t, "text": x}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from rag_jax.demo.world import generate_world

    root = tmp_path_factory.mktemp("ondev")
    world = generate_world(root / "world", seed=1, num_people=30, num_orgs=10, num_cities=10, num_countries=3,
                           num_rivers=4)
    demo = build_corpus(world.passages, root / "demo_corpus", progress=False)
    pairs = list(itertools.product(ODD_TITLES, ODD_TEXTS))
    odd = build_corpus(_write_passages(root / "odd.jsonl", [p[0] for p in pairs], [p[1] for p in pairs]),
                       root / "odd_corpus", progress=False)
    texts = [demo.title(i) + " " + demo.text(i) for i in range(len(demo))] + ODD_TITLES + ODD_TEXTS + ODD_QUESTIONS
    toks = {aps: load_tokenizer(train_bart_tokenizer(texts, root / f"tok{int(aps)}", 600, add_prefix_space=aps),
                                "bart") for aps in (False, True)}
    questions = [json.loads(line)["question"] for line in open(world.qa_jsonl["train"], encoding="utf-8")][:20]
    return {"root": root, "demo": demo, "odd": odd, "toks": toks, "questions": questions}


def _assemble_all(corpus, tok, fmt, questions, index_dir):
    """Every (question, passage) pair of ``corpus`` through the table and ``assemble_contexts``."""
    table = ensure_table(index_dir, corpus, tok, fmt, progress=False)
    n = len(corpus)
    b = len(questions)
    q_ids, q_len = encode_rows(tok, [question_string(q, fmt.doc_sep) for q in questions], fmt.width)
    rows = np.broadcast_to(np.arange(n), (b, n))
    ids, mask = jax.jit(assemble_contexts, static_argnames=("length", "bos", "eos", "pad"))(
        jnp.asarray(np.asarray(table.tokens)[rows]), jnp.asarray(np.asarray(table.lengths)[rows]),
        jnp.asarray(q_ids), jnp.asarray(q_len), length=fmt.max_combined_length, bos=tok.bos_token_id,
        eos=tok.eos_token_id, pad=tok.pad_token_id)
    titles, texts = corpus.batch(0, n)
    strings = build_context_strings([titles] * b, [texts] * b, questions, fmt.prefix, fmt.title_sep, fmt.doc_sep)
    want = tok([s for row in strings for s in row], max_length=fmt.max_combined_length)
    return (np.asarray(ids).reshape(b * n, -1), np.asarray(mask).reshape(b * n, -1), want["input_ids"],
            want["attention_mask"], strings)


@pytest.mark.parametrize("aps", [False, True])
def test_device_contexts_equal_string_path(corpora, aps):
    tok = corpora["toks"][aps]
    cases = [
        (corpora["demo"], corpora["questions"], ContextFormat(None, " / ", " // ", 300)),
        (corpora["demo"], corpora["questions"][:4], ContextFormat("answer: ", " | ", " ## ", 40)),
        (corpora["odd"], ODD_QUESTIONS, ContextFormat(None, " / ", " // ", 48)),
        (corpora["odd"], ODD_QUESTIONS, ContextFormat("p  ", " / ", " //  ", 300)),
    ]
    truncated = 0
    for i, (corpus, questions, fmt) in enumerate(cases):
        got_ids, got_mask, want_ids, want_mask, strings = _assemble_all(
            corpus, tok, fmt, questions, corpora["root"] / f"index{i}_{aps}")
        bad = np.nonzero((got_ids != want_ids).any(1) | (got_mask != want_mask).any(1))[0]
        flat = [s for row in strings for s in row]
        assert not len(bad), f"case {i}: {len(bad)} mismatches, first {flat[bad[0]]!r}"
        truncated += int((want_mask.sum(1) == fmt.max_combined_length).sum())
    assert truncated > 100  # the long passages and questions really were cut


def test_token_table_versioned(corpora, tmp_path):
    demo, odd = corpora["demo"], corpora["odd"]
    tok, tok2 = corpora["toks"][False], corpora["toks"][True]
    fmt = ContextFormat(None, " / ", " // ", 48)
    t1 = ensure_table(tmp_path, demo, tok, fmt, progress=False)
    assert ensure_table(tmp_path, demo, tok, fmt, progress=False).path == t1.path  # reused
    others = {ensure_table(tmp_path, demo, tok2, fmt, progress=False).path,
              ensure_table(tmp_path, odd, tok, fmt, progress=False).path,
              ensure_table(tmp_path, demo, tok, ContextFormat(None, " / ", " ## ", 48), progress=False).path,
              ensure_table(tmp_path, demo, tok, ContextFormat(None, " / ", " // ", 40), progress=False).path}
    assert t1.path not in others and len(others) == 4
    assert t1.tokens.shape == (len(demo), 46) and t1.tokens.dtype == np.int32
    # A table whose manifest names other inputs is refused, not served.
    with pytest.raises(ValueError, match="made for other inputs"):
        open_table(t1.path, table_fingerprint(odd.checksum, tok, fmt))
    # A tokenizer whose normalizer rewrites across the passage/question cut is refused before writing.
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from rag_jax.data.tokenize import TextTokenizer

    bad = Tokenizer(models.WordLevel({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))
    bad.pre_tokenizer = pre_tokenizers.Whitespace()
    bad.normalizer = normalizers.Replace("// ", "#")  # the whole string's " // q" becomes " #q", the parts' not
    with pytest.raises(ValueError, match="differently at the passage/question boundary"):
        ensure_table(tmp_path / "bad", demo, TextTokenizer(bad, "bart"), fmt, progress=False)
    # No leftovers of the atomic writes.
    assert not [p for p in (tmp_path / "passage_tokens").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("count,k,recall", [(203, 5, 0.0), (64, 3, 0.0), (203, 4, 0.95)])
def test_sharded_retrieval_equals_host_exact(count, k, recall):
    mesh = make_mesh((2, 2, 2))
    rng = np.random.default_rng(count)
    vectors = rng.normal(size=(count, 16)).astype(np.float32)
    width = 7
    tokens = rng.integers(5, 90, size=(count, width)).astype(np.int32)
    lengths = rng.integers(0, width + 1, size=count).astype(np.int32)
    q = rng.normal(size=(12, 16)).astype(np.float32)
    index = place_index(vectors, tokens, lengths, mesh, AXES)
    assert index.vectors.shape[0] == -(-count // 4) * 4
    fn = jax.jit(lambda q, ix: retrieve(q, ix, mesh=mesh, axes=AXES, count=count, k=k, approx_recall=recall))
    got = jax.device_get(fn(jnp.asarray(q), index.arrays()))
    want_rows, want_scores = ExactIndex(vectors).search(q, k)
    np.testing.assert_array_equal(got["rows"], want_rows)
    np.testing.assert_allclose(got["scores"], want_scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["vectors"], vectors[want_rows])
    np.testing.assert_array_equal(got["tokens"], tokens[want_rows])
    np.testing.assert_array_equal(got["lengths"], lengths[want_rows])
    # The padding rows (zero vectors, score 0) never win, even when every real score is negative.
    pos = place_index(np.abs(vectors), tokens, lengths, mesh, AXES)
    neg = jax.device_get(fn(jnp.asarray(-np.abs(q)), pos.arrays()))
    assert int(neg["rows"].max()) < count and (neg["scores"] < 0).all()


def test_bfloat16_index_and_bytes_rule():
    mesh = make_mesh((2, 2, 2))
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    index = place_index(vectors, np.zeros((40, 3), np.int32), np.zeros(40, np.int32), mesh, AXES, dtype="bfloat16")
    assert index.vectors.dtype == jnp.bfloat16
    q = rng.normal(size=(6, 8)).astype(np.float32)
    fn = jax.jit(lambda q, ix: retrieve(q, ix, mesh=mesh, axes=AXES, count=40, k=3))
    got = jax.device_get(fn(jnp.asarray(q), index.arrays()))
    # Ranked as exact search over the bfloat16-rounded vectors and questions; vectors come back as stored.
    def bf16(x):
        return np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    want_rows, _ = ExactIndex(bf16(vectors)).search(bf16(q), 3)
    np.testing.assert_array_equal(got["rows"], want_rows)
    np.testing.assert_array_equal(got["vectors"], bf16(vectors)[want_rows])
    # 40 rows over 4 shards: 10 per device, each 8 x 2 (bf16) + 3 x 4 + 4 bytes.
    assert bytes_per_device(40, 8, 3, 4, "bfloat16") == 10 * (16 + 12 + 4)
    assert bytes_per_device(41, 8, 3, 4, "float32") == 11 * (32 + 12 + 4)


def _tiny_task(corpora, n_docs=3, length=64):
    """A RagTask over the demo corpus: tiny random DPR + BART (large init so documents differ), exact index."""
    from tokenizers import BertWordPieceTokenizer

    from rag_jax.generator import scratch_generator
    from rag_jax.models.bert import BertConfig, DprEncoder
    from rag_jax.rag.model import RagConfig
    from rag_jax.retrieval.index import build_index
    from rag_jax.retrieval.retriever import Retriever
    from rag_jax.train.task import RagTask

    root, demo, g_tok = corpora["root"], corpora["demo"], corpora["toks"][False]
    qdir = root / "qtok"
    if not qdir.is_dir():
        qdir.mkdir()
        wp = BertWordPieceTokenizer(lowercase=True)
        wp.train_from_iterator([demo.title(i) + " " + demo.text(i) for i in range(len(demo))] + corpora["questions"],
                               vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                               show_progress=False)
        wp.save_model(str(qdir))
        vectors = np.random.default_rng(0).normal(size=(len(demo), 16)).astype(np.float32)
        build_index(vectors, root / "tiny_index", kind="exact", corpus=demo, include_corpus=True)
    q_tok = load_tokenizer(qdir, "bert")
    q_cfg = BertConfig(vocab_size=q_tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=24, max_position_embeddings=32, initializer_range=0.5,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = jnp.ones((1, 4), jnp.int32)
    q_params = DprEncoder(q_cfg).init(jax.random.PRNGKey(1), ids, ids)["params"]
    g_cfg, g_params = scratch_generator(dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                             decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                                             max_position_embeddings=length, init_std=0.5),
                                        g_tok, jax.random.PRNGKey(2), dropout=0.0)
    task = RagTask(config=RagConfig(q_cfg, g_cfg), question_tokenizer=q_tok, generator_tokenizer=g_tok,
                   retriever=Retriever(root / "tiny_index"), n_docs=n_docs, max_question_length=16,
                   max_combined_length=length, max_target_length=8)
    from flax import linen as nn

    return task, nn.meta.unbox({"question_encoder": q_params, "generator": g_params})


def test_on_device_loss_equals_host_retrieval(corpora):
    """The loss of the on-device task equals the host-retrieval task's on the
    same questions (8 per batch on a (2, 2, 2) mesh), and its contexts and
    retrieved rows are the host's exactly (gradients: the slow training test)."""
    from rag_jax.rag.model import question_embedder
    from rag_jax.train.on_device_task import OnDeviceTask, open_device_index

    task, params = _tiny_task(corpora)
    mesh = make_mesh((2, 2, 2))
    questions = corpora["questions"][:8]
    answers = [f"answer {i}" for i in range(8)]
    rng = jax.random.PRNGKey(3)

    host = task.train_batch(params["question_encoder"], questions, answers)
    loss_h, _ = jax.jit(task.loss_fn)(params, host, rng)

    od = OnDeviceTask(task, mesh, AXES, open_device_index(task, mesh, AXES, progress=False))
    # What `rag-jax build-index --token-table GENERATOR_DIR` makes ahead of training is the table training uses.
    from rag_jax.retrieval.token_table import TABLE_SUBDIR, ensure_index_table

    ahead = ensure_index_table(corpora["root"] / "tiny_index", corpora["root"] / "tok0",
                               ContextFormat(None, " / ", " // ", 64), progress=False)
    assert [p.name for p in (corpora["root"] / "tiny_index" / TABLE_SUBDIR).iterdir()] == [ahead.path.name]
    batch = od.train_batch(questions, answers)
    assert set(batch) == {"question_input_ids", "question_attention_mask", "question_token_type_ids",
                          "question_generator_ids", "question_generator_lengths", "labels"}
    loss_d, _ = jax.jit(od.loss_fn)(params, batch, rng, od.index.arrays())
    np.testing.assert_allclose(float(loss_d), float(loss_h), rtol=1e-5)

    q = question_embedder(task.config.question_encoder)(
        params["question_encoder"], host["question_input_ids"], host["question_attention_mask"],
        host["question_token_type_ids"])
    got, ids, mask = jax.jit(od.contexts)(q, batch, od.index.arrays())
    r = task.retrieve(params["question_encoder"], questions)
    np.testing.assert_array_equal(np.asarray(got["rows"]), r.rows)
    np.testing.assert_array_equal(np.asarray(ids), host["context_input_ids"])
    np.testing.assert_array_equal(np.asarray(mask), host["context_attention_mask"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.train_fixtures import make_world

    return make_world(tmp_path_factory.mktemp("ondev_train"))


@pytest.mark.slow  # two training runs (~3 min on 2 loaded cores); the loss test above is the quick one
def test_train_steps_on_device_equal_host_retrieval(world, tmp_path, capsys):
    """Three steps on a (2, 2, 2) mesh, the second with two micro-batches'
    worth of accumulation: on-device retrieval gives host retrieval's losses."""
    from rag_jax.train.loop import train_and_evaluate
    from tests.train_fixtures import tiny_config

    losses = {}
    for on_device in (False, True):
        cfg = tiny_config(world, steps=3, global_batch_size=8, lr=3e-3, grad_accum_steps=2, per_device_batch_size=2)
        cfg.mesh.shape = (2, 2, 2)
        cfg.retrieval.on_device = on_device
        out = train_and_evaluate(cfg, tmp_path / f"run{int(on_device)}", verbose=on_device)
        losses[on_device] = out["losses"]
    assert "MiB per device" in capsys.readouterr().out
    assert sorted(losses[True]) == [1, 2, 3]
    for step in losses[False]:
        np.testing.assert_allclose(losses[True][step], losses[False][step], rtol=1e-5, atol=1e-6)
    assert (world["index"] / "passage_tokens").is_dir()


def test_config_states_and_enforces_the_per_device_bytes(tmp_path):
    from rag_jax.config import load_config_module
    from rag_jax.train import config_checks as C

    from pathlib import Path

    cfg = load_config_module(Path(__file__).resolve().parents[1] / "configs" / "tiny.py").get_config()
    (tmp_path / "manifest.json").write_text(json.dumps({"count": 1_000_000, "dim": 768}))
    cfg.retrieval.index_dir = str(tmp_path)
    cfg.retrieval.on_device = True
    cfg.mesh.shape = (2, 2, 2)
    C.validate(cfg, num_devices=8)  # CPU reports no memory limit and the budget is 0: unchecked
    # 1M rows over the 4 (data, fsdp) shards: 250000 x (768 x 4 + 46 x 4 + 4) bytes = 0.759 GiB per device.
    cfg.retrieval.device_budget_gib = 0.5
    with pytest.raises(ValueError, match=r"^config\.retrieval\.on_device: the on-device index needs 0\.759 GiB per "
                                         r"device \(1000000 rows over 4 shards.*over the budget of 0\.500 GiB"):
        C.validate(cfg, num_devices=8)
    cfg.retrieval.device_dtype = "bfloat16"  # 250000 x (1536 + 188) bytes = 0.401 GiB
    C.validate(cfg, num_devices=8)
    for field, value in (("device_dtype", "float16"), ("approx_recall", 1.0), ("device_budget_gib", -1.0)):
        bad = load_config_module(Path(__file__).resolve().parents[1] / "configs" / "tiny.py").get_config()
        bad.retrieval.on_device = True
        bad.retrieval[field] = value
        with pytest.raises(ValueError, match=f"config.retrieval.{field}"):
            C.validate(bad, num_devices=8)
    cfg.train.closed_book = True
    with pytest.raises(ValueError, match="config.retrieval.on_device: a closed-book run"):
        C.validate(cfg, num_devices=8)


@pytest.mark.slow  # three training processes (~3-5 min on 2 loaded cores)
def test_two_processes_on_device_equal_one_process_host(world, tmp_path):
    """Two real processes x 4 devices with the index sharded across both (each
    reads only its own rows of the memory-mapped vectors and token table)
    train with the per-step losses of one process retrieving on the host."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_multiprocess_training import _env, _finish, _metrics, _one_process, _train_args

    _finish(_one_process(world, tmp_path / "host", steps=4))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "launch" / "local_cluster.py"), "-n", "2", "--devices-per-process", "4", "--",
           str(root / "launch" / "train.py"), *_train_args(world, tmp_path / "device", steps=4),
           "--config.retrieval.on_device=True"]
    out = _finish(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert "MiB per device" in out
    want, _ = _metrics(tmp_path / "host")
    got, _ = _metrics(tmp_path / "device")
    assert sorted(got) == [1, 2, 3, 4]
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-5), (s, got, want)
