"""BERT encoder with the DPR pooled output (a DPR question or context tower).

DPR takes the final hidden state of ``[CLS]`` (no BERT pooler) and, when
``projection_dim > 0``, a linear ``encode_proj`` on top.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from rag_jax.models.layers import (
    PRECISIONS, REMAT_MODES, Attention, Dense, Embed, LayerNorm, activation, padding_bias, remat_layer,
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    projection_dim: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: str = "highest"  # of every matmul (models/layers.py PRECISIONS)
    remat: str = "none"  # what each layer keeps for backward (models/layers.py REMAT_MODES)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        activation(self.hidden_act)  # fails early on an unknown name
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not in {PRECISIONS}")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"remat {self.remat!r} not in {REMAT_MODES}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def output_dim(self) -> int:
        return self.projection_dim if self.projection_dim > 0 else self.hidden_size

    def replace(self, **kw: Any) -> "BertConfig":
        return dataclasses.replace(self, **kw)


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        kw = dict(init_std=c.initializer_range, dtype=c.dtype, param_dtype=c.param_dtype, precision=c.precision)
        attn = Attention(
            num_heads=c.num_attention_heads,
            head_dim=c.head_dim,
            out_features=c.hidden_size,
            dropout_rate=c.attention_probs_dropout_prob,
            name="attention",
            **kw,
        )(x, x, bias, deterministic=deterministic)
        attn = nn.Dropout(c.hidden_dropout_prob)(attn, deterministic=deterministic)
        x = LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="attention_ln")(x + attn)
        h = Dense(c.intermediate_size, ("embed", "mlp"), name="intermediate", **kw)(x)
        h = activation(c.hidden_act)(h)
        h = Dense(c.hidden_size, ("mlp", "embed"), name="output", **kw)(h)
        h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
        return LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="output_ln")(x + h)


class DprEncoder(nn.Module):
    """``(input_ids, attention_mask, token_type_ids) -> [B, output_dim]``."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
        return_sequence: bool = False,
    ) -> jax.Array:
        c = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        emb_kw = dict(init_std=c.initializer_range, dtype=c.dtype, param_dtype=c.param_dtype, precision=c.precision)
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (
            Embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), name="word_embeddings", **emb_kw)(input_ids)
            + Embed(
                c.max_position_embeddings, c.hidden_size, ("position", "embed"), name="position_embeddings", **emb_kw
            )(positions)
            + Embed(
                c.type_vocab_size, c.hidden_size, ("type_vocab", "embed"), name="token_type_embeddings", **emb_kw
            )(jnp.asarray(token_type_ids, jnp.int32))
        )
        x = LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="embeddings_ln")(x)
        x = nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)
        bias = padding_bias(attention_mask)
        layer = remat_layer(BertLayer, c.remat, (3,))  # static: deterministic
        for i in range(c.num_hidden_layers):
            x = layer(c, name=f"layer_{i}")(x, bias, deterministic)
        if return_sequence:
            return x.astype(jnp.float32)
        pooled = x[:, 0, :]
        if c.projection_dim > 0:
            pooled = Dense(
                c.projection_dim,
                ("embed", "proj"),
                init_std=c.initializer_range,
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                precision=c.precision,
                name="encode_proj",
            )(pooled)
        return pooled.astype(jnp.float32)
