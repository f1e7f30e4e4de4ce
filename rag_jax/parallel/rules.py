"""The one table that maps logical axis names to mesh axes.

Every parameter is annotated with logical axis names (see
``rag_jax.models.layers``) and every input batch is split along ``batch``;
this table decides which mesh axis each name lands on. Changing the
parallelism strategy is a config change here, not a model change (the
MaxText / t5x convention).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or tuple of mesh axes or None)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Activations: only the input batch is placed (train/loop.py batch_shardings);
    # XLA propagates that and the parameter shardings through the step. The
    # networks carry no activation constraints: RAG runs BART under jax.vmap
    # over the retrieved documents, where a per-document constraint could not
    # name the document axis, so names such as length or docs would be rules
    # that nothing reads.
    ("batch", ("data", "fsdp")),
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


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide (those dims are replicated).

    BART's vocabulary (50265) is odd, so ``vocab -> tensor`` cannot split it;
    replicating that one dimension keeps every other rule in force instead of
    failing or padding the checkpoint.
    """
    out = []
    for axes, size in zip(spec, shape):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept = []
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
    return fit_spec(nn.logical_to_mesh_axes(tuple(names), list(rules)), shape, mesh)


def mesh_shardings(
    boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> Any:
    """NamedShardings for every leaf of a (possibly abstract) boxed tree.

    flax's chain (``nn.get_partition_spec`` then ``nn.logical_to_mesh``), with
    each spec fitted to its leaf's shape; leaves that are not
    ``nn.Partitioned`` get an empty spec, i.e. are replicated.
    """
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), list(rules))

    def one(spec: PartitionSpec, leaf: Any) -> NamedSharding:
        shape = (leaf.value if isinstance(leaf, nn.Partitioned) else leaf).shape
        return NamedSharding(mesh, fit_spec(spec, shape, mesh))

    # ``boxed_tree`` is read up to the leaves of ``specs``: one box per spec.
    return jax.tree.map(one, specs, boxed_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
