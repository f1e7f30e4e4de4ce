"""Train state and its shardings on a device mesh.

Parameter shardings come from the logical-axis rules. Optimizer-state leaves
that mirror a parameter (Adam's mu/nu, whatever wrappers surround them) get
that parameter's sharding, found by the trailing dict keys of the leaf's path;
every other leaf (step counts, masks) is replicated.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rag_jax.parallel import rules as R


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _path_keys(path: Sequence[Any]) -> tuple[str, ...]:
    keys: list[str] = []
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            keys.append(str(entry.key))
        else:
            break
    return tuple(reversed(keys))


def _flat_by_path(tree: Any) -> dict[tuple[str, ...], Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_keys(p): v for p, v in flat}


def opt_state_shardings(abstract_opt_state: Any, params_shardings: Any, abstract_params: Any, mesh: Mesh) -> Any:
    by_path = _flat_by_path(params_shardings)
    shapes = {k: v.shape for k, v in _flat_by_path(abstract_params).items()}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path: Sequence[Any], leaf: Any) -> NamedSharding:
        keys = _path_keys(path)
        # Match the longest suffix of the path that names a parameter of equal shape.
        for start in range(len(keys)):
            k = keys[start:]
            if k in by_path and shapes[k] == getattr(leaf, "shape", None):
                return by_path[k]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def state_shardings(
    boxed_params: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = R.DEFAULT_RULES,
) -> TrainState:
    """Shardings of every part of a TrainState, from (abstract) boxed params."""
    p_shard = R.mesh_shardings(boxed_params, mesh, rules)
    abstract_params = nn.meta.unbox(boxed_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=p_shard,
        opt_state=opt_state_shardings(abstract_opt, p_shard, abstract_params, mesh),
        rng=replicated,
    )


def create_state(
    params: Any, tx: optax.GradientTransformation, rng: jax.Array, shardings: TrainState
) -> TrainState:
    """Places unboxed params on the mesh and initialises the optimizer there."""
    params = jax.device_put(params, shardings.params)

    def init(p: Any, r: jax.Array) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r)

    return jax.jit(init, out_shardings=shardings)(params, rng)


def abstract_boxed(init_fn: Callable[[], Any]) -> Any:
    """``jax.eval_shape`` of an init function returning boxed (Partitioned) params."""
    return jax.eval_shape(init_fn)
