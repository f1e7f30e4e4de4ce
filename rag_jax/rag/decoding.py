"""Jitted RAG decoding: RAG-Token greedy/beam search over the document-
marginalised next-token distribution, and RAG-Sequence per-document beams
re-scored by "thorough" or "fast" decoding, batched over examples.

Search semantics follow HF ``generate`` (transformers 5): greedy as
``_sample`` (finished rows padded), beam search as the vectorised
``_beam_search`` (2 * num_beams candidates per step, finished hypotheses
ranked by ``score / length ** length_penalty``, the same early-stopping
heuristic) with the ``min_length`` / ``forced_bos`` / ``forced_eos`` logits
processors. Everything runs inside ``lax.while_loop`` over fixed shapes
(``[.., max_length]`` buffers) with the BART decoder cache; only the final
trimming to the longest generated row happens on the host.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rag_jax.models.bart import Bart, BartConfig, decode_step, init_cache
from rag_jax.rag import marginals

NEG = -1.0e9  # HF's "impossible" score offset (kept finite, as HF does)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    num_beams: int = 1
    max_length: int = 20
    min_length: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_eos_token_id: int | None = 2
    forced_bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (start token + one token), got {self.max_length}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


# StepFn: (cache, tokens [N]) -> (next-token logits [N, V] as HF's model
# returns them, cache). Log-softmax is applied by the search, as HF does.
StepFn = Callable[[Any, jax.Array], tuple[jax.Array, Any]]


def _process(lp: jax.Array, cur_len: jax.Array, o: DecodeOptions) -> jax.Array:
    """HF's logits processors in HF's order: min_length, forced BOS, forced EOS.
    ``cur_len`` is the length of the sequences so far (start token included)."""
    vocab = jnp.arange(lp.shape[-1])
    if o.min_length > 0:
        lp = jnp.where((cur_len < o.min_length) & (vocab == o.eos_token_id)[None], -jnp.inf, lp)
    if o.forced_bos_token_id is not None:
        forced = jnp.where(vocab == o.forced_bos_token_id, 0.0, -jnp.inf)[None]
        lp = jnp.where(cur_len == 1, forced, lp)
    if o.forced_eos_token_id is not None:
        forced = jnp.where(vocab == o.forced_eos_token_id, 0.0, -jnp.inf)[None]
        lp = jnp.where(cur_len == o.max_length - 1, forced, lp)
    return lp


def reorder_self_cache(cache: Any, index: jax.Array) -> Any:
    """Beam reordering that gathers only the self-attention caches.

    Beams are only ever reordered within an example (and, for RAG-Token,
    document by document), so the cross-attention K/V rows a beam moves to
    already hold the same encoder states: gathering them would copy
    ``[rows, L_ctx, H, Dh]`` per layer and step for nothing."""
    def pick(path: tuple, x: jax.Array) -> jax.Array:
        names = {getattr(p, "key", None) for p in path}
        if x.ndim == 0 or "encoder_attn" in names:
            return x
        return jnp.take(x, index, axis=0)

    return jax.tree_util.tree_map_with_path(pick, cache)


def _rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[b, idx[b, j]]`` for ``x [B, M, ...]``, ``idx [B, J]``."""
    return jax.vmap(lambda a, i: a[i])(x, idx)


# ---------------------------------------------------------------------------
# Searches (pure; called inside jit)
# ---------------------------------------------------------------------------


def greedy_search(step_fn: StepFn, cache: Any, n: int, o: DecodeOptions) -> dict[str, jax.Array]:
    """-> ``sequences [n, max_length]`` (pad after eos) and, per row, the summed
    unprocessed log-probs of the generated tokens (``raw_log_probs``) and of the
    first one (``first_raw_log_probs``)."""
    max_len = o.max_length
    seqs = jnp.full((n, max_len), o.pad_token_id, jnp.int32).at[:, 0].set(o.decoder_start_token_id)
    init = (jnp.int32(1), seqs, jnp.ones((n,), bool), cache, jnp.zeros((n,)), jnp.zeros((n,)))

    def cond(carry: tuple) -> jax.Array:
        cur_len, _, unfinished, *_ = carry
        return (cur_len < max_len) & jnp.any(unfinished)

    def body(carry: tuple) -> tuple:
        cur_len, seqs, unfinished, cache, raw_log_probs, first_raw_log_probs = carry
        tokens = jax.lax.dynamic_index_in_dim(seqs, cur_len - 1, axis=1, keepdims=False)
        logits, cache = step_fn(cache, tokens)
        # unprocessed: the logits processors only steer the argmax
        step_log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        next_tokens = jnp.argmax(_process(step_log_probs, cur_len, o), axis=-1).astype(jnp.int32)
        next_tokens = jnp.where(unfinished, next_tokens, o.pad_token_id)
        # raw sums mirror HF re-scoring, which masks every target equal to pad
        token_log_probs = jnp.where(unfinished & (next_tokens != o.pad_token_id),
                                    jnp.take_along_axis(step_log_probs, next_tokens[:, None], -1)[:, 0], 0.0)
        first_raw_log_probs = jnp.where(cur_len == 1, token_log_probs, first_raw_log_probs)
        seqs = jax.lax.dynamic_update_index_in_dim(seqs, next_tokens, cur_len, axis=1)
        unfinished = unfinished & ~((next_tokens == o.eos_token_id) | (cur_len + 1 >= max_len))
        return cur_len + 1, seqs, unfinished, cache, raw_log_probs + token_log_probs, first_raw_log_probs

    _, seqs, _, _, raw_log_probs, first_raw_log_probs = jax.lax.while_loop(cond, body, init)
    return {"sequences": seqs, "raw_log_probs": raw_log_probs, "first_raw_log_probs": first_raw_log_probs}


class BeamState(struct.PyTreeNode):
    """The ``lax.while_loop`` carry of :func:`beam_search`.

    B examples, nb = ``num_beams`` slots each, T = ``max_length``. "Live"
    beams are still being extended; "finished" slots hold HF's
    ``BeamHypotheses``: the best nb ended hypotheses so far. Every live/
    finished array is indexed ``[example, slot]``; a slot's sequence, scores
    and lengths always move together. "Raw" log-probs are the model's
    unprocessed ones (no min-length/forced-token masking), summed with pad
    targets left out, as HF's re-scoring pass counts them (RAG-Sequence
    scores its candidates from these)."""

    # [] int32: tokens in every sequence so far, start token included; the
    # next step writes position ``cur_len``.
    cur_len: jax.Array
    # [] bool: the search is over (HF's stopping criteria and early stopping).
    done: jax.Array
    # ``step_fn``'s decoder cache, opaque here: ``reorder_fn`` moves it after
    # the live beams, given each new beam's source as ``example * nb + beam``.
    cache: Any
    # [B, nb, T] int32: live sequences, padded with the fill token after cur_len.
    live_seqs: jax.Array
    # [B, nb] f32: summed processed log-probs, the beam's ranking score; at the
    # start only beam 0 is live (the others hold NEG so the copies never win).
    live_log_probs: jax.Array
    # [B, nb] int32: tokens generated so far (start token excluded).
    live_lengths: jax.Array
    # [B, nb] f32: summed raw log-probs of the generated tokens.
    live_raw_log_probs: jax.Array
    # [B, nb] f32: raw log-prob of the first generated token alone.
    live_first_raw_log_probs: jax.Array
    # [B, nb, T] int32: finished hypotheses (eos or max_length reached).
    finished_seqs: jax.Array
    # [B, nb] f32: HF's ``score / length ** length_penalty``; NEG in empty slots.
    finished_scores: jax.Array
    # [B, nb] bool: the slot holds a finished hypothesis.
    finished_flags: jax.Array
    # [B, nb] int32: generated tokens of each finished hypothesis.
    finished_lengths: jax.Array
    # [B, nb] f32: summed raw log-probs of each finished hypothesis.
    finished_raw_log_probs: jax.Array
    # [B, nb] f32: raw log-prob of each finished hypothesis's first token.
    finished_first_raw_log_probs: jax.Array
    # [B, 1] bool: a live beam may still beat the worst finished hypothesis
    # (HF's ``is_early_stop_heuristic_unsatisfied``); once False, the
    # example accepts no more hypotheses.
    improvable: jax.Array


def _beam_init(cache: Any, batch: int, o: DecodeOptions) -> BeamState:
    """All beams start from the decoder start token; the rest of each row holds
    HF's fill token (pad, or eos when pad is unset or 0)."""
    nb, max_len = o.num_beams, o.max_length
    fill_token = (o.pad_token_id or o.eos_token_id)
    seqs = jnp.full((batch, nb, max_len), fill_token, jnp.int32).at[:, :, 0].set(o.decoder_start_token_id)
    zeros = jnp.zeros((batch, nb), jnp.float32)
    no_tokens = jnp.zeros((batch, nb), jnp.int32)
    return BeamState(
        cur_len=jnp.int32(1), done=jnp.bool_(False), cache=cache,
        live_seqs=seqs, live_log_probs=zeros.at[:, 1:].set(NEG), live_lengths=no_tokens,
        live_raw_log_probs=zeros, live_first_raw_log_probs=zeros,
        finished_seqs=seqs, finished_scores=jnp.full((batch, nb), NEG, jnp.float32),
        finished_flags=jnp.zeros((batch, nb), bool), finished_lengths=no_tokens,
        finished_raw_log_probs=zeros, finished_first_raw_log_probs=zeros,
        improvable=jnp.ones((batch, 1), bool),
    )


def beam_search(
    step_fn: StepFn, reorder_fn: Callable[[Any, jax.Array], Any], cache: Any, batch: int, o: DecodeOptions,
    vocab_size: int,
) -> dict[str, jax.Array]:
    """HF's vectorised beam search. Rows of ``step_fn`` are ``batch * num_beams``
    (beam-major within an example). Returns the finished hypotheses sorted best
    first: ``sequences [B, nb, max_length]``, ``scores [B, nb]`` (length-
    normalised, as HF ``sequences_scores``), ``lengths [B, nb]`` (generated
    tokens) and the unprocessed log-prob sums ``raw_log_probs``/``first_raw_log_probs``."""
    nb, max_len, vocab = o.num_beams, o.max_length, vocab_size
    num_candidates = 2 * nb  # HF: max(2, 1 + number of eos ids) * num_beams, one eos id here
    length_penalty = o.length_penalty
    f32 = jnp.float32
    # Only candidates ranked within the first nb may finish (HF's beam scorer).
    in_first_nb = (jnp.arange(num_candidates) < nb)[None]
    example_rows = (jnp.arange(batch) * nb)[:, None]  # cache row of each example's beam 0

    def body(state: BeamState) -> BeamState:
        cur_len = state.cur_len
        tokens = jax.lax.dynamic_index_in_dim(state.live_seqs, cur_len - 1, axis=2, keepdims=False).reshape(-1)
        logits, cache = step_fn(state.cache, tokens)
        raw_log_probs = jax.nn.log_softmax(logits.astype(f32), axis=-1)
        log_probs = _process(raw_log_probs, cur_len, o)
        extended = log_probs.reshape(batch, nb, vocab) + state.live_log_probs[:, :, None]  # [B, nb, V]
        # Top 2*nb of nb*V in two stages (per beam, then among nb*2*nb): the
        # same result and tie order (lower flat index first) as one top_k
        # over the flattened row, without sorting nb*V values per step.
        per_beam_log_probs, per_beam_tokens = jax.lax.top_k(extended, num_candidates)  # [B, nb, 2nb]
        per_beam_flat = (per_beam_tokens + (jnp.arange(nb) * vocab)[None, :, None]).reshape(batch, nb * num_candidates)
        cand_log_probs, cand_pos = jax.lax.top_k(per_beam_log_probs.reshape(batch, nb * num_candidates), num_candidates)
        cand_flat = jnp.take_along_axis(per_beam_flat, cand_pos, axis=1)  # [B, 2nb]: beam * V + token
        cand_beams = cand_flat // vocab
        cand_tokens = (cand_flat % vocab).astype(jnp.int32)
        cand_seqs = jax.lax.dynamic_update_index_in_dim(_rows(state.live_seqs, cand_beams), cand_tokens, cur_len,
                                                        axis=2)
        cand_token_raw = jnp.take_along_axis(raw_log_probs.reshape(batch, nb * vocab), cand_flat, axis=1)
        # HF re-scoring masks pad targets
        cand_token_raw = jnp.where(cand_tokens == o.pad_token_id, 0.0, cand_token_raw)
        cand_raw = _rows(state.live_raw_log_probs, cand_beams) + cand_token_raw
        cand_first_raw = jnp.where(cur_len == 1, cand_token_raw, _rows(state.live_first_raw_log_probs, cand_beams))
        cand_lengths = _rows(state.live_lengths, cand_beams) + 1
        cand_ends = (cand_tokens == o.eos_token_id) | (cur_len + 1 >= max_len)

        # Live beams: the best nb candidates that did not end.
        live_cand_log_probs = cand_log_probs + cand_ends.astype(f32) * NEG
        live_pos = jax.lax.top_k(live_cand_log_probs, nb)[1]
        live_src_beams = _rows(cand_beams, live_pos)
        live_log_probs = _rows(live_cand_log_probs, live_pos)

        # Finished hypotheses: the best nb of the old ones and those ending now.
        newly_finished = cand_ends & in_first_nb
        new_scores = cand_log_probs / (cur_len.astype(f32) ** length_penalty)
        all_slots_finished = jnp.all(state.finished_flags, axis=-1, keepdims=True) & (o.early_stopping is True)
        new_scores = (new_scores + all_slots_finished.astype(f32) * NEG + (~state.improvable).astype(f32) * NEG
                      + (~newly_finished).astype(f32) * NEG)
        merged_scores = jnp.concatenate([state.finished_scores, new_scores], 1)
        kept_pos = jax.lax.top_k(merged_scores, nb)[1]

        def keep_finished(old: jax.Array, new: jax.Array) -> jax.Array:
            return _rows(jnp.concatenate([old, new], 1), kept_pos)

        finished_scores = _rows(merged_scores, kept_pos)
        finished_flags = keep_finished(state.finished_flags, newly_finished)

        # HF's early-stopping heuristic: can the best live beam still beat the
        # worst finished hypothesis (at the best length it could reach)?
        if o.early_stopping == "never" and length_penalty > 0.0:
            best_length = jnp.float32(max_len - 1)
        else:
            best_length = cur_len.astype(f32)
        best_live_score = live_log_probs[:, :1] / best_length ** length_penalty
        worst_finished_score = jnp.where(finished_flags, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
        improvable = state.improvable & jnp.any(best_live_score > worst_finished_score, axis=-1, keepdims=True)
        keep_going = (jnp.any(improvable) & ~(jnp.all(finished_flags) & (o.early_stopping is True))
                      & ~jnp.all(cand_ends))
        return BeamState(
            cur_len=cur_len + 1, done=~keep_going,
            cache=reorder_fn(cache, (live_src_beams + example_rows).reshape(-1)),
            live_seqs=_rows(cand_seqs, live_pos), live_log_probs=live_log_probs,
            live_lengths=_rows(cand_lengths, live_pos), live_raw_log_probs=_rows(cand_raw, live_pos),
            live_first_raw_log_probs=_rows(cand_first_raw, live_pos),
            finished_seqs=keep_finished(state.finished_seqs, cand_seqs), finished_scores=finished_scores,
            finished_flags=finished_flags, finished_lengths=keep_finished(state.finished_lengths, cand_lengths),
            finished_raw_log_probs=keep_finished(state.finished_raw_log_probs, cand_raw),
            finished_first_raw_log_probs=keep_finished(state.finished_first_raw_log_probs, cand_first_raw),
            improvable=improvable,
        )

    final = jax.lax.while_loop(lambda state: ~state.done, body, _beam_init(cache, batch, o))
    return {"sequences": final.finished_seqs, "scores": final.finished_scores, "lengths": final.finished_lengths,
            "raw_log_probs": final.finished_raw_log_probs, "first_raw_log_probs": final.finished_first_raw_log_probs}


# ---------------------------------------------------------------------------
# RAG-Token
# ---------------------------------------------------------------------------


def _encode(model: Bart, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model.apply({"params": params}, ids, mask, method=Bart.encode)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _rag_token(gen_config: BartConfig, params: Any, ctx: jax.Array, mask: jax.Array, scores: jax.Array,
               o: DecodeOptions) -> jax.Array:
    model = Bart(gen_config)
    b, k, l = ctx.shape
    nb = o.num_beams
    flat_mask = mask.reshape(b * k, l)
    enc = _encode(model, params, ctx.reshape(b * k, l), flat_mask)
    # Decoder rows ordered (example, doc, beam): a document's beams are
    # consecutive, so they share its cross-attention K/V, projected once and
    # never copied (layers.Attention groups their queries). HF orders rows
    # (example, beam, doc); the step below transposes the logits to that.
    emask = jnp.repeat(flat_mask, nb, axis=0)
    doc_lp = jnp.repeat(jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1), nb, axis=0)  # [B*nb, K]
    cache = reorder_self_cache(init_cache(model, params, enc, flat_mask, o.max_length),
                               jnp.repeat(jnp.arange(b * k), nb))

    def step(cache: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
        rows_tokens = jnp.broadcast_to(tokens.reshape(b, 1, nb), (b, k, nb)).reshape(-1)
        logits, cache = decode_step(model, params, cache, rows_tokens, None, emask)
        logits = jnp.swapaxes(logits.reshape(b, k, nb, -1), 1, 2).reshape(b * nb, k, -1)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return jax.nn.logsumexp(lp + doc_lp[:, :, None], axis=1), cache

    def reorder(cache: Any, idx: jax.Array) -> Any:
        src_beam = (idx % nb).reshape(b, 1, nb)  # idx = example * nb + source beam
        rows = (jnp.arange(b)[:, None, None] * k + jnp.arange(k)[None, :, None]) * nb + src_beam
        return reorder_self_cache(cache, rows.reshape(-1))

    if nb == 1:
        return greedy_search(step, cache, b, o)["sequences"]
    return beam_search(step, reorder, cache, b, o, gen_config.vocab_size)["sequences"][:, 0]


def _trim(seqs: np.ndarray, eos: int) -> np.ndarray:
    """Cuts the shared padding tail: HF returns ``1 + max generated length`` columns."""
    return seqs[:, : 1 + int(generated_lengths(seqs, eos).max())]


def generated_lengths(seqs: np.ndarray, eos: int) -> np.ndarray:
    """Tokens generated after the start token: through the first eos, else to the end."""
    seqs = np.asarray(seqs)
    body = seqs[..., 1:] == eos
    first = np.where(body.any(-1), body.argmax(-1) + 1, body.shape[-1])
    return first


def rag_token_generate(gen_config: BartConfig, params: Any, ctx: jax.Array, mask: jax.Array, scores: jax.Array,
                       o: DecodeOptions) -> np.ndarray:
    seqs = np.asarray(_rag_token(gen_config, params, ctx, mask, scores, o))
    return _trim(seqs, o.eos_token_id)


# ---------------------------------------------------------------------------
# RAG-Sequence
# ---------------------------------------------------------------------------


def _per_doc_beams(model: Bart, params: Any, enc: jax.Array, emask: jax.Array, o: DecodeOptions,
                   vocab: int) -> dict[str, jax.Array]:
    """Plain BART search for every (example, document) row: ``[N, nb, T]``."""
    n = enc.shape[0]
    nb = o.num_beams
    # Cross-attention K/V projected once per row and kept there: a row's
    # beams are consecutive and share them (layers.Attention groups queries).
    cache = reorder_self_cache(init_cache(model, params, enc, emask, o.max_length), jnp.repeat(jnp.arange(n), nb))
    emask = jnp.repeat(emask, nb, axis=0)

    def step(cache: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
        return decode_step(model, params, cache, tokens, None, emask)

    if nb == 1:
        out = greedy_search(step, cache, n, o)
        return {k: v[:, None] for k, v in out.items()}
    return beam_search(step, reorder_self_cache, cache, n, o, vocab)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _sequence_beams(gen_config: BartConfig, params: Any, ctx: jax.Array, mask: jax.Array, scores: jax.Array,
                    o: DecodeOptions, bos_token_id: int | None, hf_unmasked_candidates: bool) -> dict[str, jax.Array]:
    """Encoder states, every document's beams as candidates ``[B, K * nb, T]``,
    which of them are first occurrences, HF's per-example ``use_bos``, and the
    size of each example's candidate prefix tree."""
    model = Bart(gen_config)
    b, k, l = ctx.shape
    nb, t_max = o.num_beams, o.max_length
    flat_ids, flat_mask = ctx.reshape(b * k, l), mask.reshape(b * k, l)
    enc = _encode(model, params, flat_ids, flat_mask)
    if hf_unmasked_candidates:
        # HF RagSequenceForGeneration.generate passes attention_mask=None to the
        # generator's generate, so candidate beams attend to the padding too.
        ones = jnp.ones_like(flat_mask)
        beams = _per_doc_beams(model, params, _encode(model, params, flat_ids, ones), ones, o, gen_config.vocab_size)
    else:
        beams = _per_doc_beams(model, params, enc, flat_mask, o, gen_config.vocab_size)
    c = k * nb
    cand = beams["sequences"].reshape(b, c, t_max)  # candidate c = (doc, beam)
    same = jnp.all(cand[:, :, None, :] == cand[:, None, :, :], axis=-1)  # [B, C, C]
    earlier = jnp.arange(c)[None, :] < jnp.arange(c)[:, None]
    valid = ~jnp.any(same & earlier[None], axis=-1)  # HF de-duplicates, keeping first occurrences
    # HF scores candidates with exclude_bos_score=True; "bos" counts only if every
    # candidate of the example has it as its first target.
    if bos_token_id is None:
        use_bos = jnp.zeros((b,), bool)
    else:
        use_bos = jnp.all((cand[:, :, 1] == bos_token_id) | ~valid, axis=-1)
    own = (beams["raw_log_probs"] - jnp.where(jnp.repeat(use_bos, k)[:, None], beams["first_raw_log_probs"], 0.0)
           ).reshape(b, k, nb)
    nodes = jax.vmap(lambda x: jnp.sum(_sorted_prefixes(x, o.pad_token_id)[4]))(cand)
    return {"enc": enc, "cand": cand, "valid": valid, "use_bos": use_bos, "own": own, "tree_nodes": nodes}


def _sorted_prefixes(cand: jax.Array, pad_token_id: int) -> tuple[jax.Array, ...]:
    """Candidates ``[C, T]`` sorted by their decoder inputs: the order, the
    sorted inputs ``[C, T - 1]``, how many positions each needs, how many of
    those it shares with the previous one, and how many new nodes it adds."""
    t = cand.shape[1]
    inputs = cand[:, :-1]  # the last position predicts padding
    steps = jnp.arange(t - 1)
    # Positions up to the last real (non-pad) target need a node; a model may
    # also emit the pad token mid-sequence, which HF's loss masks like padding.
    needed = jnp.max(jnp.where(cand[:, 1:] != pad_token_id, steps + 1, 0), axis=-1)
    order = jnp.lexsort(tuple(inputs[:, j] for j in reversed(range(t - 1))))  # first token primary
    srt, need = inputs[order], needed[order]
    shared = jnp.cumprod((srt[1:] == srt[:-1]).astype(jnp.int32), axis=-1).sum(-1)
    # Shared with the previous candidate, and only as deep as that one's nodes go.
    lcp = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.minimum(shared, need[:-1]).astype(jnp.int32)])
    lcp = jnp.minimum(lcp, need)
    return order, srt, need, lcp, need - lcp


def prefix_tree(cand: jax.Array, pad_token_id: int, size: int) -> dict[str, jax.Array]:
    """The prefix tree of one example's candidates ``[C, T]`` (decoder inputs
    starting with the decoder start token; ``pad`` after ``eos``).

    A re-scoring pass needs the decoder state after every prefix whose next
    token counts; candidates from beams share most prefixes, so the tree has
    far fewer nodes than ``C * (T - 1)``. Returns, for ``size`` slots (one
    more, the last, collects the positions that need no node):

    * ``tokens``/``depth`` ``[size + 1]``: each node's input token and position;
    * ``node`` ``[C, T - 1]``: the node of candidate c's prefix ending at t;
    * ``ancestor`` ``[size + 1, size + 1]``: node i may attend to node j;
    * ``num_nodes``: how many slots the tree needs (must be ``<= size``).
    """
    c, t = cand.shape
    steps = jnp.arange(t - 1)
    order, srt, need, lcp, new = _sorted_prefixes(cand, pad_token_id)
    first = jnp.cumsum(new) - new
    # Sorted, a prefix of length t+1 belongs to the last candidate at or
    # before this one that started new nodes at depth <= t.
    owner = jax.lax.cummax(jnp.where(lcp[:, None] <= steps[None, :], jnp.arange(c)[:, None], 0), axis=0)
    node = first[owner] + steps[None, :] - lcp[owner]
    node = jnp.where(steps[None, :] < need[:, None], node, size)
    tokens = jnp.full((size + 1,), pad_token_id, jnp.int32).at[node].set(srt)
    depth = jnp.zeros((size + 1,), jnp.int32).at[node].set(jnp.broadcast_to(steps, node.shape))
    below = (steps[:, None] >= steps[None, :]).astype(jnp.int8)  # [t, t']: t' is at or above t
    anc = jnp.zeros((size + 1, size + 1), jnp.int8).at[node[:, :, None], node[:, None, :]].max(below[None])
    anc = (anc > 0) | jnp.eye(size + 1, dtype=bool)
    return {"tokens": tokens, "depth": depth, "node": jnp.zeros_like(node).at[order].set(node),
            "ancestor": anc, "num_nodes": jnp.sum(new)}


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10, 11))
def _thorough_scores(gen_config: BartConfig, params: Any, enc: jax.Array, mask: jax.Array, scores: jax.Array,
                     cand: jax.Array, valid: jax.Array, use_bos: jax.Array, pad_token_id: int,
                     bos_token_id: int | None, epsilon: float, size: int) -> jax.Array:
    """Marginal log-likelihood ``[B, C]`` of every candidate under all K
    documents, as HF's re-scoring forward pass computes it, from one decoder
    pass per (example, document) over the candidates' prefix tree (HF runs
    every candidate under every document, each from the start)."""
    model = Bart(gen_config)
    b, k, l = mask.shape
    c, t_max = cand.shape[1:]
    vocab = gen_config.vocab_size
    tree = jax.vmap(lambda x: prefix_tree(x, pad_token_id, size))(cand)
    bias = jnp.where(tree["ancestor"], 0.0, jnp.finfo(jnp.float32).min)[:, None]  # [B, 1, S, S]
    enc = enc.reshape(b, k, l, -1)
    target = marginals.shift_targets(cand.reshape(b * c, t_max), pad_token_id).reshape(b, c, t_max)
    node = tree["node"]  # [B, C, T - 1]

    def per_doc(j: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.apply(
            {"params": params}, tree["tokens"], enc[:, j], mask[:, j], method=Bart.decode,
            positions=tree["depth"], self_attention_bias=bias,
        )  # [B, S + 1, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        total = logits.sum(-1) - vocab * lse  # sum of log-probs over the vocabulary
        flat = node.reshape(b, -1)
        tgt = target[:, :, :-1].reshape(b, -1)
        hit = logits[jnp.arange(b)[:, None], flat, tgt]  # [B, C * (T - 1)]
        tok = hit - jnp.take_along_axis(lse, flat, axis=1)
        return tok.reshape(b, c, t_max - 1), jnp.take_along_axis(total, flat, axis=1).reshape(b, c, t_max - 1)

    tok, total = jax.lax.map(per_doc, jnp.arange(k))  # [K, B, C, T - 1]
    pad_last = ((0, 0), (0, 0), (0, 0), (0, 1))  # the last step's target is padding
    tok = jnp.pad(jnp.transpose(tok, (1, 2, 0, 3)), pad_last).reshape(b * c, k, t_max)
    total = jnp.pad(jnp.transpose(total, (1, 2, 0, 3)), pad_last).reshape(b * c, k, t_max)
    loss = marginals.sequence_nll_from_terms(
        tok, total, jnp.repeat(scores, c, axis=0), target.reshape(b * c, t_max), vocab=vocab,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, epsilon=epsilon, exclude_bos_score=True,
        use_bos=jnp.repeat(use_bos, c),
    )
    return jnp.where(valid, -loss.reshape(b, c), -jnp.inf)


@functools.partial(jax.jit, static_argnums=(4,))
def _fast_scores(cand: jax.Array, valid: jax.Array, own: jax.Array, scores: jax.Array, pad_token_id: int) -> jax.Array:
    """p(y | x, z) = 0 unless y is in z's beam; there, the beam's own log-prob."""
    b, k, nb = own.shape
    t_max = cand.shape[-1]
    doc_lp = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
    seq_z = cand.reshape(b, k, nb, t_max)
    hit = jnp.all(cand[:, :, None, None, :] == seq_z[:, None], axis=-1)  # [B, C, K, nb]
    per_doc = jnp.max(jnp.where(hit, own[:, None], -jnp.inf), axis=-1)  # [B, C, K]
    # As in thorough (HF get_nll), the prior rides on target step 1 and is
    # masked with it when that target is padding (one-token candidates).
    third = cand[:, :, 2] if t_max > 2 else jnp.full(cand.shape[:2], pad_token_id)
    prior_kept = (third != pad_token_id)[:, :, None]
    score = jax.nn.logsumexp(per_doc + jnp.where(prior_kept, doc_lp[:, None, :], 0.0), axis=-1)
    return jnp.where(valid, score, -jnp.inf)


def _tree_size(nodes: np.ndarray, cap: int) -> int:
    """Slots for the largest tree of the batch, rounded up to a multiple of 32
    so that nearby batches share one compiled re-scoring pass."""
    return int(min(cap, -(-max(int(np.max(nodes)), 1) // 32) * 32))


def rag_sequence_candidates(gen_config: BartConfig, params: Any, ctx: jax.Array, mask: jax.Array,
                            scores: jax.Array, o: DecodeOptions, decoding: str = "thorough",
                            bos_token_id: int | None = 0, epsilon: float = 0.0,
                            hf_unmasked_candidates: bool = False) -> dict[str, np.ndarray]:
    """Every candidate with its marginal score (``-inf`` for duplicates) and the best one.

    ``hf_unmasked_candidates=True`` reproduces HF exactly: its per-document
    candidate search ignores ``context_attention_mask`` (attends to padding);
    re-scoring uses the mask either way. Without padding both agree."""
    if decoding not in ("thorough", "fast"):
        raise ValueError(f"decoding must be 'thorough' or 'fast', got {decoding!r}")
    ctx, mask, scores = jnp.asarray(ctx), jnp.asarray(mask), jnp.asarray(scores)
    s = _sequence_beams(gen_config, params, ctx, mask, scores, o, bos_token_id, bool(hf_unmasked_candidates))
    if decoding == "thorough":
        t_max = s["cand"].shape[-1]
        size = _tree_size(np.asarray(s["tree_nodes"]), s["cand"].shape[1] * (t_max - 1))
        score = _thorough_scores(gen_config, params, s["enc"], mask, scores, s["cand"], s["valid"], s["use_bos"],
                                 o.pad_token_id, bos_token_id, float(epsilon), size)
    else:
        score = _fast_scores(s["cand"], s["valid"], s["own"], scores, o.pad_token_id)
    cand, score = np.asarray(s["cand"]), np.asarray(score)
    best = np.argmax(score, axis=-1)
    return {"best": cand[np.arange(len(cand)), best], "candidates": cand, "valid": np.asarray(s["valid"]),
            "scores": score}


def rag_sequence_generate(gen_config: BartConfig, params: Any, ctx: jax.Array, mask: jax.Array, scores: jax.Array,
                          o: DecodeOptions, decoding: str = "thorough", bos_token_id: int | None = 0,
                          epsilon: float = 0.0, hf_unmasked_candidates: bool = False) -> np.ndarray:
    out = rag_sequence_candidates(gen_config, params, ctx, mask, scores, o, decoding, bos_token_id, epsilon,
                                  hf_unmasked_candidates)
    # HF pads every example to the longest candidate any document produced.
    width = 1 + int(generated_lengths(out["candidates"], o.eos_token_id).max())
    return out["best"][:, :width]
