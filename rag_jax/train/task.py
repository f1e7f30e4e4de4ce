"""The RAG training task: host-side batch building (encode questions with the
current params, retrieve, tokenize) around the pure ``rag_loss``.

Per step (DESIGN.md section 1) the questions are encoded on the host side
with the *current* question-encoder params to retrieve top-k passages; inside
the jitted step ``rag_loss`` recomputes the question embedding so gradients
reach the question encoder through ``doc_scores = q . d`` (document encoder
and index frozen, paper section 2.4). Closed-book BART is the same program
with one "document" that is the question itself and a zero document vector.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.data.tokenize import TextTokenizer
from rag_jax.rag.inputs import build_context_strings
from rag_jax.rag.model import VARIANTS, RagConfig, nll, question_embedding, rag_loss


@dataclasses.dataclass
class RagTask:
    config: RagConfig
    question_tokenizer: TextTokenizer
    generator_tokenizer: TextTokenizer
    retriever: Any  # rag_jax.retrieval.retriever.Retriever; None when closed_book
    variant: str = "sequence"
    n_docs: int = 5
    max_question_length: int = 64
    max_combined_length: int = 300
    max_target_length: int = 25
    label_smoothing: float = 0.0
    exclude_bos_score: bool = False
    closed_book: bool = False
    freeze_question_encoder: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.closed_book and self.retriever is None:
            raise ValueError("a retriever (index) is required unless closed_book=True")
        qc = self.config.question_encoder
        self._encode = jax.jit(lambda p, i, m, t: question_embedding(qc, p, i, m, t))

    # ------------------------------------------------------------------ host

    def tokenize_targets(self, answers: Sequence[str]) -> np.ndarray:
        """``<s> answer </s>`` padded: fed as decoder inputs, shifted inside the loss (HF finetune_rag)."""
        return self.generator_tokenizer(list(answers), max_length=self.max_target_length)["input_ids"]

    def retrieve(self, question_params: Any, questions: Sequence[str], n_docs: int | None = None) -> dict[str, Any]:
        """Question tokens and the retrieved documents (contexts, stored vectors, texts)."""
        for i, q in enumerate(questions):
            if not str(q).strip():
                raise ValueError(f"question {i} of the batch is empty")
        k = n_docs or self.n_docs
        b = len(questions)
        q = self.question_tokenizer(list(questions), max_length=self.max_question_length)
        out: dict[str, Any] = {
            "question_input_ids": q["input_ids"],
            "question_attention_mask": q["attention_mask"],
            "question_token_type_ids": q["token_type_ids"],
        }
        if self.closed_book:
            ctx = self.generator_tokenizer(list(questions), max_length=self.max_combined_length)
            out.update(
                context_input_ids=ctx["input_ids"][:, None],
                context_attention_mask=ctx["attention_mask"][:, None],
                doc_embeds=np.zeros((b, 1, self.config.question_encoder.output_dim), np.float32),
                doc_scores=np.zeros((b, 1), np.float32),
                doc_rows=np.full((b, 1), -1, np.int64),
                titles=[[""] for _ in range(b)],
                texts=[[""] for _ in range(b)],
            )
            return out
        vectors = np.asarray(
            self._encode(question_params, q["input_ids"], q["attention_mask"], q["token_type_ids"])
        )
        got = self.retriever.retrieve(vectors, k)
        strings = build_context_strings(got.titles, got.texts, list(questions))
        ctx = self.generator_tokenizer([s for row in strings for s in row], max_length=self.max_combined_length)
        out.update(
            context_input_ids=ctx["input_ids"].reshape(b, k, -1),
            context_attention_mask=ctx["attention_mask"].reshape(b, k, -1),
            doc_embeds=np.asarray(got.doc_embeds, np.float32),
            doc_scores=np.asarray(got.scores, np.float32),
            doc_rows=np.asarray(got.rows),
            doc_ids=got.ids,
            titles=got.titles,
            texts=got.texts,
        )
        return out

    def train_batch(self, question_params: Any, questions: Sequence[str], answers: Sequence[str]) -> dict[str, np.ndarray]:
        """Everything the jitted step reads, as fixed-shape numpy arrays."""
        r = self.retrieve(question_params, questions)
        keys = ("question_input_ids", "question_attention_mask", "question_token_type_ids",
                "context_input_ids", "context_attention_mask", "doc_embeds")
        batch = {k: r[k] for k in keys}
        batch["labels"] = self.tokenize_targets(answers)
        return batch

    # ------------------------------------------------------------------ pure

    def loss_fn(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        """Mean marginal NLL over the batch, with dropout from ``rng``."""
        if self.closed_book:
            # One "document" (the question) with prior 1: plain BART NLL; the
            # question encoder is not run at all.
            ids = batch["context_input_ids"]
            losses = nll(
                self.config, params, ids, batch["context_attention_mask"],
                jnp.zeros(ids.shape[:2], jnp.float32), batch["labels"], self.variant,
                self.label_smoothing, self.exclude_bos_score, rng,
            )
            return jnp.mean(losses), {}
        if self.freeze_question_encoder:
            # No backward pass through a frozen retriever.
            params = {**params, "question_encoder": jax.lax.stop_gradient(params["question_encoder"])}
        loss = rag_loss(
            params, batch, config=self.config, variant=self.variant, epsilon=self.label_smoothing,
            exclude_bos_score=self.exclude_bos_score, reduction="mean", dropout_rng=rng,
        )
        return loss, {}
