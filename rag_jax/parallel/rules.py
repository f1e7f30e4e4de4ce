"""The one table that maps logical axis names to mesh axes.

Every parameter and activation that we shard is annotated with logical axis
names (see ``rag_jax.models.layers``); this table decides which mesh axis each
name lands on. Changing the parallelism strategy is a config change here, not
a model change (the MaxText / t5x convention).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or tuple of mesh axes or None)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("docs", None),
    ("length", None),
    ("act_embed", None),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("position", None),
    ("type_vocab", None),
    ("norm", None),
    ("proj", None),
)

LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalises a rules list from a config (lists become tuples)."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for entry in rules:
        name, axis = entry
        if isinstance(axis, list):
            axis = tuple(axis)
        out.append((str(name), axis))
    return tuple(out)


def logical_partition_specs(boxed_tree: Any) -> Any:
    """PartitionSpecs of logical names for a tree of ``nn.Partitioned`` leaves."""
    return nn.get_partition_spec(boxed_tree)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide (those dims are replicated).

    BART's vocabulary (50265) is odd, so ``vocab -> tensor`` cannot split it;
    replicating that one dimension keeps every other rule in force instead of
    failing or padding the checkpoint.
    """
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept = []
        size = shape[i]
        for name in names:
            n = mesh.shape[name]
            if size % n == 0:
                kept.append(name)
                size //= n
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*out)


def leaf_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
) -> PartitionSpec:
    """The mesh PartitionSpec of one array with logical axis ``names``."""
    return fit_spec(logical_to_mesh_spec(names, rules), shape, mesh)


def mesh_shardings(
    boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> Any:
    """NamedShardings for every leaf of a (possibly abstract) boxed param tree.

    Leaves that are not ``nn.Partitioned`` (none of ours are) are replicated.
    """

    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, leaf_spec(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_to_mesh_spec(
    logical: Sequence[str | None], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> PartitionSpec:
    """Mesh PartitionSpec for one tuple of logical names."""
    return nn.logical_to_mesh_axes(tuple(logical), list(rules))


def named_sharding(
    mesh: Mesh, logical: Sequence[str | None], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(logical, rules))


def shard_params(params: Any, shardings: Any) -> Any:
    """Places an unboxed param tree onto the mesh with the given shardings."""
    return jax.tree.map(jax.device_put, params, shardings)
