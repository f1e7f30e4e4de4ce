"""Train state and its shardings on a device mesh.

Parameter shardings come from the logical-axis rules. The optimizer state is
initialised abstractly on the boxed (``nn.Partitioned``) params, so every
leaf that mirrors a parameter (Adam's mu/nu, whatever wrappers surround them)
keeps that parameter's logical axes and lands where the parameter does; every
other leaf (step counts, masks) is replicated.
"""
from __future__ import annotations

from typing import Any, Sequence

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


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def opt_state_shardings(
    boxed_params: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = R.DEFAULT_RULES,
) -> Any:
    """Shardings of ``tx.init(params)``, derived from the boxed params."""
    boxed_opt = jax.eval_shape(tx.init, boxed_params)
    # optax.multi_transform / masked put a leafless MaskedNode where a leaf is
    # masked out (a frozen parameter has no Adam moments); mapped over boxed
    # params, it comes back still in its box. Unboxed, it is pure structure,
    # as in the state that ``tx.init`` builds from unboxed params.
    boxed_opt = jax.tree.map(
        lambda x: x.value if _is_box(x) and not jax.tree.leaves(x.value) else x, boxed_opt, is_leaf=_is_box
    )
    return R.mesh_shardings(boxed_opt, mesh, rules)


def state_shardings(
    boxed_params: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = R.DEFAULT_RULES,
) -> TrainState:
    """Shardings of every part of a TrainState, from (abstract) boxed params."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=R.mesh_shardings(boxed_params, mesh, rules),
        opt_state=opt_state_shardings(boxed_params, tx, mesh, rules),
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
