"""RAG marginal likelihoods: the retrieved document is a latent variable.

Pure, jittable functions of per-document generator logits ``[B, K, T, V]``
and retrieval scores ``[B, K]``. They follow HF ``RagSequenceForGeneration``
/ ``RagTokenForGeneration.get_nll`` term for term, including its quirks:

* labels are the decoder inputs (they start with ``<s>`` or the decoder start
  token); the target at step ``t`` is ``labels[t + 1]`` and the last step's
  target is padding;
* RAG-Sequence adds the document log-prior at target step 1 (not 0), so with
  ``exclude_bos_score`` the prior still counts;
* label smoothing sums the (prior-shifted) log-probs over the vocabulary, so
  the smoothing term of step 1 also carries ``V * log p(z)``; it is
  marginalised over documents like the NLL;
* ``use_bos`` (needed by ``exclude_bos_score``) holds only when *every* row of
  the batch has ``bos`` as its first target, exactly as HF decides it.

Logits may be bf16: everything is upcast to float32 before ``log_softmax``.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Reduction = Literal["none", "mean", "sum"]


def doc_scores(question_emb: jax.Array, doc_embs: jax.Array) -> jax.Array:
    """``q . d`` -> ``[B, K]`` float32 (``q [B, D]``, ``d [B, K, D]``).

    Gradients flow into both arguments; callers that keep the document index
    frozen pass stored embeddings (constants) as ``doc_embs``.
    """
    q = jnp.asarray(question_emb).astype(jnp.float32)
    d = jnp.asarray(doc_embs).astype(jnp.float32)
    if q.ndim != 2 or d.ndim != 3 or q.shape[0] != d.shape[0] or q.shape[1] != d.shape[2]:
        raise ValueError(f"doc_scores: expected q [B, D] and d [B, K, D], got {q.shape} and {d.shape}")
    return jnp.einsum("bd,bkd->bk", q, d, precision=jax.lax.Precision.HIGHEST)


def shift_targets(labels: jax.Array, pad_token_id: int) -> jax.Array:
    """``labels[:, 1:]`` followed by one pad: the token each step predicts."""
    labels = jnp.asarray(labels, jnp.int32)
    pad = jnp.full((labels.shape[0], 1), pad_token_id, jnp.int32)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def _log_probs(logits: jax.Array, inputs_are_log_probs: bool) -> jax.Array:
    x = jnp.asarray(logits).astype(jnp.float32)
    return x if inputs_are_log_probs else jax.nn.log_softmax(x, axis=-1)


def _check(logits: jax.Array, scores: jax.Array, labels: jax.Array) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, K, T, V], got shape {logits.shape}")
    b, k, t, _ = logits.shape
    if scores.shape != (b, k):
        raise ValueError(f"doc_scores must be [B, K] = {(b, k)}, got {scores.shape}")
    if labels.shape != (b, t):
        raise ValueError(f"labels must be [B, T] = {(b, t)}, got {labels.shape}")


def sequence_nll(
    logits: jax.Array,
    doc_scores: jax.Array,
    labels: jax.Array,
    *,
    pad_token_id: int,
    bos_token_id: int | None = 0,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    inputs_are_log_probs: bool = False,
    use_bos: jax.Array | None = None,
) -> jax.Array:
    """RAG-Sequence loss per example ``[B]``:
    ``-log sum_z p(z|x) prod_t p(y_t|x,z,y<t)`` (label-smoothed by ``epsilon``).

    ``use_bos`` (bool ``[B]``) overrides HF's batch-wide decision of whether
    the first target is a droppable ``bos``; batched re-scoring passes one
    decision per example, as HF's per-example loop makes it."""
    labels = jnp.asarray(labels, jnp.int32)
    _check(logits, doc_scores, labels)
    target = shift_targets(labels, pad_token_id)  # [B, T]
    lp = _log_probs(logits, inputs_are_log_probs)  # [B, K, T, V]
    tok = jnp.take_along_axis(lp, target[:, None, :, None], axis=-1)[..., 0]  # [B, K, T]
    return sequence_nll_from_terms(
        tok, lp.sum(-1), doc_scores, target, vocab=logits.shape[-1], pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, epsilon=epsilon, exclude_bos_score=exclude_bos_score, use_bos=use_bos,
    )


def sequence_nll_from_terms(
    target_lp: jax.Array,
    sum_lp: jax.Array,
    doc_scores: jax.Array,
    target: jax.Array,
    *,
    vocab: int,
    pad_token_id: int,
    bos_token_id: int | None = 0,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    use_bos: jax.Array | None = None,
) -> jax.Array:
    """:func:`sequence_nll` from per-step terms ``[B, K, T]``: the target's
    log-prob and the sum of log-probs over the vocabulary (for smoothing),
    with ``target`` ``[B, T]`` from :func:`shift_targets`. Decoders that get
    those terms without a dense ``[B, K, T, V]`` array (prefix-tree
    re-scoring) share the HF arithmetic below."""
    doc_lp = jax.nn.log_softmax(jnp.asarray(doc_scores, jnp.float32), axis=-1)  # [B, K]
    steps = jnp.arange(target.shape[1])
    at_step1 = (steps == 1).astype(jnp.float32)  # the prior sits on target step 1
    prior = doc_lp[:, :, None] * at_step1[None, None, :]  # [B, K, T]

    tok = target_lp + prior
    smooth = sum_lp + vocab * prior
    keep = (target != pad_token_id)[:, None, :]
    tok = jnp.where(keep, tok, 0.0)
    smooth = jnp.where(keep, smooth, 0.0)

    if exclude_bos_score and (bos_token_id is not None or use_bos is not None):
        if use_bos is None:
            use_bos = jnp.broadcast_to(jnp.all(target[:, 0] == bos_token_id), target.shape[:1])
        drop_first = jnp.asarray(use_bos, bool)[:, None, None] & (steps == 0)[None, None, :]
        tok = jnp.where(drop_first, 0.0, tok)
    ll = jax.nn.logsumexp(tok.sum(-1), axis=1)  # over documents
    smooth_ll = jax.nn.logsumexp(smooth.sum(-1), axis=1)
    return (1.0 - epsilon) * (-ll) + (epsilon / vocab) * (-smooth_ll)


def token_log_marginal(logits: jax.Array, doc_scores: jax.Array, inputs_are_log_probs: bool = False) -> jax.Array:
    """``log sum_z p(z|x) p(y_t|x,z,y<t)`` for every vocabulary entry: ``[B, K, T, V] -> [B, T, V]``."""
    lp = _log_probs(logits, inputs_are_log_probs)
    doc_lp = jax.nn.log_softmax(jnp.asarray(doc_scores, jnp.float32), axis=-1)
    return jax.nn.logsumexp(lp + doc_lp[:, :, None, None], axis=1)


def token_nll(
    logits: jax.Array,
    doc_scores: jax.Array,
    labels: jax.Array,
    *,
    pad_token_id: int,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    inputs_are_log_probs: bool = False,
) -> jax.Array:
    """RAG-Token loss per example ``[B]``: ``-sum_t log sum_z p(z|x) p(y_t|x,z,y<t)``.

    ``exclude_bos_score`` is accepted so both variants share a signature, and
    ignored, as HF ``RagTokenForGeneration.get_nll`` ignores it."""
    del exclude_bos_score
    labels = jnp.asarray(labels, jnp.int32)
    _check(logits, doc_scores, labels)
    vocab = logits.shape[-1]
    target = shift_targets(labels, pad_token_id)
    rag_lp = token_log_marginal(logits, doc_scores, inputs_are_log_probs)  # [B, T, V]
    tok = jnp.take_along_axis(rag_lp, target[..., None], axis=-1)[..., 0]
    smooth = rag_lp.sum(-1)
    keep = target != pad_token_id
    ll = jnp.where(keep, tok, 0.0).sum(-1)
    smooth_ll = jnp.where(keep, smooth, 0.0).sum(-1)
    return (1.0 - epsilon) * (-ll) + (epsilon / vocab) * (-smooth_ll)


def rag_nll(
    logits: jax.Array,
    doc_scores: jax.Array,
    labels: jax.Array,
    variant: str,
    *,
    pad_token_id: int,
    bos_token_id: int | None = 0,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
) -> jax.Array:
    """Dispatches on ``variant`` ("sequence" | "token"); returns ``[B]``."""
    if variant == "sequence":
        return sequence_nll(
            logits, doc_scores, labels, pad_token_id=pad_token_id, bos_token_id=bos_token_id, epsilon=epsilon,
            exclude_bos_score=exclude_bos_score,
        )
    if variant == "token":
        return token_nll(logits, doc_scores, labels, pad_token_id=pad_token_id, epsilon=epsilon)
    raise ValueError(f"variant must be 'sequence' or 'token', got {variant!r}")


def reduce(losses: jax.Array, how: Reduction = "mean") -> jax.Array:
    """``"sum"`` equals HF ``reduce_loss=True``; ``"mean"`` averages examples."""
    if how == "none":
        return losses
    if how == "sum":
        return losses.sum()
    if how == "mean":
        return losses.mean()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {how!r}")
