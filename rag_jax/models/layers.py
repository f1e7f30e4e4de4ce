"""Building blocks shared by the BERT (DPR) and BART networks.

Every parameter is created through ``nn.with_logical_partitioning`` so that
``rag_jax.parallel.rules`` can map it onto a device mesh. Attention kernels are
kept in ``[embed, heads, head_dim]`` / ``[heads, head_dim, embed]`` layout so
the heads axis can be sharded for tensor parallelism; the HF converter
reshapes to and from PyTorch's ``[out, in]`` matrices.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

# The compute and parameter dtypes a config may name (``model.dtype``, ``model.param_dtype``).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The matmul precisions a config may name (``model.matmul_precision``), as
# ``jax.lax.Precision`` spells them. "highest" keeps float32 matmuls exact on
# accelerators (HF parity); "default" lets them use bf16/tf32 passes.
PRECISIONS = ("default", "high", "highest")

# What a transformer layer keeps for its backward pass (``model.remat``):
# "none" keeps every intermediate; "minimal" keeps only the outputs of matmuls
# against weights (projections, FFN) and recomputes the cheap rest
# (attention scores/probabilities, softmax, GELU, layer norms, dropout masks);
# "full" keeps only the layer's inputs and recomputes the whole layer.
REMAT_MODES = ("none", "minimal", "full")

Dtype = Any
Array = jax.Array


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


# HF ``hidden_act`` / ``activation_function`` names -> functions with the same
# math as transformers.activations.ACT2FN.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@functools.lru_cache(maxsize=None)
def remat_layer(layer: type[nn.Module], mode: str, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """``layer`` itself for ``mode="none"``, else ``nn.remat(layer)`` with the
    mode's policy. ``static_argnums`` name the Python-bool arguments
    (``deterministic``, ``decode``), counting ``self`` as 0.

    The wrapped class creates the same params under the same names (a
    submodule's scope name comes from its ``name=``/attribute, not its class),
    so checkpoints and HF import/export do not see the mode. Outside a
    gradient the checkpoint lowers to its plain body (jax's remat lowering adds
    its CSE barriers only when differentiated), so decoding is unchanged.
    Cached per argument tuple so each mode makes one wrapped class.
    """
    if mode not in REMAT_MODES:
        raise ValueError(f"remat {mode!r} not in {REMAT_MODES}")
    if mode == "none":
        return layer
    # Dense/attention-projection matmuls are dot_generals without batch
    # dimensions (the weight is shared over every token); the attention
    # einsums batch over (batch, heads) and so are recomputed. Those scores
    # and probabilities are [rows, heads, L, L], the largest activations at
    # context length 300, while the kept projections are [rows, L, d] each.
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if mode == "minimal" else None
    return nn.remat(layer, policy=policy, static_argnums=static_argnums)


def partitioned(init: Callable, axes: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, axes)


def normal_init(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
    """``x @ kernel + bias`` over the trailing ``axis`` dims, logical axes on both."""

    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axes = tuple(a % x.ndim for a in axes)
        in_shape = tuple(x.shape[a] for a in axes)
        kernel = self.param(
            "kernel",
            partitioned(normal_init(self.init_std), self.kernel_axes),
            in_shape + features,
            self.param_dtype,
        )
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            jnp.asarray(kernel, self.dtype),
            ((axes, tuple(range(len(axes)))), ((), ())),
            precision=self.precision,
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                partitioned(nn.initializers.zeros_init(), self.kernel_axes[-len(features):]),
                features,
                self.param_dtype,
            )
            y = y + jnp.asarray(bias, self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm with statistics in float32 whatever the compute dtype."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param(
            "scale", partitioned(nn.initializers.ones_init(), ("norm",)), (features,), self.param_dtype
        )
        bias = self.param(
            "bias", partitioned(nn.initializers.zeros_init(), ("norm",)), (features,), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nn.Module):
    """An embedding table ``[num, features]``; ``attend`` gives tied logits."""

    num_embeddings: int
    features: int
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: str = "highest"

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            partitioned(normal_init(self.init_std), self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

    def attend(self, x: Array) -> Array:
        return jnp.einsum(
            "...d,vd->...v",
            x,
            jnp.asarray(self.embedding, self.dtype),
            precision=self.precision,
        )


def padding_bias(mask: Array, dtype: Dtype = jnp.float32) -> Array:
    """``[B, Lk]`` 1/0 key mask -> additive ``[B, 1, 1, Lk]`` bias."""
    big_neg = jnp.finfo(dtype).min
    return jnp.where(mask[:, None, None, :].astype(bool), 0.0, big_neg).astype(dtype)


def causal_bias(length: int, dtype: Dtype = jnp.float32) -> Array:
    """``[1, 1, L, L]`` additive bias allowing key j <= query i."""
    big_neg = jnp.finfo(dtype).min
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    return jnp.where(j <= i, 0.0, big_neg).astype(dtype)[None, None]


class Attention(nn.Module):
    """Multi-head attention with an optional incremental-decoding cache.

    ``decode=True`` on self-attention keeps ``cached_key``/``cached_value``
    of the full decode length plus ``cache_index`` in the ``cache``
    collection. The first call with an empty cache (made with a full-length
    dummy input, as flax's decoding examples do) only allocates it. On
    cross-attention, ``decode=True`` projects the encoder states once, on that
    first call, and reuses them on every step. The cached cross K/V may have
    fewer rows than the queries: ``rows = groups * kv_rows`` with each group
    of consecutive query rows (e.g. one document's beams) reading one K/V row.
    """

    num_heads: int
    head_dim: int
    out_features: int
    is_cross: bool = False
    dropout_rate: float = 0.0
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: str = "highest"

    def _proj(self, name: str) -> Dense:
        return Dense(
            features=(self.num_heads, self.head_dim),
            kernel_axes=("embed", "heads", "kv"),
            init_std=self.init_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x_q: Array,
        x_kv: Array,
        bias: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        query = self._proj("query")(x_q)
        key_proj, value_proj = self._proj("key"), self._proj("value")
        if decode and self.is_cross:
            if self.has_variable("cache", "cross_key"):
                key = self.get_variable("cache", "cross_key")
                value = self.get_variable("cache", "cross_value")
            else:
                key, value = key_proj(x_kv), value_proj(x_kv)
                self.put_variable("cache", "cross_key", key)
                self.put_variable("cache", "cross_value", value)
        else:
            key, value = key_proj(x_kv), value_proj(x_kv)

        if decode and not self.is_cross:
            initialised = self.has_variable("cache", "cached_key")
            cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if initialised:
                step = query.shape[1]
                idx = cache_index.value
                key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, idx, 0, 0))
                value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, idx, 0, 0))
                cached_key.value, cached_value.value = key, value
                cache_index.value = idx + step
                q_pos = idx + jnp.arange(step)[:, None]
                k_pos = jnp.arange(key.shape[1])[None, :]
                step_bias = jnp.where(k_pos <= q_pos, 0.0, jnp.finfo(jnp.float32).min)
                step_bias = step_bias[None, None].astype(jnp.float32)
                bias = step_bias if bias is None else bias + step_bias

        rows = query.shape[0]
        groups = rows // key.shape[0]
        if groups > 1:
            # Cached cross K/V shared by ``groups`` consecutive query rows (the
            # beams of one document): fold those rows into the query axis, so
            # each document's K/V is read once per step, not once per beam.
            if rows != groups * key.shape[0]:
                raise ValueError(f"{rows} query rows do not group over {key.shape[0]} key/value rows")
            query = query.reshape(key.shape[0], groups * query.shape[1], *query.shape[2:])
            if bias is not None and bias.shape[0] == rows:
                bias = bias[::groups]  # one document's key mask serves its beams
        scores = jnp.einsum(
            "bqhd,bkhd->bhqk", query, key, precision=self.precision
        ).astype(jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        if bias is not None:
            # Clamp so that two stacked -inf-like biases cannot overflow.
            scores = jnp.maximum(scores + bias, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        if self.dropout_rate > 0.0 and not deterministic:
            probs = nn.Dropout(rate=self.dropout_rate)(probs, deterministic=False)
        context = jnp.einsum(
            "bhqk,bkhd->bqhd", probs, value, precision=self.precision
        )
        if groups > 1:
            context = context.reshape(rows, -1, *context.shape[2:])
        return Dense(
            features=self.out_features,
            axis=(-2, -1),
            kernel_axes=("heads", "kv", "embed"),
            init_std=self.init_std,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="out",
        )(context)
