"""BART encoder-decoder (HF ``BartForConditionalGeneration`` math) with an
incremental-decoding cache.

Post-LN layers, learned positions with HF's offset of 2, optional
``sqrt(d_model)`` embedding scale, ``layernorm_embedding``, one token
embedding shared by encoder, decoder and the LM head, plus
``final_logits_bias``. ``dtype`` is the compute dtype, ``param_dtype`` the
storage dtype (bf16 compute over f32 params works).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from rag_jax.models.layers import (
    PRECISIONS, REMAT_MODES, Attention, Dense, Embed, LayerNorm, activation, causal_bias, padding_bias, remat_layer,
)


@dataclasses.dataclass(frozen=True)
class BartConfig:
    vocab_size: int = 50265
    d_model: int = 768
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 12
    decoder_attention_heads: int = 12
    encoder_ffn_dim: int = 3072
    decoder_ffn_dim: int = 3072
    activation_function: str = "gelu"
    max_position_embeddings: int = 1024
    scale_embedding: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: str = "highest"  # of every matmul (models/layers.py PRECISIONS)
    remat: str = "none"  # what each layer keeps for backward (models/layers.py REMAT_MODES)

    def __post_init__(self) -> None:
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not a multiple of {side}_attention_heads {heads}")
        activation(self.activation_function)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not in {PRECISIONS}")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat {self.remat!r} not in {REMAT_MODES}")

    def replace(self, **kw: Any) -> "BartConfig":
        return dataclasses.replace(self, **kw)


POSITION_OFFSET = 2  # HF BartLearnedPositionalEmbedding reads row position + 2


def _ffn_block(c: BartConfig, x: jax.Array, ffn_dim: int, deterministic: bool) -> jax.Array:
    """fc1 -> activation -> fc2, residual, post-LN; called inside a layer's
    compact ``__call__`` so its submodules (fc1, fc2, final_ln) belong to that layer."""
    kw = dict(init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype, precision=c.precision)
    h = activation(c.activation_function)(Dense(ffn_dim, ("embed", "mlp"), name="fc1", **kw)(x))
    h = nn.Dropout(c.activation_dropout)(h, deterministic=deterministic)
    h = Dense(c.d_model, ("mlp", "embed"), name="fc2", **kw)(h)
    h = nn.Dropout(c.dropout)(h, deterministic=deterministic)
    return LayerNorm(1e-5, c.dtype, c.param_dtype, name="final_ln")(x + h)


class EncoderLayer(nn.Module):
    config: BartConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        kw = dict(init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype, precision=c.precision)
        heads = c.encoder_attention_heads
        h = Attention(heads, c.d_model // heads, c.d_model, dropout_rate=c.attention_dropout, name="self_attn", **kw)(
            x, x, bias, deterministic=deterministic
        )
        h = nn.Dropout(c.dropout)(h, deterministic=deterministic)
        x = LayerNorm(1e-5, c.dtype, c.param_dtype, name="self_attn_ln")(x + h)
        return _ffn_block(c, x, c.encoder_ffn_dim, deterministic)


class DecoderLayer(nn.Module):
    config: BartConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        self_bias: jax.Array | None,
        enc: jax.Array | None,
        cross_bias: jax.Array,
        deterministic: bool,
        decode: bool,
    ) -> jax.Array:
        c = self.config
        kw = dict(init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype, precision=c.precision)
        heads = c.decoder_attention_heads
        h = Attention(heads, c.d_model // heads, c.d_model, dropout_rate=c.attention_dropout, name="self_attn", **kw)(
            x, x, self_bias, deterministic=deterministic, decode=decode
        )
        h = nn.Dropout(c.dropout)(h, deterministic=deterministic)
        x = LayerNorm(1e-5, c.dtype, c.param_dtype, name="self_attn_ln")(x + h)
        h = Attention(
            heads, c.d_model // heads, c.d_model, is_cross=True, dropout_rate=c.attention_dropout,
            name="encoder_attn", **kw,
        )(x, enc, cross_bias, deterministic=deterministic, decode=decode)
        h = nn.Dropout(c.dropout)(h, deterministic=deterministic)
        x = LayerNorm(1e-5, c.dtype, c.param_dtype, name="encoder_attn_ln")(x + h)
        return _ffn_block(c, x, c.decoder_ffn_dim, deterministic)


class Bart(nn.Module):
    """``encode``, ``decode`` (optionally one cached step at a time) and ``__call__``."""

    config: BartConfig

    def setup(self) -> None:
        c = self.config
        emb = dict(init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype, precision=c.precision)
        self.shared = Embed(c.vocab_size, c.d_model, ("vocab", "embed"), **emb)
        n_pos = c.max_position_embeddings + POSITION_OFFSET
        self.encoder_positions = Embed(n_pos, c.d_model, ("position", "embed"), **emb)
        self.decoder_positions = Embed(n_pos, c.d_model, ("position", "embed"), **emb)
        self.encoder_ln_embedding = LayerNorm(1e-5, c.dtype, c.param_dtype)
        self.decoder_ln_embedding = LayerNorm(1e-5, c.dtype, c.param_dtype)
        # Static arguments: EncoderLayer's deterministic; DecoderLayer's deterministic, decode.
        enc_layer, dec_layer = remat_layer(EncoderLayer, c.remat, (3,)), remat_layer(DecoderLayer, c.remat, (5, 6))
        self.encoder_layers = [enc_layer(c) for _ in range(c.encoder_layers)]
        self.decoder_layers = [dec_layer(c) for _ in range(c.decoder_layers)]
        self.final_logits_bias = self.param(
            "final_logits_bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
            (c.vocab_size,),
            c.param_dtype,
        )
        self.embed_dropout = nn.Dropout(c.dropout)

    def _embed(self, ids: jax.Array, positions: jax.Array, pos_table: Embed) -> jax.Array:
        scale = math.sqrt(self.config.d_model) if self.config.scale_embedding else 1.0
        return self.shared(ids) * scale + pos_table(positions + POSITION_OFFSET)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).astype(jnp.int32)
        x = self._embed(input_ids, jnp.arange(input_ids.shape[-1])[None], self.encoder_positions)
        x = self.embed_dropout(self.encoder_ln_embedding(x), deterministic=deterministic)
        bias = padding_bias(attention_mask)
        for layer in self.encoder_layers:
            x = layer(x, bias, deterministic)
        return x

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoder_hidden: jax.Array | None,
        encoder_mask: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        position_offset: jax.Array | int = 0,
        positions: jax.Array | None = None,
        self_attention_bias: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``[B, T, V]`` (float32). With ``decode=True`` the inputs are
        the next token(s) after ``position_offset`` already-cached ones.

        ``positions`` ``[B, T]`` and ``self_attention_bias`` ``[B | 1, 1, T, T]``
        (additive, replacing the causal bias) let one row hold a prefix tree
        of sequences: each token at its depth, attending to its ancestors."""
        ids = jnp.asarray(decoder_input_ids, jnp.int32)
        length = ids.shape[-1]
        if positions is None:
            positions = position_offset + jnp.arange(length)[None]
        elif decode:
            raise ValueError("positions are not supported with decode=True (the cache fixes them)")
        x = self._embed(ids, positions, self.decoder_positions)
        x = self.embed_dropout(self.decoder_ln_embedding(x), deterministic=deterministic)
        if decode:
            if decoder_attention_mask is not None:
                raise ValueError(
                    "decoder_attention_mask is not supported with decode=True: cached decoding writes every row "
                    "at the same position, so decoder inputs cannot be padded"
                )
            if self_attention_bias is not None:
                raise ValueError("self_attention_bias is not supported with decode=True")
            self_bias = None  # the cache builds the causal bias from its index
        else:
            self_bias = causal_bias(length) if self_attention_bias is None else self_attention_bias
            if decoder_attention_mask is not None:
                self_bias = self_bias + padding_bias(decoder_attention_mask)
        cross_bias = padding_bias(encoder_mask)
        for layer in self.decoder_layers:
            x = layer(x, self_bias, encoder_hidden, cross_bias, deterministic, decode)
        logits = self.shared.attend(x).astype(jnp.float32)
        # HF registers final_logits_bias as a buffer: it is never trained, and
        # its [tokens, vocab] gradient reduction cost ~4% of a BART-base step.
        return logits + jax.lax.stop_gradient(self.final_logits_bias).astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).astype(jnp.int32)
        enc = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask, deterministic)


# ---------------------------------------------------------------------------
# Pure helpers for incremental decoding (used inside lax.while_loop).
# The cache is a pytree whose leaves have the batch first, except the scalar
# ``cache_index`` of each self-attention layer.
# ---------------------------------------------------------------------------


def init_cache(
    model: Bart, params: Any, encoder_hidden: jax.Array, encoder_mask: jax.Array, max_length: int
) -> Any:
    """Self-attention caches of ``max_length`` zeros and cross-attention K/V
    projected once from ``encoder_hidden``.

    ``max_length`` must be a Python int (it fixes the cache shape, so the
    decoding loop never recompiles). Leaves: per decoder layer
    ``self_attn/{cached_key,cached_value}`` ``[N, max_length, H, Dh]``,
    ``self_attn/cache_index`` (int32 scalar), ``encoder_attn/{cross_key,
    cross_value}`` ``[N, L_enc, H, Dh]``, all in the compute dtype.

    The cache is allocated by one dummy decoder pass over ``max_length``
    tokens; call this under ``jax.jit`` (as decoding loops do) and XLA drops
    that pass, keeping only the cross-attention K/V projections (checked on
    the compiled HLO: no vocabulary-sized matmul remains).
    """
    n = encoder_hidden.shape[0]
    dummy = jnp.zeros((n, int(max_length)), jnp.int32)
    _, variables = model.apply(
        {"params": params}, dummy, encoder_hidden, encoder_mask, decode=True, method=Bart.decode, mutable=["cache"]
    )
    return variables["cache"]


def cache_position(cache: Any) -> jax.Array:
    """Number of tokens already decoded into ``cache`` (int32 scalar)."""
    return cache["decoder_layers_0"]["self_attn"]["cache_index"]


def decode_tokens(
    model: Bart,
    params: Any,
    cache: Any,
    token_ids: jax.Array,
    encoder_hidden: jax.Array | None,
    encoder_mask: jax.Array,
) -> tuple[jax.Array, Any]:
    """Feeds ``t`` tokens ``[N, t]`` after the cached ones (e.g. a forced
    prefix) -> logits ``[N, t, V]`` float32 and the advanced cache.

    ``encoder_hidden`` is not read (the cross-attention K/V are in the
    cache); it is accepted so callers can pass what they have.
    """
    del encoder_hidden
    logits, variables = model.apply(
        {"params": params, "cache": cache},
        jnp.asarray(token_ids, jnp.int32),
        None,
        encoder_mask,
        decode=True,
        position_offset=cache_position(cache),
        method=Bart.decode,
        mutable=["cache"],
    )
    return logits, variables["cache"]


def decode_step(
    model: Bart,
    params: Any,
    cache: Any,
    token_ids: jax.Array,
    encoder_hidden: jax.Array | None,
    encoder_mask: jax.Array,
) -> tuple[jax.Array, Any]:
    """One token per row (``[N, 1]`` or ``[N]``) -> next-token logits
    ``[N, V]`` float32 and the advanced cache. Shapes are fixed, so it can run
    inside ``lax.while_loop``; the cache must not overflow ``max_length``
    (``dynamic_update_slice`` would silently clamp the write)."""
    token_ids = jnp.asarray(token_ids, jnp.int32).reshape(-1, 1)
    logits, cache = decode_tokens(model, params, cache, token_ids, encoder_hidden, encoder_mask)
    return logits[:, -1], cache


def init_params(config: BartConfig, rng: jax.Array, boxed: bool = False) -> Any:
    ids = jnp.ones((1, 4), jnp.int32)
    variables = Bart(config).init(rng, ids, jnp.ones_like(ids), ids)
    return variables["params"] if boxed else nn.meta.unbox(variables["params"])


def sinusoidal_positions(num_rows: int, d_model: int, scale: float) -> jax.Array:
    """A ``[num_rows, d_model]`` sin/cos table (Vaswani et al.) times ``scale``.

    Used only to *initialise* BART's learned position tables when training
    from scratch: a shift by k positions is then a fixed linear map of the
    table, so attention to the previous tokens (what copying an answer span
    out of a passage needs) is learnable from the first step, whereas small
    random tables leave a from-scratch generator on a long plateau. The
    tables stay ordinary trainable HF ``embed_positions`` weights."""
    pos = jnp.arange(num_rows, dtype=jnp.float32)[:, None]
    freq = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
    table = jnp.zeros((num_rows, d_model), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(pos * freq)).at[:, 1::2].set(jnp.cos(pos * freq)[:, : d_model // 2])
    return scale * table


def with_sinusoidal_positions(params: Any, scale: float) -> Any:
    """``params`` with both position tables replaced by :func:`sinusoidal_positions`."""
    out = dict(params)
    for name in ("encoder_positions", "decoder_positions"):
        table = params[name]["embedding"]
        out[name] = {**params[name], "embedding": sinusoidal_positions(*table.shape, scale).astype(table.dtype)}
    return out
