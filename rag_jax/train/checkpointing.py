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

Integrity: orbax checks no data bytes (a flipped byte in an array file loads
as a wrong value), so once a step is committed (at the next ``save``,
``wait`` or ``close``) process 0 writes ``MANIFEST`` into it: the size and
sha256 of every file. ``restore``/``resume`` take the newest step whose files
all match it and say which newer steps were skipped and why; ``resume``, for
the run that owns the directory, also moves those into ``corrupt/`` (never
deleted) so orbax no longer lists them and their step numbers can be saved
again. Process 0 decides and broadcasts, so every process restores the same
step.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Concatenate, Iterator, Mapping, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rag_jax.parallel.host_arrays import any_process
from rag_jax.retrieval.lock import LockedError, WriterLock

log = logging.getLogger(__name__)

_STATE, _DATA = "state", "data"
# Written by orbax when it finalizes a step: without it the save never finished.
_ORBAX_METADATA = "_CHECKPOINT_METADATA"
# Our per-step file list with sizes and sha256 digests, written after the commit.
MANIFEST = "_RAG_JAX_MANIFEST.json"
_MANIFEST_TMP = MANIFEST + ".tmp"
# Damaged steps go to <checkpoints>/corrupt/<step>-<reason>; orbax ignores it
# (not a step number) and nothing here deletes it.
CORRUPT_DIR = "corrupt"
# Hashing threads: hashlib releases the GIL on large buffers, and a sharded
# checkpoint has many array files.
_HASH_THREADS = 8
# _pick's answers besides a step number (broadcast as int32 between processes).
_NO_STEPS, _NONE_VERIFIED = -2, -1

# Exit status of a run stopped by SIGTERM after saving its state (see
# ``train_and_evaluate``'s ``results["preempted"]``): EX_TEMPFAIL from
# sysexits.h, "temporary failure, retry later". Distinct from 0 (finished),
# 1 (crash), 2 (bad input) and 128+N (killed by signal N, nothing saved), so
# a scheduler wrapper can requeue on it, e.g. SLURM's
# ``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``.
PREEMPTED_EXIT_CODE = 75


class CheckpointIntegrityError(ValueError):
    """Checkpoints exist but none can be trusted; the message names the directory.
    A ValueError so the CLI's error boundary prints it as one line."""


def _hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_files(root: Path, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return list(pool.map(lambda name: _hash_file(root / name), names))


def write_manifest(step_dir: Path) -> None:
    """Records size and sha256 of every file under ``step_dir`` in ``MANIFEST``.

    Written to a temporary name and renamed, so a manifest is either whole or
    absent (a step without one is treated as unfinished).
    """
    names = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                   if p.is_file() and p.name not in (MANIFEST, _MANIFEST_TMP))
    digests = _hash_files(step_dir, names)
    files = {n: {"size": (step_dir / n).stat().st_size, "sha256": d} for n, d in zip(names, digests)}
    tmp = step_dir / _MANIFEST_TMP
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)


def step_damage(step_dir: Path) -> tuple[str, str] | None:
    """None when every file of ``step_dir`` matches its manifest, else
    (short tag for a directory name, one-line reason)."""
    if not (step_dir / _ORBAX_METADATA).is_file():
        return "unfinished", f"no {_ORBAX_METADATA} (its save never finished)"
    try:
        files = json.loads((step_dir / MANIFEST).read_text(encoding="utf-8"))["files"]
        wanted = {str(n): (int(e["size"]), str(e["sha256"])) for n, e in files.items()}
    except FileNotFoundError:
        return "no-manifest", f"no {MANIFEST} (the run stopped before recording its checksums)"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "bad-manifest", f"{MANIFEST} is unreadable"
    names = sorted(wanted)
    # Sizes first: cheap, and they name a truncated or emptied file precisely.
    for name in names:
        path = step_dir / name
        if not path.is_file():
            return "missing-file", f"{name} is missing"
        size = path.stat().st_size
        if size != wanted[name][0]:
            return "size-mismatch", f"{name} has {size} bytes, {wanted[name][0]} were written"
    for name, digest in zip(names, _hash_files(step_dir, names)):
        if digest != wanted[name][1]:
            return "checksum-mismatch", f"{name} does not match its recorded sha256"
    return None


def _process() -> tuple[int, int]:
    """(index, count) of this process; (0, 1) before ``jax.distributed`` is
    up, without touching jax's backends (which would make a later
    ``jax.distributed.initialize`` fail)."""
    if not jax.distributed.is_initialized():
        return 0, 1
    return jax.process_index(), jax.process_count()


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds ``workdir/.lock`` (pid and host of the holder) for one training run.

    Process 0 takes it and tells the others whether it could; all of them
    raise the same ``LockedError`` otherwise. A lock left by a dead process on
    this host is taken over with a warning (see ``rag_jax.retrieval.lock``).
    """
    index, count = _process()
    lock = WriterLock(Path(workdir) / ".lock", f"training in {workdir}")
    refused: LockedError | None = None
    if index == 0:
        try:
            lock.acquire()
        except LockedError as e:
            refused = e
        if lock.took_over:
            log.warning("%s", lock.took_over)
    held = refused is None
    if count > 1:
        held = bool(multihost_utils.broadcast_one_to_all(np.int32(held)))
    if refused is not None:
        raise refused
    if not held:
        raise LockedError(f"{Path(workdir) / '.lock'}: held by another run (process 0 names it)")
    try:
        yield
    finally:
        lock.release()


_P = ParamSpec("_P")
_R = TypeVar("_R")


def holding_workdir_lock(
    fn: Callable[Concatenate[Any, str | os.PathLike, _P], _R],
) -> Callable[Concatenate[Any, str | os.PathLike, _P], _R]:
    """Decorates ``fn(config, workdir, ...)`` to run inside ``workdir_lock(workdir)``:
    one writer per workdir, released however ``fn`` ends."""

    @functools.wraps(fn)
    def run(config: Any, workdir: str | os.PathLike, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with workdir_lock(workdir):
            return fn(config, workdir, *args, **kwargs)

    return run


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
    ``restore(target=...)`` brings the newest verified (or given) step back;
    with a target whose leaves carry ``.sharding`` (concrete arrays or
    ``jax.ShapeDtypeStruct``s), arrays come back with those shardings.
    ``resume`` is ``restore`` for the directory's writer (see the module doc).
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
        self._async = async_save
        self._started: set[int] = set()
        # Steps whose save started but whose manifest is not written yet.
        self._unsealed: list[int] = []
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
        # Orbax would wait for the previous save here anyway; waiting first
        # lets its manifest be written before the next save starts.
        self._seal()
        # The interval is decided above; orbax's own policy would also save
        # the very first step and skip steps while an async save is running.
        saved = self._mngr.save(step, args=args, force=True)
        if saved:
            self._started.add(step)
            self._unsealed.append(step)
            log.info("checkpoint step %d started (%s)", step, self.directory)
            if not self._async:
                self._seal()
        return bool(saved)

    def _seal(self) -> None:
        """Waits for pending saves; then process 0 writes each committed step's manifest.

        Orbax's finalization includes a barrier across processes, so once it
        returns on process 0 every process's files of the step are in place.
        """
        self._mngr.wait_until_finished()
        if _process()[0] == 0:
            for step in self._unsealed:
                step_dir = self.directory / str(step)
                # keep-N may already have deleted it; a failed save never finalized it.
                if (step_dir / _ORBAX_METADATA).is_file():
                    write_manifest(step_dir)
        self._unsealed.clear()

    # ------------------------------------------------------------- restore
    def restore(self, step: int | None = None, target: Any | None = None) -> tuple[Any, dict[str, Any], int]:
        """(state, data_state, step) of ``step`` or of the newest step that verifies.

        Without ``target`` the state comes back as saved (nested dicts of
        arrays); with it, in ``target``'s structure, dtypes and shardings.
        Newer damaged steps are skipped with a warning and left where they
        are (a reader must not move the files of a run that may be writing).
        A given ``step`` that does not verify raises ``CheckpointIntegrityError``.
        """
        if step is None:
            step = self._pick(quarantine=False)
            if step == _NO_STEPS:
                raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
            if step == _NONE_VERIFIED:
                raise CheckpointIntegrityError(f"no checkpoint in {self.directory} passed verification")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no finished checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        elif (damage := step_damage(self.directory / str(step))) is not None:
            raise CheckpointIntegrityError(f"checkpoint step {step} in {self.directory} is damaged: {damage[1]}")
        return self._load(step, target)

    def resume(self, target: Any) -> tuple[Any, dict[str, Any], int] | None:
        """``restore(target=target)`` for the run that owns the directory, or
        None when there is no step to resume from.

        Damaged steps newer than the one restored are moved to ``corrupt/``
        (one warning line each), so orbax stops listing them and this run can
        save those step numbers again. Steps exist but none verifies: a
        ``CheckpointIntegrityError`` naming the directory.
        """
        step = self._pick(quarantine=True)
        if step == _NO_STEPS:
            return None
        if step == _NONE_VERIFIED:
            raise CheckpointIntegrityError(
                f"no checkpoint in {self.directory} passed verification (moved to {self.directory / CORRUPT_DIR}); "
                "start a new workdir or put back a good step"
            )
        return self._load(step, target)

    def latest_verified_step(self) -> int | None:
        """The newest step whose files match their manifest (None: there is none)."""
        step = self._pick(quarantine=False)
        return step if step >= 0 else None

    def _pick(self, quarantine: bool) -> int:
        """The newest verified step, ``_NONE_VERIFIED``, or ``_NO_STEPS``; the same on every process.

        Process 0 reads and hashes; a verified step's bytes are what was
        written, so a later load failure is a mismatch with the target (a
        changed config), not damage, and is raised as such.
        """
        index, count = _process()
        choice = _NO_STEPS
        if index == 0:
            choice = self._verify_newest(quarantine)
        if count > 1:
            choice = int(multihost_utils.broadcast_one_to_all(np.int32(choice)))
        if quarantine:
            # Every process's orbax manager must forget the steps moved away.
            self._mngr.reload()
        return choice

    def _verify_newest(self, quarantine: bool) -> int:
        # Every step directory on disk, also those orbax never finalized (it
        # still lists them and would refuse to save their step again).
        steps = sorted((int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()),
                       reverse=True)
        if not steps:
            return _NO_STEPS
        if not any((self.directory / str(step) / MANIFEST).is_file() for step in steps):
            # A directory written before checksums existed: nothing to verify
            # against, so its newest finished step is taken as it is, said once.
            legacy = [s for s in steps if (self.directory / str(s) / _ORBAX_METADATA).is_file()]
            if legacy:
                log.warning("checkpoints in %s carry no checksums (written by an older rag_jax): "
                            "step %d is used unverified", self.directory, legacy[0])
                return legacy[0]
        for step in steps:
            damage = step_damage(self.directory / str(step))
            if damage is None:
                return step
            tag, reason = damage
            moved = f"; moved to {self._quarantine(step, tag)}" if quarantine else ""
            log.warning("checkpoint step %d in %s skipped: %s%s", step, self.directory, reason, moved)
        return _NONE_VERIFIED

    def _quarantine(self, step: int, tag: str) -> Path:
        corrupt = self.directory / CORRUPT_DIR
        corrupt.mkdir(exist_ok=True)
        dest = corrupt / f"{step}-{tag}"
        n = 1
        while dest.exists():  # the same step damaged again in a later run
            n += 1
            dest = corrupt / f"{step}-{tag}-{n}"
        os.rename(self.directory / str(step), dest)
        return dest

    def _load(self, step: int, target: Any | None) -> tuple[Any, dict[str, Any], int]:
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
        """Blocks until pending async saves are committed and their manifests written."""
        self._seal()

    def close(self) -> None:
        self._seal()
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
        """Whether to stop after ``step``, the same answer on every process: a
        notice that reached any process (or the cluster's own preemption
        notice, where JAX's distributed runtime delivers one) stops them all."""
        flag = self.requested
        if jax.process_count() > 1:
            if manager is not None:
                flag = flag or bool(manager._mngr.reached_preemption(int(step)))
            flag = any_process(flag)
        return flag

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()
