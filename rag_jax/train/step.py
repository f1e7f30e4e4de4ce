"""The pure train step: gradient accumulation over micro-batches with
``lax.scan``, dropout rng folded with the step, one optax update.

``loss_fn(params, micro_batch, rng) -> (scalar loss, dict of scalar aux)``
is supplied by the model (RAG marginal NLL, closed-book BART...). Nothing here
knows about retrieval or RAG, so the same step serves every ablation.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rag_jax.train.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def split_micro_batches(batch: Any, accum_steps: int) -> Any:
    """``[accum * m, ...]`` leaves -> ``[accum, m, ...]``."""

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch dim {x.shape[0]} not divisible by grad accumulation {accum_steps}")
        return x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])

    return jax.tree.map(split, batch)


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, accum_steps: int = 1
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Returns a pure ``(state, batch[, resident]) -> (state, metrics)``; jit it with shardings.

    ``resident`` (default None) is a pytree of arrays that stay on the devices
    from step to step (an on-device index): given, it is passed whole to every
    micro-batch as ``loss_fn(params, micro_batch, rng, resident)``, never split.
    """

    def step(state: TrainState, batch: Any, resident: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        objective = loss_fn if resident is None else (lambda p, b, r: loss_fn(p, b, r, resident))
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        rng = jax.random.fold_in(state.rng, state.step)
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng)
        else:
            micro = split_micro_batches(batch, accum_steps)

            def body(carry: Any, xs: Any) -> tuple[Any, None]:
                g_sum, l_sum, a_sum, i = carry
                (l, a), g = grad_fn(state.params, xs, jax.random.fold_in(rng, i))
                g_sum = jax.tree.map(jnp.add, g_sum, g)
                a_sum = jax.tree.map(jnp.add, a_sum, a)
                return (g_sum, l_sum + l, a_sum, i + 1), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            first = jax.tree.map(lambda x: x[0], micro)
            aux_shapes = jax.eval_shape(lambda: objective(state.params, first, rng)[1])
            aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes)
            (grads, loss, aux, _), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), aux_zeros, jnp.zeros((), jnp.int32)), micro
            )
            scale = 1.0 / accum_steps
            grads = jax.tree.map(lambda g: g * scale, grads)
            loss = loss * scale
            aux = jax.tree.map(lambda a: a * scale, aux)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Checked in-graph: one fused reduction instead of an eager op per
        # (sharded) leaf on the host.
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "params_finite": finite, **aux}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return step


def jit_train_step(
    step: Callable, state_shardings: TrainState, batch_shardings: Any, resident_shardings: Any = None
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``jax.jit`` with explicit in/out shardings; the old state is donated (the resident arrays are not)."""
    extra = () if resident_shardings is None else (resident_shardings,)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings) + extra,
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
