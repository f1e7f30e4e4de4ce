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
    unprocessed log-probs of the generated tokens (``raw``) and of the first one (``raw_first``)."""
    t_max = o.max_length
    seqs = jnp.full((n, t_max), o.pad_token_id, jnp.int32).at[:, 0].set(o.decoder_start_token_id)
    init = (jnp.int32(1), seqs, jnp.ones((n,), bool), cache, jnp.zeros((n,)), jnp.zeros((n,)))

    def cond(s: tuple) -> jax.Array:
        cur_len, _, unfinished, *_ = s
        return (cur_len < t_max) & jnp.any(unfinished)

    def body(s: tuple) -> tuple:
        cur_len, seqs, unfinished, cache, raw, raw_first = s
        tokens = jax.lax.dynamic_index_in_dim(seqs, cur_len - 1, axis=1, keepdims=False)
        logits, cache = step_fn(cache, tokens)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nxt = jnp.argmax(_process(lp, cur_len, o), axis=-1).astype(jnp.int32)
        nxt = jnp.where(unfinished, nxt, o.pad_token_id)
        # raw sums mirror HF re-scoring, which masks every target equal to pad
        tok_lp = jnp.where(unfinished & (nxt != o.pad_token_id), jnp.take_along_axis(lp, nxt[:, None], -1)[:, 0], 0.0)
        raw_first = jnp.where(cur_len == 1, tok_lp, raw_first)
        seqs = jax.lax.dynamic_update_index_in_dim(seqs, nxt, cur_len, axis=1)
        unfinished = unfinished & ~((nxt == o.eos_token_id) | (cur_len + 1 >= t_max))
        return cur_len + 1, seqs, unfinished, cache, raw + tok_lp, raw_first

    _, seqs, _, _, raw, raw_first = jax.lax.while_loop(cond, body, init)
    return {"sequences": seqs, "raw": raw, "raw_first": raw_first}


def beam_search(
    step_fn: StepFn, reorder_fn: Callable[[Any, jax.Array], Any], cache: Any, batch: int, o: DecodeOptions,
    vocab_size: int,
) -> dict[str, jax.Array]:
    """HF's vectorised beam search. Rows of ``step_fn`` are ``batch * num_beams``
    (beam-major within an example). Returns the finished hypotheses sorted best
    first: ``sequences [B, nb, max_length]``, ``scores [B, nb]`` (length-
    normalised, as HF ``sequences_scores``), ``lengths [B, nb]`` (generated
    tokens) and the unprocessed log-prob sums ``raw``/``raw_first``."""
    nb, t_max, v = o.num_beams, o.max_length, vocab_size
    keep = 2 * nb  # HF: max(2, 1 + number of eos ids) * num_beams, one eos id here
    fill = (o.pad_token_id or o.eos_token_id)
    lp_pow = o.length_penalty
    run_seq = jnp.full((batch, nb, t_max), fill, jnp.int32).at[:, :, 0].set(o.decoder_start_token_id)
    f32 = jnp.float32
    state = dict(
        cur_len=jnp.int32(1), done=jnp.bool_(False), cache=cache,
        run_seq=run_seq, run_score=jnp.zeros((batch, nb), f32).at[:, 1:].set(NEG),
        run_len=jnp.zeros((batch, nb), jnp.int32), run_raw=jnp.zeros((batch, nb), f32),
        run_raw0=jnp.zeros((batch, nb), f32),
        seq=run_seq, score=jnp.full((batch, nb), NEG, f32), fin=jnp.zeros((batch, nb), bool),
        length=jnp.zeros((batch, nb), jnp.int32), raw=jnp.zeros((batch, nb), f32), raw0=jnp.zeros((batch, nb), f32),
        unsat=jnp.ones((batch, 1), bool),
    )
    in_top = (jnp.arange(keep) < nb)[None]
    offsets = (jnp.arange(batch) * nb)[:, None]

    def body(s: dict) -> dict:
        cur_len = s["cur_len"]
        tokens = jax.lax.dynamic_index_in_dim(s["run_seq"], cur_len - 1, axis=2, keepdims=False).reshape(-1)
        logits, cache = step_fn(s["cache"], tokens)
        raw_lp = jax.nn.log_softmax(logits.astype(f32), axis=-1)
        lp = _process(raw_lp, cur_len, o)
        acc = lp.reshape(batch, nb, v) + s["run_score"][:, :, None]
        # Top 2*nb of nb*V in two stages (per beam, then among nb*2*nb): the
        # same result and tie order (lower flat index first) as one top_k
        # over the flattened row, without sorting nb*V values per step.
        part_lp, part_idx = jax.lax.top_k(acc, keep)  # [batch, nb, keep]
        flat_idx = (part_idx + (jnp.arange(nb) * v)[None, :, None]).reshape(batch, nb * keep)
        top_lp, pick = jax.lax.top_k(part_lp.reshape(batch, nb * keep), keep)
        top_idx = jnp.take_along_axis(flat_idx, pick, axis=1)
        beam = top_idx // v
        tok = (top_idx % v).astype(jnp.int32)
        top_seq = jax.lax.dynamic_update_index_in_dim(_rows(s["run_seq"], beam), tok, cur_len, axis=2)
        tok_raw = jnp.take_along_axis(raw_lp.reshape(batch, nb * v), top_idx, axis=1)
        tok_raw = jnp.where(tok == o.pad_token_id, 0.0, tok_raw)  # HF re-scoring masks pad targets
        top_raw = _rows(s["run_raw"], beam) + tok_raw
        top_raw0 = jnp.where(cur_len == 1, tok_raw, _rows(s["run_raw0"], beam))
        top_len = _rows(s["run_len"], beam) + 1
        hits = (tok == o.eos_token_id) | (cur_len + 1 >= t_max)

        # beams that go on
        run_lp = top_lp + hits.astype(f32) * NEG
        nxt = jax.lax.top_k(run_lp, nb)[1]
        src_beam = _rows(beam, nxt)
        out = dict(
            run_seq=_rows(top_seq, nxt), run_score=_rows(run_lp, nxt), run_len=_rows(top_len, nxt),
            run_raw=_rows(top_raw, nxt), run_raw0=_rows(top_raw0, nxt),
        )

        # finished hypotheses
        just = hits & in_top
        fin_lp = top_lp / (cur_len.astype(f32) ** lp_pow)
        full = jnp.all(s["fin"], axis=-1, keepdims=True) & (o.early_stopping is True)
        fin_lp = fin_lp + full.astype(f32) * NEG + (~s["unsat"]).astype(f32) * NEG + (~just).astype(f32) * NEG
        m_score = jnp.concatenate([s["score"], fin_lp], 1)
        pick = jax.lax.top_k(m_score, nb)[1]
        merge = lambda a, b: _rows(jnp.concatenate([a, b], 1), pick)  # noqa: E731
        out.update(
            seq=merge(s["seq"], top_seq), score=_rows(m_score, pick), fin=merge(s["fin"], just),
            length=merge(s["length"], top_len), raw=merge(s["raw"], top_raw), raw0=merge(s["raw0"], top_raw0),
        )
        out["cache"] = reorder_fn(cache, (src_beam + offsets).reshape(-1))

        cur_len = cur_len + 1
        if o.early_stopping == "never" and lp_pow > 0.0:
            best_len = jnp.float32(t_max - 1)
        else:
            best_len = (cur_len - 1).astype(f32)
        best = out["run_score"][:, :1] / best_len ** lp_pow
        worst = jnp.where(out["fin"], jnp.min(out["score"], axis=1, keepdims=True), NEG)
        unsat = s["unsat"] & jnp.any(best > worst, axis=-1, keepdims=True)
        go_on = jnp.any(unsat) & ~(jnp.all(out["fin"]) & (o.early_stopping is True)) & ~jnp.all(hits)
        out.update(cur_len=cur_len, unsat=unsat, done=~go_on)
        return out

    s = jax.lax.while_loop(lambda s: ~s["done"], body, state)
    return {"sequences": s["seq"], "scores": s["score"], "lengths": s["length"], "raw": s["raw"], "raw_first": s["raw0"]}


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
    own = (beams["raw"] - jnp.where(jnp.repeat(use_bos, k)[:, None], beams["raw_first"], 0.0)).reshape(b, k, nb)
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
