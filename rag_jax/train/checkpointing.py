"""Training checkpoints: the only module that imports orbax.

One checkpoint step holds two items saved together:
  * ``state``: the pytree {params, opt_state, step, rng} (any pytree, e.g.
    ``rag_jax.train.state.TrainState``), written with ``StandardSave``;
  * ``data``: the input iterator's JSON state (see ``rag_jax.data.pipeline``).
Orbax writes a step into a temporary directory and renames it only after
every item (and every host) finished, so ``latest_step`` never sees a partial
checkpoint; ``all_steps`` below additionally skips anything orbax does not
list as finalized. Saving is asynchronous: device arrays are copied to host
before ``save`` returns, files are written in the background; ``wait()``
blocks until the last save is committed.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

_STATE, _DATA = "state", "data"


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    # Typed PRNG keys have no on-disk dtype; their uint32 data does.
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract(x: Any) -> Any:
    if _is_key(x):
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    sharding = getattr(x, "sharding", None)
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, (np.ndarray, np.generic, int, float)):
        arr = np.asarray(x)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype)
    return x


def _restore_keys(target: Any, restored: Any) -> Any:
    def one(t: Any, r: Any) -> Any:
        if _is_key(t):
            return jax.random.wrap_key_data(r, impl=jax.random.key_impl(t))
        return r

    return jax.tree.map(one, target, restored)


def tree_all_finite(tree: Any) -> bool:
    """True when every float leaf is free of NaN/Inf (one host sync)."""
    leaves = [x for x in jax.tree.leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return True
    return bool(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))


class CheckpointManager:
    """Keep-N, interval-gated, optionally async checkpoints of train state + data state.

    ``save(step, state, data_state)`` saves when ``step`` is a multiple of
    ``every`` (or ``force``); returns whether a save started.
    ``restore(target=...)`` brings the latest (or given) step back; with a
    target whose leaves carry ``.sharding`` (concrete arrays or
    ``jax.ShapeDtypeStruct``s), arrays come back with those shardings.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int = 1000,
        keep: int | None = 3,
        async_save: bool = True,
    ) -> None:
        if every <= 0:
            raise ValueError(f"checkpoint interval must be positive, got {every}")
        if keep is not None and keep <= 0:
            raise ValueError(f"checkpoint keep must be positive or None, got {keep}")
        self.directory = Path(directory).absolute()
        self.every = int(every)
        self._started: set[int] = set()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Leftover tmp dirs of a killed run are deleted, never read.
            cleanup_tmp_directories=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _DATA))

    # ---------------------------------------------------------------- save
    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
        check_finite: bool = False,
    ) -> bool:
        """Starts saving ``state`` and ``data_state`` as ``step``.

        ``check_finite`` refuses (raises) a state holding NaN/Inf, so a
        diverged run cannot replace the last good checkpoint.
        """
        step = int(step)
        if check_finite and not tree_all_finite(state):
            raise FloatingPointError(f"step {step}: state has NaN/Inf; checkpoint not written")
        if not (force or self.should_save(step)):
            return False
        if step in self._started or step in self.all_steps():
            # Already saved or being saved (e.g. a final forced save right
            # after an interval save): identical content, nothing to do.
            return False
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(_keys_to_data(state)),
            _DATA: ocp.args.JsonSave(dict(data_state or {})),
        })
        # The interval is decided above; orbax's own policy would also save
        # the very first step and skip steps while an async save is running.
        saved = self._mngr.save(step, args=args, force=True)
        if saved:
            self._started.add(step)
            log.info("checkpoint step %d started (%s)", step, self.directory)
        return bool(saved)

    # ------------------------------------------------------------- restore
    def restore(self, step: int | None = None, target: Any | None = None) -> tuple[Any, dict[str, Any], int]:
        """(state, data_state, step) of ``step`` or the latest finished one.

        Without ``target`` the state comes back as saved (nested dicts of
        arrays); with it, in ``target``'s structure, dtypes and shardings.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no finished checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        if target is None:
            state_args = ocp.args.StandardRestore()
        else:
            state_args = ocp.args.StandardRestore(jax.tree.map(_abstract, target))
        out = self._mngr.restore(step, args=ocp.args.Composite(**{
            _STATE: state_args, _DATA: ocp.args.JsonRestore(),
        }))
        state = out[_STATE]
        if target is not None:
            state = _restore_keys(target, state)
        data = out[_DATA] if out[_DATA] is not None else {}
        return state, dict(data), int(step)

    # ----------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        """Finalized steps, ascending (tmp directories of unfinished saves excluded)."""
        # No ``reload()`` here: it races with a running async save's
        # bookkeeping (keep-N deletions). Orbax already hides tmp dirs; also
        # demand the metadata file orbax writes at finalization, so a step
        # directory copied or truncated by hand is not taken as complete.
        return sorted(
            int(s) for s in self._mngr.all_steps()
            if (self.directory / str(s) / "_CHECKPOINT_METADATA").exists()
        )

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is on the save interval."""
        return int(step) % self.every == 0

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PreemptionFlag:
    """SIGTERM (and optionally SIGINT) set a flag the train loop polls.

    The handler only flips a flag: saving from inside a signal handler could
    interleave with a running jitted step. The loop, on seeing ``requested``,
    saves with ``force=True``, waits and exits. In a multi-process run, call
    ``sync(step)`` so every process agrees (one process may get the signal
    late); it uses orbax's preemption check when JAX's distributed runtime is up.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signals = signals

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("signal %d received: final checkpoint requested", signum)
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def sync(self, step: int, manager: CheckpointManager | None = None) -> bool:
        flag = self.requested
        if jax.process_count() > 1 and manager is not None:
            flag = flag or bool(manager._mngr.reached_preemption(int(step)))
        return flag

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()
