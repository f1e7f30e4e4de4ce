"""``retrieve_contexts``, the one questions -> generator inputs path: HF's
``RagRetriever.postprocess_docs`` on an HF RAG directory with non-default
``title_sep``/``doc_sep``/generator ``prefix``/``max_combined_length``, the
question embedding against HF's, closed book, search-only, and the config
defaults of ``RagPipeline``."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import rag_tiny as T
import torch

import rag_jax
from rag_jax.data.tokenize import load_tokenizer
from rag_jax.data.train_tokenizer import train_bart_tokenizer
from rag_jax.infer import RagPipeline
from rag_jax.rag.inputs import retrieve_contexts
from rag_jax.rag.model import question_embedder
from rag_jax.retrieval.retriever import Retrieved

K, L = 3, 40
WORDS = "who where when was born the river city capital of in flows through founded is a".split()
TITLES = ['"Quell"', "Osterby", "Miradel  town", "Trask Holdings", "Varga"]
TEXTS = [
    "The river Quell flows through Osterby and  on to the sea.",
    "Osterby is a city.",
    "Miradel is where Vorlan Petrescu was born in 1921, a long time ago in a small town.",
    "Trask Holdings was founded by Ilse Varga.",
    "Ilse Varga founded Trask Holdings in Osterby.",
]
QUESTIONS = ["who founded the city", "where was the river born"]


class TableRetriever:
    """Exact top-k over a fixed table of document vectors (a stand-in for ``Retriever``)."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors
        self.index = SimpleNamespace(dim=vectors.shape[1])

    def retrieve(self, q: np.ndarray, k: int) -> Retrieved:
        scores = np.asarray(q, np.float32) @ self.vectors.T
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return Retrieved(
            rows=rows, ids=np.asarray(rows + 100).astype(str).astype(object),
            scores=np.take_along_axis(scores, rows, 1), doc_embeds=self.vectors[rows],
            titles=[[TITLES[r] for r in row] for row in rows], texts=[[TEXTS[r] for r in row] for row in rows],
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    hf = T.build("sequence", n_docs=K, title_sep=" | ", doc_sep=" ## ", max_combined_length=L)
    hf.save_pretrained(root / "rag")
    cfg = json.loads((root / "rag" / "config.json").read_text())
    # HF's retriever reads the generator's prefix; the RAG-level one is never read.
    cfg["generator"]["prefix"] = "answer: "
    cfg["prefix"] = "ignored: "
    (root / "rag" / "config.json").write_text(json.dumps(cfg))

    qdir = root / "qtok"
    qdir.mkdir()
    (qdir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    seps = ["answer: Osterby | a city ## where"]  # the trained BPE knows only the characters it saw
    gdir = train_bart_tokenizer((TEXTS + QUESTIONS + seps) * 10, root / "gtok", vocab_size=300, min_frequency=1)
    rag = rag_jax.load_rag(root / "rag")
    rag.question_tokenizer = load_tokenizer(qdir, "bert")
    rag.generator_tokenizer = load_tokenizer(gdir, "bart")
    docs = np.random.default_rng(0).normal(size=(len(TEXTS), 16)).astype(np.float32)
    return {"root": root, "hf": hf, "rag": rag, "gdir": gdir, "retriever": TableRetriever(docs)}


def test_hf_dir_settings_are_loaded(setup):
    s = setup["rag"].config.rag
    assert (s.title_sep, s.doc_sep, s.prefix, s.max_combined_length, s.n_docs) == (" | ", " ## ", "answer: ", L, K)


def test_pipeline_contexts_match_hf_postprocess_docs(setup):
    from transformers import BartTokenizerFast, RagConfig
    from transformers.models.rag.retrieval_rag import RagRetriever

    rag = setup["rag"]
    pipe = RagPipeline(rag, setup["retriever"], max_question_length=16)  # the tiny encoder has 32 positions
    assert (pipe.n_docs, pipe.max_combined_length) == (K, L)  # the HF config's defaults
    r = pipe.retrieve(QUESTIONS)
    assert r.context_input_ids.shape == (len(QUESTIONS), K, L)

    # HF's own postprocess_docs, on the config transformers reads from the same directory.
    hf_cfg = RagConfig.from_pretrained(setup["root"] / "rag")
    hf_retriever = SimpleNamespace(config=hf_cfg, generator_tokenizer=BartTokenizerFast.from_pretrained(setup["gdir"]))
    docs = [{"title": r.titles[i], "text": r.texts[i]} for i in range(len(QUESTIONS))]
    ids, mask = RagRetriever.postprocess_docs(
        hf_retriever, docs, QUESTIONS, getattr(hf_cfg.generator, "prefix", None), K, return_tensors="np"
    )
    np.testing.assert_array_equal(r.context_input_ids.reshape(-1, L), ids)
    np.testing.assert_array_equal(r.context_attention_mask.reshape(-1, L), mask)
    assert mask.all(axis=1).any(), "some context must be truncated to max_combined_length"
    text = rag.generator_tokenizer.decode(r.context_input_ids[0, :1])[0]
    assert text.startswith("answer: ") and " | " in text

    # doc_scores = q . d with q from HF's question encoder (the jitted embedding is exact).
    q = rag.question_tokenizer(QUESTIONS, max_length=pipe.max_question_length)
    with torch.no_grad():
        hf_q = setup["hf"].rag.question_encoder(torch.as_tensor(q["input_ids"], dtype=torch.long),
                                                attention_mask=torch.as_tensor(q["attention_mask"]))[0].numpy()
    want = np.einsum("bd,bkd->bk", hf_q, r.doc_embeds)
    np.testing.assert_allclose(r.doc_scores, want, rtol=1e-4, atol=1e-4)


def test_one_jitted_embedding_per_config(setup):
    rag = setup["rag"]
    qc = rag.config.question_encoder
    assert question_embedder(qc) is question_embedder(qc)
    before = question_embedder.cache_info().misses
    kw = dict(question_config=qc, question_params=rag.params["question_encoder"],
              question_tokenizer=rag.question_tokenizer, retriever=setup["retriever"], n_docs=2,
              max_question_length=8)
    a = retrieve_contexts(QUESTIONS, **kw)
    b = retrieve_contexts(QUESTIONS[::-1], **kw)
    assert question_embedder.cache_info().misses == before
    np.testing.assert_array_equal(a.rows[::-1], b.rows)
    # Search ranks only: no generator tokenizer, no contexts.
    assert a.context_input_ids is None and a.context_attention_mask is None
    assert a.ids.shape == (2, 2) and a.titles[0][0] in {t for t in TITLES}


def test_closed_book_is_the_question_alone(setup):
    rag = setup["rag"]
    kw = dict(question_config=rag.config.question_encoder, question_params=None,
              question_tokenizer=rag.question_tokenizer, retriever=None, n_docs=5, max_question_length=8)
    r = retrieve_contexts(QUESTIONS, generator_tokenizer=rag.generator_tokenizer, max_combined_length=16,
                          settings=rag.config.rag, **kw)
    want = rag.generator_tokenizer(QUESTIONS, max_length=16)
    np.testing.assert_array_equal(r.context_input_ids[:, 0], want["input_ids"])  # no prefix, no separators
    np.testing.assert_array_equal(r.context_attention_mask[:, 0], want["attention_mask"])
    assert r.context_input_ids.shape == (2, 1, 16)
    assert r.doc_scores.shape == (2, 1) and not r.doc_scores.any()
    assert r.doc_embeds.shape == (2, 1, rag.config.question_encoder.output_dim) and not r.doc_embeds.any()
    assert (r.rows == -1).all() and r.texts == [[""], [""]]
    np.testing.assert_array_equal(r.question_input_ids, rag.question_tokenizer(QUESTIONS, max_length=8)["input_ids"])
    with pytest.raises(ValueError, match="generator tokenizer"):
        retrieve_contexts(QUESTIONS, **kw)


def test_empty_question_is_rejected(setup):
    rag = setup["rag"]
    with pytest.raises(ValueError, match="question 1 is empty"):
        RagPipeline(rag, setup["retriever"]).retrieve(["who", "  "])


def test_prefix_round_trips_through_the_generator_config(setup, tmp_path):
    from transformers import RagSequenceForGeneration

    rag = setup["rag"]
    rag.save_hf(tmp_path / "out")
    assert RagSequenceForGeneration.from_pretrained(tmp_path / "out").generator.config.prefix == "answer: "
    assert rag_jax.load_rag(tmp_path / "out").config == rag.config
