"""Moving data between one process's host memory and global (mesh-wide) arrays.

In a multi-process run every process holds only the rows of the global batch
that its own devices hold, and only the shards of each parameter that its
devices hold. The training loop crosses that boundary only through these
helpers, so the same code runs with one process (where local and global
coincide) and with many.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def process_positions(sharding: NamedSharding, global_batch: int) -> np.ndarray:
    """Positions along the leading axis of a ``[global_batch, ...]`` array
    with ``sharding`` that this process's devices hold, ascending.

    They form one contiguous block (devices of a process are adjacent in our
    meshes), which ``jax.make_array_from_process_local_data`` expects; a
    replicated batch gives every position to every process.
    """
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        held.update(range(*index[0].indices(global_batch)))
    positions = np.asarray(sorted(held), np.int64)
    if positions.size and positions[-1] - positions[0] + 1 != positions.size:
        raise ValueError(
            f"process {jax.process_index()} holds rows {positions.tolist()} of the global batch, not one block: "
            "order the mesh so each process's devices are adjacent along the batch axes"
        )
    return positions


def to_global(local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
              global_batch: int) -> dict[str, jax.Array]:
    """This process's rows (leading axis) of each array -> global arrays of ``global_batch`` rows."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v, (global_batch,) + tuple(v.shape[1:]))
        for k, v in local.items()
    }


def local_rows(x: jax.Array) -> np.ndarray:
    """The block of a batch-sharded global array that this process holds (its own rows), on the host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {s.index[0].indices(x.shape[0])[:2]: s for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[key].data) for key in sorted(shards)])


def fetch(tree: Any) -> Any:
    """Every leaf as a whole numpy array on every process (an all-gather where
    other processes hold parts of it; a plain device-to-host copy otherwise)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def scalar(x: Any) -> float:
    """A replicated scalar (a loss, the step) as a Python number, read from this process's own copy."""
    if getattr(x, "is_fully_addressable", True):
        return float(np.asarray(x))
    return float(np.asarray(x.addressable_shards[0].data))


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a stop that all must agree on)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.bool_))))


def process_max(values: np.ndarray) -> np.ndarray:
    """The elementwise maximum of ``values`` over every process (each passes
    the same shape); the values themselves with one process."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    return np.max(multihost_utils.process_allgather(values), axis=0)
