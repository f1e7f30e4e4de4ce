"""The RAG task with retrieval inside the step (``retrieval.on_device``).

The host feeds only question tokens (question-encoder tokenizer), the
question's generator tokens (``tail(doc_sep) + question``) and the labels.
The step computes the question embedding once, with the step's dropout as HF
does, and uses it both to search the on-device index and for
``doc_scores = q . d`` (the one path gradients reach the question encoder
by); the contexts are assembled from the passage token table on device.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rag_jax.parallel.rules import fit_spec
from rag_jax.rag import marginals
from rag_jax.rag.inputs import question_string
from rag_jax.rag.model import nll, question_embedding
from rag_jax.retrieval.on_device import DeviceIndex, assemble_contexts, place_index, retrieve
from rag_jax.retrieval.token_table import ContextFormat, encode_rows, ensure_table
from rag_jax.train.task import RagTask


def context_format(task: RagTask) -> ContextFormat:
    s = task.config.rag
    return ContextFormat(s.prefix, s.title_sep, s.doc_sep, task.max_combined_length)


def batch_axes(rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    """The mesh axes the ``batch`` logical axis maps to: the index rows are split over the same ones."""
    axes = dict(rules).get("batch")
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def open_device_index(task: RagTask, mesh: Mesh, axes: tuple[str, ...], dtype: str = "float32",
                      progress: bool = True) -> DeviceIndex:
    """The task's index on the mesh: its vectors, and its passage token table
    (built inside the index directory first if this tokenizer and format have none)."""
    loaded = task.retriever.index
    if loaded.corpus is None:
        raise FileNotFoundError(f"{loaded.path}: on-device retrieval needs the corpus to tokenize its passages")
    table = ensure_table(loaded.path, loaded.corpus, task.generator_tokenizer, context_format(task), progress)
    return place_index(loaded.embeddings, table.tokens, table.lengths, mesh, axes, dtype)


@dataclasses.dataclass
class OnDeviceTask:
    """``train_batch`` and ``loss_fn`` of ``task`` with retrieval in the step."""

    task: RagTask
    mesh: Mesh
    axes: tuple[str, ...]  # mesh axes the index rows and the batch are split over
    index: DeviceIndex  # its arrays are passed to loss_fn as ``index`` (never closed over: no constants)
    approx_recall: float = 0.0

    def __post_init__(self) -> None:
        if self.task.closed_book:
            raise ValueError("on-device retrieval has nothing to retrieve for a closed-book task")

    def train_batch(self, questions: Sequence[str], answers: Sequence[str]) -> dict[str, np.ndarray]:
        t = self.task
        questions = [str(q) for q in questions]
        for i, q in enumerate(questions):
            if not q.strip():
                raise ValueError(f"question {i} is empty")
        q = t.question_tokenizer(questions, max_length=t.max_question_length)
        doc_sep = t.config.rag.doc_sep
        gen_ids, gen_lengths = encode_rows(t.generator_tokenizer, [question_string(x, doc_sep) for x in questions],
                                           t.max_combined_length - 2)
        return {
            "question_input_ids": q["input_ids"],
            "question_attention_mask": q["attention_mask"],
            "question_token_type_ids": q["token_type_ids"],
            "question_generator_ids": gen_ids,
            "question_generator_lengths": gen_lengths,
            "labels": t.tokenize_targets(answers),
        }

    def contexts(self, q: jax.Array, batch: dict[str, jax.Array], index: dict[str, jax.Array]
                 ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
        """Retrieved rows (``retrieve``'s dict) and the generator inputs ``[B, K, L]`` ids and mask."""
        t = self.task
        got = retrieve(q, index, mesh=self.mesh, axes=self.axes, count=self.index.count, k=t.n_docs,
                       approx_recall=self.approx_recall)
        tok = t.generator_tokenizer
        ids, mask = assemble_contexts(got["tokens"], got["lengths"], batch["question_generator_ids"],
                                      batch["question_generator_lengths"], length=t.max_combined_length,
                                      bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
        # The search's results are replicated; the generator passes run on each device's own examples.
        spec = NamedSharding(self.mesh, fit_spec(P(self.axes), ids.shape, self.mesh))
        return got, jax.lax.with_sharding_constraint(ids, spec), jax.lax.with_sharding_constraint(mask, spec)

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
                index: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        """Mean marginal NLL, as ``RagTask.loss_fn`` with the retrieval moved inside."""
        t = self.task
        if t.freeze_question_encoder:
            params = {**params, "question_encoder": jax.lax.stop_gradient(params["question_encoder"])}
        r_q, r_g = jax.random.split(rng)  # as rag_loss: the same dropout streams as host retrieval
        q = question_embedding(t.config.question_encoder, params["question_encoder"], batch["question_input_ids"],
                               batch["question_attention_mask"], batch.get("question_token_type_ids"), r_q)
        got, ids, mask = self.contexts(q, batch, index)
        scores = marginals.doc_scores(q, jax.lax.stop_gradient(got["vectors"]))
        losses = nll(t.config, params, ids, mask, scores, batch["labels"], t.variant, t.label_smoothing,
                     t.exclude_bos_score, r_g)
        return marginals.reduce(losses, "mean"), {}
