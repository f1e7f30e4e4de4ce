"""``RagModel``: a DPR question encoder + BART generator with RAG marginals.

The methods are thin wrappers over pure functions of ``params`` (a dict
``{"question_encoder": ..., "generator": ...}``) that the training code jits
with shardings: ``doc_logits``, ``nll``, ``rag_loss``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.hf import io as hf_io, rag as hf_rag
from rag_jax.data.tokenize import TextTokenizer, maybe_load_tokenizer, stage_tokenizer_files
from rag_jax.models.bart import Bart, BartConfig
from rag_jax.models.bert import BertConfig, DprEncoder
from rag_jax.rag import marginals
from rag_jax.rag.settings import RagSettings

VARIANTS = ("sequence", "token")


@dataclasses.dataclass(frozen=True)
class RagConfig:
    question_encoder: BertConfig | None
    generator: BartConfig
    rag: RagSettings = RagSettings()

    # HF resolves special ids at the RAG level first, then the generator's.
    @property
    def pad_token_id(self) -> int:
        p = self.rag.pad_token_id
        return self.generator.pad_token_id if p is None else p

    @property
    def bos_token_id(self) -> int | None:
        # HF get_nll uses ``config.bos_token_id or generator.bos_token_id``: a
        # RAG-level 0 falls through to the generator's.
        return self.rag.bos_token_id or self.generator.bos_token_id

    @property
    def eos_token_id(self) -> int:
        e = self.rag.eos_token_id
        return self.generator.eos_token_id if e is None else e

    @property
    def decoder_start_token_id(self) -> int:
        d = self.rag.decoder_start_token_id
        return self.generator.decoder_start_token_id if d is None else d


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------


def doc_logits(
    gen_config: BartConfig,
    gen_params: Any,
    context_input_ids: jax.Array,
    context_attention_mask: jax.Array,
    decoder_input_ids: jax.Array,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Per-document generator logits ``[B, K, T, V]`` (float32): one BART pass
    per document, ``jax.vmap``-ped over the document axis; the decoder inputs
    ``[B, T]`` are shared by all documents of an example."""
    model = Bart(gen_config)
    ctx = jnp.asarray(context_input_ids, jnp.int32)
    mask = jnp.asarray(context_attention_mask, jnp.int32)
    dec = jnp.asarray(decoder_input_ids, jnp.int32)
    k = ctx.shape[1]
    deterministic = dropout_rng is None
    rngs = jax.random.split(dropout_rng, k) if dropout_rng is not None else jnp.zeros((k, 2), jnp.uint32)

    def one_doc(ids: jax.Array, m: jax.Array, r: jax.Array) -> jax.Array:
        return model.apply(
            {"params": gen_params}, ids, m, dec, deterministic=deterministic,
            rngs=None if deterministic else {"dropout": r},
        )

    return jax.vmap(one_doc, in_axes=(1, 1, 0), out_axes=1)(ctx, mask, rngs)


def nll(
    config: RagConfig,
    params: Any,
    context_input_ids: jax.Array,
    context_attention_mask: jax.Array,
    doc_scores: jax.Array,
    labels: jax.Array,
    variant: str = "sequence",
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Per-example RAG NLL ``[B]`` given contexts and retrieval scores (HF
    ``model(context_input_ids=..., doc_scores=..., labels=..., reduce_loss=False).loss``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    logits = doc_logits(
        config.generator, params["generator"], context_input_ids, context_attention_mask, labels, dropout_rng
    )
    return marginals.rag_nll(
        logits, doc_scores, labels, variant, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        epsilon=epsilon, exclude_bos_score=exclude_bos_score,
    )


def question_embedding(
    qe_config: BertConfig, qe_params: Any, input_ids: jax.Array, attention_mask: jax.Array,
    token_type_ids: jax.Array | None = None, dropout_rng: jax.Array | None = None,
) -> jax.Array:
    deterministic = dropout_rng is None
    return DprEncoder(qe_config).apply(
        {"params": qe_params}, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
        token_type_ids, deterministic=deterministic, rngs=None if deterministic else {"dropout": dropout_rng},
    )


@functools.lru_cache(maxsize=None)
def question_embedder(qe_config: BertConfig) -> Callable[..., jax.Array]:
    """Jitted ``(params, input_ids, attention_mask, token_type_ids) -> [B, D]``
    (no dropout), one per question-encoder config: every caller (training,
    evaluation, inference, search) shares its compiled shapes."""
    return jax.jit(functools.partial(question_embedding, qe_config))


def rag_loss(
    params: Any,
    batch: dict[str, jax.Array],
    *,
    config: RagConfig,
    variant: str = "sequence",
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    reduction: str = "mean",
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """End-to-end training objective. ``batch``: ``question_input_ids``,
    ``question_attention_mask`` (optional ``question_token_type_ids``) ``[B, Lq]``,
    ``doc_embeds`` ``[B, K, D]`` (stored, frozen), ``context_input_ids``,
    ``context_attention_mask`` ``[B, K, L]``, ``labels`` ``[B, T]``.

    The question embedding is recomputed here so gradients reach the question
    encoder through ``doc_scores = q . d``; the document vectors get none.
    A batch with ``doc_scores`` ``[B, K]`` instead of ``doc_embeds`` (a
    frozen BM25 retriever) uses them as they are: the question encoder is not
    run and gets no gradient.
    """
    r_q = r_g = None
    if dropout_rng is not None:
        r_q, r_g = jax.random.split(dropout_rng)
    if "doc_embeds" not in batch:
        scores = jax.lax.stop_gradient(jnp.asarray(batch["doc_scores"], jnp.float32))
    else:
        if config.question_encoder is None:
            raise ValueError("rag_loss needs a question encoder (this RagModel has none)")
        q = question_embedding(
            config.question_encoder, params["question_encoder"], batch["question_input_ids"],
            batch["question_attention_mask"], batch.get("question_token_type_ids"), r_q,
        )
        scores = marginals.doc_scores(q, jax.lax.stop_gradient(batch["doc_embeds"]))
    losses = nll(
        config, params, batch["context_input_ids"], batch["context_attention_mask"], scores, batch["labels"],
        variant, epsilon, exclude_bos_score, r_g,
    )
    return marginals.reduce(losses, reduction)


# ---------------------------------------------------------------------------
# The object API
# ---------------------------------------------------------------------------


class RagModel:
    """``.nll``, ``.generate``, ``.save_hf`` over pure functions of ``.params``."""

    def __init__(
        self,
        config: RagConfig,
        params: dict[str, Any],
        question_tokenizer: TextTokenizer | None = None,
        generator_tokenizer: TextTokenizer | None = None,
    ) -> None:
        if "generator" not in params:
            raise ValueError("params must hold a 'generator' entry")
        self.config = config
        self.params = params
        self.question_tokenizer = question_tokenizer
        self.generator_tokenizer = generator_tokenizer
        self._nll = jax.jit(
            lambda p, ids, m, s, y, variant, eps, excl: nll(config, p, ids, m, s, y, variant, eps, excl),
            static_argnums=(5, 7),  # epsilon stays traced: one compile for every value
        )

    # -- losses ------------------------------------------------------------

    def nll(
        self, context_input_ids: Any, context_attention_mask: Any, doc_scores: Any, labels: Any,
        variant: str | None = None, epsilon: float | None = None, exclude_bos_score: bool | None = None,
    ) -> jax.Array:
        """``[B]`` per-example NLL; contexts ``[B, K, L]``, scores ``[B, K]``, labels ``[B, T]``.

        ``epsilon`` and ``exclude_bos_score`` default to the config's
        ``label_smoothing`` and ``exclude_bos_score``, as HF ``forward``'s loss."""
        rag = self.config.rag
        epsilon = rag.label_smoothing if epsilon is None else epsilon
        exclude_bos_score = rag.exclude_bos_score if exclude_bos_score is None else exclude_bos_score
        ids, mask, scores = _check_context(context_input_ids, context_attention_mask, doc_scores)
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.shape[0] != ids.shape[0]:
            raise ValueError(f"labels must be [B, T] with B={ids.shape[0]}, got {labels.shape}")
        return self._nll(
            self.params, ids, mask, scores, jnp.asarray(labels, jnp.int32),
            variant or self.config.rag.variant, jnp.float32(epsilon), bool(exclude_bos_score),
        )

    # -- decoding ----------------------------------------------------------

    def generate(
        self,
        context_input_ids: Any,
        context_attention_mask: Any,
        doc_scores: Any,
        variant: str | None = None,
        num_beams: int = 1,
        max_length: int = 20,
        min_length: int = 0,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        decoding: str = "thorough",
        hf_unmasked_candidates: bool = False,
    ) -> np.ndarray:
        """Token ids ``[B, T']`` (decoder start token first, as HF ``generate``).

        RAG-Sequence: ``decoding="thorough"`` re-scores every candidate under
        every document, ``"fast"`` gives a candidate probability 0 under the
        documents whose beam lacks it. ``hf_unmasked_candidates=True`` copies
        an HF quirk (its per-document beams ignore the context padding mask)
        for bit-exact comparisons."""
        from rag_jax.rag import decoding as dec

        ids, mask, scores = _check_context(context_input_ids, context_attention_mask, doc_scores)
        variant = variant or self.config.rag.variant
        opts = dec.DecodeOptions(
            num_beams=int(num_beams), max_length=int(max_length), min_length=int(min_length),
            length_penalty=float(length_penalty), early_stopping=early_stopping,
            pad_token_id=self.config.pad_token_id, eos_token_id=self.config.eos_token_id,
            decoder_start_token_id=self.config.decoder_start_token_id,
            forced_eos_token_id=self.config.generator.forced_eos_token_id,
            forced_bos_token_id=self.config.generator.forced_bos_token_id,
        )
        if variant == "token":
            return dec.rag_token_generate(self.config.generator, self.params["generator"], ids, mask, scores, opts)
        if variant == "sequence":
            return dec.rag_sequence_generate(
                self.config.generator, self.params["generator"], ids, mask, scores, opts,
                decoding=decoding, bos_token_id=self.config.bos_token_id,
                epsilon=self.config.rag.label_smoothing, hf_unmasked_candidates=hf_unmasked_candidates,
            )
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")

    # -- export ------------------------------------------------------------

    def save_hf(self, path: str | os.PathLike, variant: str | None = None) -> None:
        """An HF RAG directory that ``RagSequenceForGeneration`` /
        ``RagTokenForGeneration.from_pretrained`` loads (tokenizers in their subdirectories)."""
        settings = self.config.rag
        if variant is not None:
            settings = dataclasses.replace(settings, variant=variant)
        state, hf_config = hf_rag.rag_to_hf(settings, self.config.question_encoder, self.config.generator, self.params)
        with tempfile.TemporaryDirectory() as tmp:
            extra = {
                **stage_tokenizer_files(self.question_tokenizer, tmp, hf_rag.QE_TOKENIZER_DIR),
                **stage_tokenizer_files(self.generator_tokenizer, tmp, hf_rag.GEN_TOKENIZER_DIR),
            }
            hf_io.write_hf_dir(path, state, hf_config, extra)


def _check_context(ids: Any, mask: Any, scores: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    ids = np.asarray(ids)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    scores = np.asarray(scores, np.float32)
    if ids.ndim != 3:
        raise ValueError(f"context_input_ids must be [B, K, L], got shape {ids.shape}")
    if mask.shape != ids.shape:
        raise ValueError(f"context_attention_mask shape {mask.shape} != context_input_ids shape {ids.shape}")
    if scores.shape != ids.shape[:2]:
        raise ValueError(f"doc_scores must be [B, K] = {ids.shape[:2]}, got {scores.shape}")
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(scores)


def load_rag(path: str | os.PathLike, dtype: Any = None) -> RagModel:
    """Loads an HF ``RagSequenceForGeneration`` / ``RagTokenForGeneration`` directory."""
    settings, qe_cfg, gen_cfg, params = hf_rag.load_rag_parts(path, dtype)
    params = jax.tree.map(jnp.asarray, params)
    root = Path(path)
    qtok = maybe_load_tokenizer(root / hf_rag.QE_TOKENIZER_DIR, "bert") if (root / hf_rag.QE_TOKENIZER_DIR).is_dir() else None
    gtok = maybe_load_tokenizer(root / hf_rag.GEN_TOKENIZER_DIR, "bart") if (root / hf_rag.GEN_TOKENIZER_DIR).is_dir() else None
    return RagModel(RagConfig(qe_cfg, gen_cfg, settings), params, qtok, gtok)
