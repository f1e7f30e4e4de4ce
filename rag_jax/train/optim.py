"""Optimizer: AdamW with warm-up + decay, global-norm clipping, HF-style
weight-decay exclusions and frozen subtrees.

Matches HF ``finetune_rag.py`` (``transformers.get_*_schedule_with_warmup``
plus torch AdamW) step for step: optax evaluates the schedule at the number of
updates already applied, as torch's LambdaLR does, so the first update uses
lr(0) = 0 under warm-up, exactly like HF.
"""
from __future__ import annotations

import re
from typing import Mapping, Any, Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("polynomial", "linear", "constant")

# A module is a norm layer when a path component is, or is delimited as, one
# of these words: "attention_ln", "ln_f", "layernorm", "LayerNorm",
# "final_layer_norm", "embeddings_ln", "encoder_ln_embedding", "norm".
_NORM_MODULE = re.compile(r"(^|_)(ln|layernorm|layer_norm|norm|rmsnorm)(_|$|\d)", re.IGNORECASE)


def make_schedule(
    lr: float,
    warmup_steps: int,
    total_steps: int,
    kind: str = "polynomial",
    end_lr: float = 1e-7,
    power: float = 1.0,
) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr``, then ``kind`` decay.

    polynomial: HF ``get_polynomial_decay_schedule_with_warmup`` (to
    ``end_lr`` at ``total_steps`` with ``power``, then held); linear: the same
    with ``end_lr=0, power=1`` (HF ``get_linear_schedule_with_warmup``);
    constant: HF ``get_constant_schedule_with_warmup``.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"bad steps: warmup {warmup_steps}, total {total_steps}")
    if kind == "polynomial" and not end_lr < lr:
        raise ValueError(f"end_lr ({end_lr}) must be below lr ({lr})")
    if kind == "linear":
        end_lr, power = 0.0, 1.0
    warm = max(warmup_steps, 1)

    def warmup(count: jax.Array) -> jax.Array:
        # HF's lr * step / warmup. optax.linear_schedule computes
        # lr - lr * (1 - step / warmup) instead, which rounds differently.
        return lr * jnp.asarray(count, jnp.float32) / warm

    if kind == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(lr)], [warmup_steps])
    decay_steps = max(total_steps - warmup_steps, 1)
    decay = optax.polynomial_schedule(lr, end_lr, power, decay_steps)
    # From total_steps on HF gives exactly end_lr. Held by the clipped
    # polynomial, it would carry XLA's rounding of 1 - n * (1 / n) under jit.
    end = warmup_steps + decay_steps
    return optax.join_schedules([warmup, decay, optax.constant_schedule(end_lr)], [warmup_steps, end])


def path_name(path: Sequence[Any]) -> str:
    """``a/b/c`` for a key path (dict keys, attribute names, list indices)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def is_no_decay(path: Sequence[Any]) -> bool:
    """HF's no_decay rule on our names: any bias, and the scale of a norm layer."""
    if not path:
        return False
    names = path_name(path).split("/")
    leaf = names[-1]
    if "bias" in leaf.lower():
        return True
    return any(_NORM_MODULE.search(n) for n in names[:-1]) or "norm" in leaf.lower()


def decay_mask(params: Any) -> Any:
    """Tree of bools, True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda p, _: not is_no_decay(p), params)


def freeze_labels(params: Any, frozen: Sequence[str] = ()) -> Any:
    """'frozen' for leaves whose path (``a/b/c``) starts with a prefix in
    ``frozen``, 'train' for the rest. A prefix that matches no parameter fails
    (a typo would freeze nothing)."""
    prefixes = [f.strip("/") for f in frozen]
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(p) for p, _ in flat]

    def under(name: str, pre: str) -> bool:
        return name == pre or name.startswith(pre + "/")

    for pre in prefixes:
        if not any(under(n, pre) for n in names):
            top = sorted({n.split("/")[0] for n in names})
            raise ValueError(f"frozen prefix {pre!r} matches no parameter; top-level names: {top}")
    return treedef.unflatten(["frozen" if any(under(n, pre) for pre in prefixes) else "train" for n in names])


def make_optimizer(
    lr: float,
    warmup_steps: int,
    total_steps: int,
    *,
    schedule: str = "polynomial",
    end_lr: float = 1e-7,
    power: float = 1.0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    frozen: Sequence[str] = (),
    lr_scales: Mapping[str, float] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule). ``frozen`` path prefixes get zero updates;
    ``lr_scales`` maps top-level parameter groups to a learning-rate factor
    (a pretrained question encoder fine-tuned next to a generator trained
    from scratch wants a far smaller step).

    Clipping sees only trainable gradients (torch clips only parameters that
    require grad), and frozen leaves carry no Adam moments.
    """
    sched = make_schedule(lr, warmup_steps, total_steps, schedule, end_lr, power)
    parts = []
    if max_grad_norm is not None and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    if lr_scales:
        parts.append(scale_groups(dict(lr_scales)))
    tx = optax.chain(*parts)
    if frozen:
        frozen = tuple(frozen)
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            lambda params: freeze_labels(params, frozen),
        )
    return tx, sched


def scale_groups(scales: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies the final updates of each named top-level group by its factor.

    Applied after AdamW, this equals a per-group learning rate (decoupled
    weight decay included, as torch's per-group ``lr`` does).
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        if not isinstance(updates, Mapping):
            raise ValueError("lr_scales needs a dict of parameter groups")
        unknown = set(scales) - set(updates)
        if unknown:
            raise ValueError(f"lr_scales names unknown parameter groups {sorted(unknown)}; have {sorted(updates)}")
        out = dict(updates)
        for name, factor in scales.items():
            out[name] = jax.tree.map(lambda u, f=factor: u * f, updates[name])
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer_from_config(train_cfg: Any, frozen: Sequence[str] = ()) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """From a config's ``train`` block (see configs/base.py)."""
    return make_optimizer(
        train_cfg.lr,
        train_cfg.warmup_steps,
        train_cfg.steps,
        schedule=train_cfg.schedule,
        end_lr=train_cfg.end_lr,
        weight_decay=train_cfg.weight_decay,
        max_grad_norm=train_cfg.max_grad_norm,
        b1=train_cfg.adam_b1,
        b2=train_cfg.adam_b2,
        eps=train_cfg.adam_eps,
        frozen=frozen,
        lr_scales=_lr_scales(train_cfg),
    )


def _lr_scales(train_cfg: Any) -> dict[str, float] | None:
    scale = float(train_cfg.get("question_encoder_lr_scale", 1.0))
    return None if scale == 1.0 else {"question_encoder": scale}
