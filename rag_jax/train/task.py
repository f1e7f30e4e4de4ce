"""The RAG training task: host-side batch building (encode questions with the
current params, retrieve, tokenize) around the pure ``rag_loss``.

Per step (DESIGN.md section 1) the questions are encoded on the host side
with the *current* question-encoder params to retrieve top-k passages; inside
the jitted step ``rag_loss`` recomputes the question embedding so gradients
reach the question encoder through ``doc_scores = q . d`` (document encoder
and index frozen, paper section 2.4). Closed-book BART is the same program
with one "document" that is the question itself and a zero document vector.
With a BM25 index (the paper's frozen-BM25 ablation) the batch carries the
BM25 scores as ``doc_scores`` instead of ``doc_embeds``, and the question
encoder is not run at all.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.data.padding import trim_to_buckets
from rag_jax.data.tokenize import TextTokenizer
from rag_jax.parallel.host_arrays import process_max
from rag_jax.rag.inputs import RetrievedContexts, retrieve_contexts
from rag_jax.rag.labels import LabelSpace, predict_labels
from rag_jax.rag.model import VARIANTS, RagConfig, nll, rag_loss


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
    # (params, ids, mask, token types) -> [B, D] host embeddings of this
    # process's questions; None: the jitted single-program embedder.
    embed_questions: Callable[..., np.ndarray] | None = None
    # config.task: what the targets are and how predictions are scored.
    kind: str = "qa"
    answer_match: str = "string"
    labels: LabelSpace | None = None  # classification only
    # Bucketed padding (data/padding.py): per group ("question", "context",
    # "target") the lengths it may be cut to, each ending with its maximum;
    # None: everything padded to the maximum (HF).
    length_buckets: Mapping[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.closed_book and self.retriever is None:
            raise ValueError("a retriever (index) is required unless closed_book=True")
        if (self.kind == "classification") != (self.labels is not None):
            raise ValueError(f"a label space is needed for classification and only there (kind {self.kind!r})")

    # ------------------------------------------------------------------ host

    def tokenize_targets(self, answers: Sequence[str]) -> np.ndarray:
        """``<s> answer </s>`` padded: fed as decoder inputs, shifted inside the loss (HF finetune_rag).
        Classification: the answer is a label, trained as its one-token word."""
        texts = self.labels.target_texts(answers) if self.labels is not None else list(answers)
        return self.generator_tokenizer(texts, max_length=self.max_target_length)["input_ids"]

    def retrieve(self, question_params: Any, questions: Sequence[str], n_docs: int | None = None) -> RetrievedContexts:
        """Question tokens and the documents retrieved with the current question-encoder params."""
        return retrieve_contexts(
            questions, question_config=self.config.question_encoder, question_params=question_params,
            question_tokenizer=self.question_tokenizer, retriever=None if self.closed_book else self.retriever,
            n_docs=n_docs or self.n_docs, max_question_length=self.max_question_length,
            generator_tokenizer=self.generator_tokenizer, max_combined_length=self.max_combined_length,
            settings=self.config.rag, embed=self.embed_questions,
        )

    def train_batch(self, question_params: Any, questions: Sequence[str], answers: Sequence[str]) -> dict[str, np.ndarray]:
        """Everything the jitted step reads, as numpy arrays of one of a few
        fixed shapes (one with ``max_length`` padding, bucketed otherwise).

        With buckets, every process must call this at the same step: the
        lengths are agreed between processes (a collective)."""
        r = self.retrieve(question_params, questions)
        if r.doc_embeds is None:  # BM25: the scores are final, nothing reaches the question encoder
            batch = {
                "context_input_ids": r.context_input_ids,
                "context_attention_mask": r.context_attention_mask,
                "doc_scores": r.doc_scores,
                "labels": self.tokenize_targets(answers),
            }
        else:
            batch = {
                "question_input_ids": r.question_input_ids,
                "question_attention_mask": r.question_attention_mask,
                "question_token_type_ids": r.question_token_type_ids,
                "context_input_ids": r.context_input_ids,
                "context_attention_mask": r.context_attention_mask,
                "doc_embeds": r.doc_embeds,
                "labels": self.tokenize_targets(answers),
            }
        if not self.length_buckets:
            return batch
        return trim_to_buckets(batch, self.length_buckets, self.generator_tokenizer.pad_token_id, agree=process_max)

    def predict_labels(self, generator_params: Any, r: RetrievedContexts) -> np.ndarray:
        """Classification: the arg-max label's index per question ``[B]`` (rag/labels.py)."""
        if self.labels is None:
            raise ValueError(f"predict_labels is for task.kind 'classification', not {self.kind!r}")
        return predict_labels(self.config.generator, generator_params, r.context_input_ids,
                              r.context_attention_mask, r.doc_scores, self.labels)

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
