"""Retrieval inside the compiled train step (``retrieval.on_device``).

The index's document vectors and its passage token table
(``retrieval.token_table``) are placed on the mesh once, their rows sharded
over the mesh axes the batch is split over; rows are padded to a multiple of
the shard count and the padding is never retrieved. Inside the step:

* every shard scores the (all-gathered) questions against its own rows and
  keeps its top k (``lax.top_k``, or ``lax.approx_max_k`` with a recall
  target); only those ``k`` candidates per shard cross the interconnect and
  are merged into the global top k (``index.make_sharded_topk``'s pattern,
  ties to the lowest row as the unsharded search);
* the chosen rows' vectors and tokens are read on the shard that owns them
  and summed over shards (the others contribute zeros), so no device ever
  holds the whole table;
* ``assemble_contexts`` joins passage and question tokens into the
  generator input, truncated and padded as HF's tokenizer call.

Every function here is pure and jittable; ``place_index`` is the one host step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEVICE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def shard_count(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def padded_rows(count: int, shards: int) -> int:
    return max(math.ceil(count / shards), 1) * shards


def bytes_per_device(count: int, dim: int, width: int, shards: int, dtype: str = "float32") -> int:
    """Device memory one shard of an on-device index takes: its rows of vectors
    (``dim`` x 4 or 2 bytes), tokens (``width`` x int32) and lengths (int32)."""
    per = padded_rows(count, shards) // shards
    return per * (dim * np.dtype(DEVICE_DTYPES[dtype]).itemsize + 4 * width + 4)


@dataclass(frozen=True)
class DeviceIndex:
    """The index on the mesh: ``vectors`` ``[R, D]``, ``tokens`` ``[R, W]``,
    ``lengths`` ``[R]`` global arrays (``R`` = rows padded to the shard count);
    ``count`` real rows; ``axes`` the mesh axes the rows are split over."""

    vectors: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    count: int
    axes: tuple[str, ...]

    def arrays(self) -> dict[str, jax.Array]:
        return {"vectors": self.vectors, "tokens": self.tokens, "lengths": self.lengths}

    def shardings(self) -> dict[str, NamedSharding]:
        return {k: v.sharding for k, v in self.arrays().items()}


def place_index(vectors: Any, tokens: np.ndarray, lengths: np.ndarray, mesh: Mesh, axes: tuple[str, ...],
                dtype: str = "float32") -> DeviceIndex:
    """Global arrays built from host row sources (memory-mapped is fine): each
    process reads only the rows of the shards its own devices hold.

    ``vectors`` needs ``get(rows) -> float32 [n, D]`` and ``.count``/``.dim``
    (an ``EmbeddingStore``) or is a ``[N, D]`` array.
    """
    if dtype not in DEVICE_DTYPES:
        raise ValueError(f"device dtype must be one of {tuple(DEVICE_DTYPES)}, got {dtype!r}")
    if isinstance(vectors, np.ndarray):
        count, dim = vectors.shape
        read_vectors = lambda a, b: np.asarray(vectors[a:b], np.float32)  # noqa: E731
    else:
        count, dim = vectors.count, vectors.dim
        read_vectors = lambda a, b: vectors.get(np.arange(a, b))  # noqa: E731
    if len(tokens) != count or len(lengths) != count:
        raise ValueError(f"{count} document vectors but {len(tokens)} token rows and {len(lengths)} lengths")
    rows = padded_rows(count, shard_count(mesh, axes))
    width = tokens.shape[1]
    sharding = NamedSharding(mesh, P(axes))

    def block(read: Any, shape: tuple[int, ...], np_dtype: Any) -> Any:
        def cb(index: tuple[slice, ...]) -> np.ndarray:
            a, b, _ = index[0].indices(rows)
            out = np.zeros((b - a,) + shape, np_dtype)  # padding rows stay zero
            hi = min(b, count)
            if hi > a:
                out[: hi - a] = read(a, hi)
            return out
        return cb

    vec_dtype = np.dtype(DEVICE_DTYPES[dtype])
    v = jax.make_array_from_callback((rows, dim), sharding, block(read_vectors, (dim,), vec_dtype))
    t = jax.make_array_from_callback((rows, width), sharding, block(lambda a, b: tokens[a:b], (width,), np.int32))
    n = jax.make_array_from_callback((rows,), sharding, block(lambda a, b: lengths[a:b], (), np.int32))
    return DeviceIndex(v, t, n, count, tuple(axes))


def retrieve(q: jax.Array, index: dict[str, jax.Array], *, mesh: Mesh, axes: tuple[str, ...], count: int, k: int,
             approx_recall: float = 0.0) -> dict[str, jax.Array]:
    """Top ``k`` rows per question of ``q`` ``[B, D]``, best first, from the
    sharded ``index`` (``DeviceIndex.arrays()``): ``rows`` ``[B, k]``,
    ``scores`` ``[B, k]`` (float32, from the vectors as stored), ``vectors``
    ``[B, k, D]`` float32, ``tokens`` ``[B, k, W]``, ``lengths`` ``[B, k]``.

    ``approx_recall`` 0 is exact (``lax.top_k``); in (0, 1) each shard uses
    ``lax.approx_max_k`` with that recall target (approximate on TPU; other
    backends compute it exactly). No gradient flows through the search.
    """
    q = jax.lax.stop_gradient(q)

    def local(q: jax.Array, v: jax.Array, t: jax.Array, n: jax.Array) -> tuple[jax.Array, ...]:
        per = v.shape[0]
        if k > per:
            raise ValueError(f"k={k} exceeds the {per} index rows per shard; use fewer shards")
        first = jax.lax.axis_index(axes) * per
        # bfloat16 vectors rank bfloat16 questions with float32 accumulation (the TPU-native matmul).
        s = jnp.dot(q.astype(v.dtype), v.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        valid = first + jnp.arange(per) < count
        s = jnp.where(valid[None, :], s, -jnp.inf)
        if approx_recall:
            sv, si = jax.lax.approx_max_k(s, k, recall_target=approx_recall)
        else:
            sv, si = jax.lax.top_k(s, k)
        sv_all = jax.lax.all_gather(sv, axes, axis=1, tiled=True)
        si_all = jax.lax.all_gather(si + first, axes, axis=1, tiled=True)
        scores, j = jax.lax.top_k(sv_all, k)
        rows = jnp.take_along_axis(si_all, j, axis=1)
        # Each shard reads the chosen rows it owns; a sum over shards assembles them.
        mine = (rows >= first) & (rows < first + per)
        local_rows = jnp.clip(rows - first, 0, per - 1)

        def own(x: jax.Array) -> jax.Array:
            got = x[local_rows]
            m = mine.reshape(mine.shape + (1,) * (got.ndim - 2))
            return jax.lax.psum(jnp.where(m, got, jnp.zeros_like(got)), axes)

        return rows, scores, own(v.astype(jnp.float32)), own(t), own(n)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P(axes), P(axes)),
                       out_specs=(P(),) * 5, check_vma=False)
    rows, scores, vectors, tokens, lengths = fn(q, index["vectors"], index["tokens"], index["lengths"])
    return {"rows": rows, "scores": scores, "vectors": vectors, "tokens": tokens, "lengths": lengths}


def assemble_contexts(passage_tokens: jax.Array, passage_lengths: jax.Array, question_tokens: jax.Array,
                      question_lengths: jax.Array, *, length: int, bos: int, eos: int, pad: int
                      ) -> tuple[jax.Array, jax.Array]:
    """``<s> passage question </s>`` padded to ``length``: ``[B, K, length]`` ids and mask.

    ``passage_*`` ``[B, K, W]``/``[B, K]``, ``question_*`` ``[B, Wq]``/``[B]``.
    As HF's tokenizer call with ``truncation=True, max_length=length``: the
    joined tokens are cut to ``length - 2`` before the two specials are added.
    """
    body = length - 2
    w, wq = passage_tokens.shape[-1], question_tokens.shape[-1]
    j = jnp.arange(body)
    lp = passage_lengths[..., None]  # [B, K, 1]
    from_passage = j < lp
    p = jnp.take_along_axis(passage_tokens, jnp.broadcast_to(jnp.clip(j, 0, w - 1), passage_tokens.shape[:-1] + (body,)),
                            axis=-1)
    qj = jnp.clip(j - lp, 0, wq - 1)  # [B, K, body]
    qt = jnp.take_along_axis(jnp.broadcast_to(question_tokens[:, None, :], qj.shape[:2] + (wq,)), qj, axis=-1)
    n = jnp.minimum(lp + question_lengths[:, None, None], body)  # tokens kept between the specials
    content = jnp.where(from_passage, p, qt)
    content = jnp.where(j < n, content, pad)
    b, kk = passage_tokens.shape[:2]
    ids = jnp.concatenate([jnp.full((b, kk, 1), bos, content.dtype), content, jnp.full((b, kk, 1), pad, content.dtype)],
                          axis=-1)
    pos = jnp.arange(length)
    ids = jnp.where(pos == n + 1, eos, ids)
    mask = (pos <= n + 1).astype(jnp.int32)
    return ids.astype(jnp.int32), mask
