"""Inference over an exported model and an index: answers with their sources.

An inference directory (``rag-jax export``) is an HF RAG directory (loadable
by ``transformers`` and ``rag_jax.load_rag``) plus ``rag_jax_inference.json``
naming the index it was trained with, the document encoder's fingerprint and
the decoding defaults. No optimizer state.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from rag_jax.rag.inputs import RetrievedContexts

INFERENCE_FILE = "rag_jax_inference.json"


@dataclass
class Answer:
    question: str
    answer: str
    passages: list[dict[str, Any]] = field(default_factory=list)  # id, title, text, score, prob


def write_inference_json(out: str | os.PathLike, *, index_dir: str | None, index_fingerprint: str | None,
                         variant: str, n_docs: int, max_question_length: int, max_combined_length: int,
                         max_target_length: int, hybrid: dict[str, Any] | None = None) -> None:
    """``hybrid``: ``{"bm25_dir", "fusion", "rrf_k", "fusion_weight", "fusion_depth"}`` of a hybrid retriever."""
    if hybrid:
        hybrid = {**hybrid, "bm25_dir": str(Path(hybrid["bm25_dir"]).resolve())}
    (Path(out) / INFERENCE_FILE).write_text(json.dumps({
        "index_dir": None if index_dir is None else str(Path(index_dir).resolve()),
        "hybrid": hybrid or None,
        "index_encoder_fingerprint": index_fingerprint,
        "variant": variant, "n_docs": n_docs, "max_question_length": max_question_length,
        "max_combined_length": max_combined_length, "max_target_length": max_target_length,
    }, indent=2) + "\n")


def index_fingerprint(index_dir: str | os.PathLike) -> str | None:
    mf = Path(index_dir) / "manifest.json"
    if not mf.is_file():
        raise FileNotFoundError(f"{index_dir}: not an index directory (no manifest.json)")
    return json.loads(mf.read_text()).get("encoder_fingerprint")


class RagPipeline:
    """Question strings in, answers with retrieved passages and doc probabilities out.

    ``n_docs`` and ``max_combined_length`` default to the model's RAG config
    (``n_docs``, ``max_combined_length``), as HF's retriever; ``load`` prefers
    the values an export recorded in ``rag_jax_inference.json``."""

    def __init__(self, rag: Any, retriever: Any, n_docs: int | None = None, variant: str | None = None,
                 max_question_length: int = 64, max_combined_length: int | None = None) -> None:
        if rag.question_tokenizer is None or rag.generator_tokenizer is None:
            raise ValueError("the model directory lacks question_encoder_tokenizer/ or generator_tokenizer/")
        if retriever.index.dim is not None and retriever.index.dim != rag.config.question_encoder.output_dim:
            raise ValueError(
                f"{retriever.path}: index dimension {retriever.index.dim} does not match the question "
                f"encoder's {rag.config.question_encoder.output_dim} (index built with another encoder?)"
            )
        self.rag = rag
        self.retriever = retriever
        self.n_docs = n_docs or rag.config.rag.n_docs
        self.variant = variant or rag.config.rag.variant
        self.max_question_length = max_question_length
        self.max_combined_length = max_combined_length or rag.config.rag.max_combined_length

    @classmethod
    def load(cls, model_dir: str | os.PathLike, index_dir: str | os.PathLike | None = None, **kw: Any) -> "RagPipeline":
        from rag_jax.rag.model import load_rag
        from rag_jax.retrieval.index import IndexMismatchError
        from rag_jax.retrieval.retriever import Retriever

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: model directory does not exist")
        info = {}
        if (model_dir / INFERENCE_FILE).is_file():
            info = json.loads((model_dir / INFERENCE_FILE).read_text())
        index_dir = index_dir or info.get("index_dir")
        if not index_dir:
            raise ValueError(f"{model_dir}: no index given and none recorded in {INFERENCE_FILE}")
        if not Path(index_dir).is_dir():
            raise FileNotFoundError(f"{index_dir}: index directory does not exist")
        want = info.get("index_encoder_fingerprint")
        have = index_fingerprint(index_dir)
        if want and have and want != have and not kw.pop("allow_other_encoder", False):
            raise IndexMismatchError(
                f"{index_dir}: passages were encoded with document encoder {have[:16]}..., but this model "
                f"was trained against an index from encoder {want[:16]}... (rebuild the index with that encoder)"
            )
        kw.pop("allow_other_encoder", None)
        rag = load_rag(model_dir)
        defaults = {k: info[k] for k in ("n_docs", "variant", "max_question_length", "max_combined_length") if k in info}
        defaults.update({k: v for k, v in kw.items() if v is not None})
        hybrid = info.get("hybrid") if index_dir == info.get("index_dir") else None  # another --index: alone
        if hybrid:
            from rag_jax.retrieval.fusion import Fusion

            retriever = Retriever(index_dir, bm25=hybrid["bm25_dir"], fusion=Fusion(
                hybrid["fusion"], hybrid["rrf_k"], hybrid["fusion_weight"], hybrid["fusion_depth"]))
        else:
            retriever = Retriever(index_dir)
        pipe = cls(rag, retriever, **defaults)
        pipe.index_encoder_fingerprint = want
        return pipe

    index_encoder_fingerprint: str | None = None

    def swap_index(self, index_dir: str | os.PathLike) -> None:
        """Hot swap: answer from another index; model params are untouched.

        The new index must come from the same document encoder as the one the
        model was trained with (checked when the export recorded it)."""
        self.retriever.swap(index_dir, encoder_fingerprint=self.index_encoder_fingerprint)

    def retrieve(self, questions: Sequence[str], n_docs: int | None = None) -> RetrievedContexts:
        """The model's generator inputs for ``questions``, formatted by its RAG config."""
        from rag_jax.rag.inputs import retrieve_contexts

        return retrieve_contexts(
            questions, question_config=self.rag.config.question_encoder,
            question_params=self.rag.params["question_encoder"], question_tokenizer=self.rag.question_tokenizer,
            retriever=self.retriever, n_docs=n_docs or self.n_docs, max_question_length=self.max_question_length,
            generator_tokenizer=self.rag.generator_tokenizer, max_combined_length=self.max_combined_length,
            settings=self.rag.config.rag,
        )

    def answer(self, questions: Sequence[str], num_beams: int = 1, max_length: int = 25,
               decoding: str = "thorough", n_docs: int | None = None, variant: str | None = None) -> list[Answer]:
        r = self.retrieve(questions, n_docs)
        out = self.rag.generate(r.context_input_ids, r.context_attention_mask, r.doc_scores,
                                variant=variant or self.variant, num_beams=num_beams, max_length=max_length,
                                decoding=decoding)
        texts = self.rag.generator_tokenizer.decode(np.asarray(out))
        scores = np.asarray(r.doc_scores, np.float64)
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        answers = []
        for i, q in enumerate(questions):
            passages = [
                {"id": str(r.ids[i][j]), "title": r.titles[i][j], "text": r.texts[i][j],
                 "score": float(scores[i, j]), "prob": float(probs[i, j])}
                for j in range(scores.shape[1])
            ]
            answers.append(Answer(q, texts[i], passages))
        return answers


def export_from_workdir(config: Any, workdir: str | os.PathLike, out: str | os.PathLike) -> None:
    """A training workdir's latest checkpoint -> inference directory ``out``
    (HF RAG files + ``rag_jax_inference.json``; no optimizer state)."""
    # Imported here: the training stack (orbax, data pipeline) is not needed to
    # load and query an exported model.
    import jax

    from rag_jax.rag.model import RagModel
    from rag_jax.train.setup import build_models, make_task, restore_params

    models = build_models(config, workdir, jax.random.PRNGKey(config.train.seed))
    params, _ = restore_params(config, workdir, models)
    task = make_task(config, models)
    if jax.process_index() != 0:
        return  # every process of a multi-process export restores; one writes
    RagModel(task.config, params, models.question_tokenizer, models.generator_tokenizer).save_hf(out)
    index_dir = config.retrieval.index_dir or None
    write_inference_json(
        out, index_dir=index_dir, index_fingerprint=index_fingerprint(index_dir) if index_dir else None,
        variant=config.model.variant, n_docs=config.retrieval.n_docs,
        max_question_length=config.data.max_source_length, max_combined_length=config.data.max_combined_length,
        max_target_length=config.data.max_target_length,
        hybrid={k: config.retrieval[k] for k in ("bm25_dir", "fusion", "rrf_k", "fusion_weight", "fusion_depth")}
        if config.retrieval.get("bm25_dir", "") else None,
    )
