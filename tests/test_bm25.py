"""BM25 and hybrid retrieval: scores against rank-bm25 and the Lucene formula,
fusion against hand-computed rankings, the BM25 build through the CLI (resume,
identical build, changed corpus), and training with a frozen BM25 retriever."""
import json
import math
import signal
import subprocess
import sys
import os

import numpy as np
import pytest

from rag_jax.cli import main as cli_main
from rag_jax.retrieval.bm25 import Bm25Index, Bm25Params, passage_text
from rag_jax.retrieval.corpus import Passage, write_corpus
from rag_jax.retrieval.faults import ENV
from rag_jax.retrieval.fusion import Fusion, fuse, rrf_one, score_one
from rag_jax.retrieval.index import build_index, load_index
from rag_jax.retrieval.retriever import Retriever

DOCS = [
    ("Rivers", "The Vell river flows north through the valley to the sea."),
    ("Osterby", "Osterby is a city on the river. The city has a harbour and a market."),
    ("Trask Holdings", "Ilse Varga founded Trask Holdings in Osterby; the company builds ships."),
    ("Harbours", "A harbour is a sheltered place where ships stay; many cities have harbours."),
    ("Markets", "The market of the city sells fish from the harbour and grain from the valley."),
    ("Zephyrine", "The zephyrine lamp was invented in a small workshop."),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bm25")
    return write_corpus([Passage(str(i + 1), t, x) for i, (t, x) in enumerate(DOCS)], root / "corpus", progress=False)


def test_rare_word_ranks_its_passage_first(corpus):
    index = Bm25Index.build(corpus, progress=False)
    rows, scores = index.search(["what was invented in the workshop, the zephyrine?", "who founded the company"], 3)
    assert rows[0, 0] == 5 and scores[0, 0] > scores[0, 1]
    assert rows[1, 0] == 2  # "founded" and "company" occur only there
    assert np.all(np.diff(scores, axis=1) <= 0)


def _tokens(index, texts):
    return index.tokenizer.tokenize(texts, update_vocab=False, return_as="string", show_progress=False)


def test_scores_equal_rank_bm25_okapi_and_the_lucene_formula(corpus):
    from rank_bm25 import BM25Okapi

    k1, b = 1.2, 0.75
    questions = ["city harbour river", "ships founded valley market", "zephyrine lamp"]
    # Robertson's variant is rank-bm25's BM25Okapi without its constant factor (k1 + 1). Every word of
    # these questions is in fewer than half the passages, so Okapi's idf floor never applies.
    robertson = Bm25Index.build(corpus, Bm25Params(k1=k1, b=b, method="robertson"), progress=False)
    docs = _tokens(robertson, [passage_text(t, x) for t, x in DOCS])
    okapi = BM25Okapi(docs, k1=k1, b=b)
    want = np.stack([okapi.get_scores(q) for q in _tokens(robertson, questions)])
    np.testing.assert_allclose(robertson.scores(questions) * (k1 + 1), want, rtol=1e-5)

    # The default, Lucene's variant, against its formula computed here.
    lucene = Bm25Index.build(corpus, Bm25Params(k1=k1, b=b), progress=False)
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    want = np.zeros((len(questions), n))
    for i, q in enumerate(_tokens(lucene, questions)):
        for w in q:
            df = sum(w in d for d in docs)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            for j, d in enumerate(docs):
                tf = d.count(w)
                want[i, j] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    np.testing.assert_allclose(lucene.scores(questions), want, rtol=1e-5)
    assert ["harbour", "river"] == sorted(_tokens(lucene, ["the Harbours of rivers"])[0])  # stemmed, no stopwords


def test_rrf_and_score_fusion_on_hand_computed_examples():
    # dense ranks rows 7, 3, 5; sparse ranks 3, 9, 7 (c = 60):
    #   3: 1/62 + 1/61 = 0.032519   7: 1/61 + 1/63 = 0.032266   5: 1/63 = 0.015873   9: 1/62 = 0.016129
    rows, fused = rrf_one([np.array([7, 3, 5]), np.array([3, 9, 7])], 4, c=60.0)
    assert rows.tolist() == [3, 7, 9, 5]
    np.testing.assert_allclose(fused, [1 / 62 + 1 / 61, 1 / 61 + 1 / 63, 1 / 62, 1 / 63])
    # A tie (one list each, same rank) keeps the dense list's document first.
    assert rrf_one([np.array([1, 2]), np.array([4, 5])], 4, c=60.0)[0].tolist() == [1, 4, 2, 5]
    # Score fusion, w = 0.25: dense 7:1.0 3:0.5 5:0.0 (from 4, 3, 2); sparse 3:1.0 9:0.0 7:0.25 (from 9, 1, 3)
    #   3: .25*.5 + .75*1 = .875   7: .25 + .75*.25 = .4375   5: 0   9: 0
    rows, fused = score_one((np.array([7, 3, 5]), np.array([4.0, 3.0, 2.0])),
                            (np.array([3, 9, 7]), np.array([9.0, 1.0, 3.0])), 3, weight=0.25)
    assert rows.tolist() == [3, 7, 5]
    np.testing.assert_allclose(fused, [0.875, 0.4375, 0.0])
    batch = fuse(Fusion("rrf"), (np.array([[7, 3, 5]]), np.zeros((1, 3))), (np.array([[3, 9, 7]]), np.zeros((1, 3))), 2)
    assert batch[0].tolist() == [[3, 7]]


def test_hybrid_retriever_fuses_and_keeps_dense_vectors(corpus, tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(len(DOCS), 8)).astype(np.float32)
    dense = build_index(vecs, tmp_path / "dense", kind="exact", corpus=corpus, include_corpus=True)
    assert cli_main(["build-index", "--corpus", str(corpus.path), "--index-type", "bm25", "--out",
                     str(tmp_path / "bm25"), "--no-progress"]) == 0
    q = vecs[[0]] + 0.01  # dense side: row 0 first
    hybrid = Retriever(dense, bm25=tmp_path / "bm25", fusion=Fusion("rrf", depth=6))
    assert hybrid.needs_text and hybrid.needs_vectors
    got = hybrid.retrieve(q, 3, questions=["zephyrine lamp"])
    d_rows, _ = load_index(dense).search(q, 6)
    s_rows, _ = load_index(tmp_path / "bm25").search(["zephyrine lamp"], 6)
    assert got.rows[0].tolist() == rrf_one([d_rows[0], s_rows[0]], 3)[0].tolist()
    np.testing.assert_allclose(got.doc_embeds[0], vecs[got.rows[0]])
    np.testing.assert_allclose(got.scores[0], vecs[got.rows[0]] @ q[0], rtol=1e-6)  # q . d, not the fused score
    with pytest.raises(ValueError, match="needs the questions' text"):
        hybrid.retrieve(q, 3)


def _tsv(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for i, (title, text) in enumerate(docs):
            f.write(f'{i + 1}\t"{text}"\t{title}\n')
    return path


def test_build_index_bm25_cli_resume_identical_and_changed(tmp_path, capsys):
    tsv = _tsv(tmp_path / "psgs.tsv", DOCS)
    out = tmp_path / "idx"
    args = ["build-index", "--passages", str(tsv), "--index-type", "bm25", "--out", str(out), "--no-progress"]
    # Killed with the index finished in OUT.work, before the commit: nothing at OUT.
    env = {**os.environ, ENV: "index"}
    proc = subprocess.run([sys.executable, "-m", "rag_jax.cli", *args[:-1], "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and (tmp_path / "idx.work").is_dir()
    assert cli_main(args) == 0
    assert "reusing the finished index" in capsys.readouterr().out
    assert cli_main(["search", "--index", str(out), "--json", "-k", "2", "who founded trask holdings"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert hits[0]["title"] == "Trask Holdings" and hits[0]["score"] > hits[1]["score"]

    assert cli_main(args) == 0
    assert "already built from the same inputs" in capsys.readouterr().out
    # A changed passages file is never answered from the old index.
    _tsv(tsv, DOCS[:-1] + [("Zephyrine", "The zephyrine lamp was made in a large factory.")])
    assert cli_main(args) != 0
    assert "built from other inputs or options: passages.sha256" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert "factory" in load_index(out).corpus.text(5)
    assert load_index(out).manifest["bm25"] == {"k1": 0.9, "b": 0.4, "method": "lucene", "stemmer": "porter",
                                                 "stopwords": "english"}
    assert cli_main(args + ["--overwrite", "--encoder", str(tmp_path)]) != 0
    assert "are not used" in capsys.readouterr().err


def test_rag_loss_on_bm25_scores_gives_the_question_encoder_no_gradient():
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from rag_jax.models.bart import Bart, BartConfig
    from rag_jax.models.bert import BertConfig, DprEncoder
    from rag_jax.rag.model import RagConfig, nll, rag_loss

    qc = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                    max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    gc = BartConfig(vocab_size=24, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16,
                    dropout=0.0, init_std=0.5)
    ids = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(jax.jit(lambda r: {"question_encoder": DprEncoder(qc).init(r, ids, ids)["params"],
                                              "generator": Bart(gc).init(r, ids, ids, ids)["params"]})(
        jax.random.PRNGKey(0)))
    config = RagConfig(qc, gc)
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, 24, (2, 3, 6)).astype(np.int32)
    labels = np.array([[2, 0, 5, 7, 2], [2, 0, 9, 2, 1]], np.int32)
    batch = {"context_input_ids": ctx, "context_attention_mask": np.ones_like(ctx),
             "doc_scores": np.array([[12.5, 9.0, 3.25], [7.0, 6.5, 6.0]], np.float32), "labels": labels}

    @jax.jit
    def run(p):
        # Differentiated in the question encoder only (a generator backward pass would cost a compile here).
        loss, grads = jax.value_and_grad(
            lambda qe: rag_loss({**p, "question_encoder": qe}, batch, config=config, reduction="sum"))(
            p["question_encoder"])
        return loss, grads, nll(config, p, ctx, batch["context_attention_mask"], batch["doc_scores"], labels).sum()

    loss, grads, want = run(params)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)  # the BM25 scores are the doc scores
    # Not run at all: a gradient of exact zeros (tests/test_rag_loss.py shows it is not with doc_embeds).
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


def _bm25_world(root):
    from rag_jax.demo.world import generate_world

    world = generate_world(root / "world", seed=3, num_people=20, num_orgs=8, num_cities=8, num_countries=3,
                           num_rivers=4)
    index = root / "bm25"
    assert cli_main(["build-index", "--passages", str(world.passages), "--index-type", "bm25", "--out", str(index),
                     "--no-progress"]) == 0
    return world, index


def test_a_bm25_index_needs_a_frozen_retriever(tmp_path):
    from rag_jax.train.config_checks import validate
    from rag_jax.train.setup import check_inputs
    from tests.train_fixtures import tiny_config

    world, index = _bm25_world(tmp_path)
    cfg = tiny_config({"train": world.qa_jsonl["train"], "index": index, "encoder": ""})
    with pytest.raises(ValueError, match=r"^config.train.freeze_question_encoder: must be True with the BM25"):
        check_inputs(cfg)
    cfg.retrieval.bm25_dir, cfg.retrieval.fusion = str(index), "rrf"
    with pytest.raises(ValueError, match=r"^config.retrieval.index_dir: .* is a BM25 index; a hybrid needs a dense"):
        check_inputs(cfg)
    cfg.retrieval.bm25_dir, cfg.retrieval.fusion = "", "none"
    cfg.train.freeze_question_encoder = True
    check_inputs(cfg)
    cfg.retrieval.on_device = True
    with pytest.raises(ValueError, match=r"^config.retrieval.on_device: .* is a BM25 index"):
        validate(cfg, 1)


@pytest.mark.slow
def test_training_with_a_frozen_bm25_retriever(tmp_path):
    """Two real training steps (train_and_evaluate) on BM25 retrieval, then an
    evaluation: the question encoder stays as initialised, the generator moves."""
    import jax

    from rag_jax.train.loop import train_and_evaluate
    from rag_jax.train.setup import build_models
    from tests.train_fixtures import tiny_config

    world, index = _bm25_world(tmp_path)
    cfg = tiny_config({"train": world.qa_jsonl["train"], "index": index, "encoder": ""}, steps=2,
                      global_batch_size=2, freeze_question_encoder=True, warmup_steps=0)
    cfg.data.dev_file = str(world.qa_jsonl["dev"])
    cfg.eval.max_examples = 4
    out = train_and_evaluate(cfg, tmp_path / "work", verbose=False)
    assert all(np.isfinite(v) for v in out["losses"].values()) and "recall@1" in out["dev"]
    init = build_models(cfg, tmp_path / "work", jax.random.split(jax.random.PRNGKey(cfg.train.seed))[0]).params
    for a, b in zip(jax.tree.leaves(init["question_encoder"]), jax.tree.leaves(out["params"]["question_encoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(init["generator"]), jax.tree.leaves(out["params"]["generator"])))
    # export + ask: the inference pipeline retrieves from the BM25 index (no question vectors).
    from rag_jax.infer import RagPipeline, export_from_workdir

    export_from_workdir(cfg, tmp_path / "work", tmp_path / "model")
    answers = RagPipeline.load(tmp_path / "model").answer(["Who founded the company?"])
    assert len(answers[0].passages) == cfg.retrieval.n_docs
