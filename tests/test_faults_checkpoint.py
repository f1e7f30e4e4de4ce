"""Damaged checkpoints, a second writer, a preempted run: each is said, never silent.

Manager-level cases run on a small pytree; the end-to-end ones on the tiny
real training setup of ``tests/train_fixtures.py``.
"""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax.errors import user_message
from rag_jax.retrieval.lock import LockedError
from rag_jax.train.checkpointing import (
    CORRUPT_DIR,
    MANIFEST,
    CheckpointIntegrityError,
    CheckpointManager,
    workdir_lock,
)


def _state(v: float):
    return {"w": jnp.full((64, 16), v, jnp.float32), "b": jnp.arange(16, dtype=jnp.float32) + v,
            "rng": jax.random.PRNGKey(int(v))}


def _data_file(step_dir):
    """The largest array data file of the step (where parameter bytes live)."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _flip(step_dir, n=64):
    f = _data_file(step_dir)
    raw = bytearray(f.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
    f.write_bytes(bytes(raw))


def _truncate(step_dir):
    f = _data_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "flipped-bytes": (_flip, "checksum-mismatch", "does not match its recorded sha256"),
    "truncated-file": (_truncate, "size-mismatch", "bytes,"),
    "missing-state": (lambda d: shutil.rmtree(d / "state"), "missing-file", "is missing"),
    "empty-metadata": (lambda d: (d / "state" / "_METADATA").write_bytes(b""), "size-mismatch", "_METADATA has 0 bytes"),
    "no-checkpoint-metadata": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), "unfinished", "_CHECKPOINT_METADATA"),
    "no-manifest": (lambda d: (d / MANIFEST).unlink(), "no-manifest", MANIFEST),
}


def _two_steps(root):
    with CheckpointManager(root, every=1, keep=5, async_save=True) as mngr:
        mngr.save(1, _state(1.0), {"s": 1})
        mngr.save(2, _state(2.0), {"s": 2})
    return root


def test_async_saves_get_a_manifest_of_every_file(tmp_path):
    root = _two_steps(tmp_path / "c")
    for step in (1, 2):
        d = root / str(step)
        listed = json.loads((d / MANIFEST).read_text())["files"]
        on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST}
        assert set(listed) == on_disk and any(n.startswith("state/") for n in listed)


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_latest_step_falls_back_and_is_moved_aside(tmp_path, caplog, kind):
    damage, tag, reason = DAMAGE[kind]
    root = _two_steps(tmp_path / "c")
    damage(root / "2")
    with CheckpointManager(root, every=1, keep=5, async_save=False) as mngr:
        with caplog.at_level(logging.WARNING, "rag_jax.train.checkpointing"):
            state, data, step = mngr.resume(target=_state(0.0))
        assert (step, data) == (1, {"s": 1})
        np.testing.assert_array_equal(state["w"], _state(1.0)["w"])
        [line] = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert "step 2" in line and reason in line and f"{CORRUPT_DIR}/2-{tag}" in line and "\n" not in line
        # Kept for a person to inspect, out of orbax's sight: step 2 can be saved again.
        assert not (root / "2").exists() and (root / CORRUPT_DIR / f"2-{tag}").is_dir()
        assert mngr.save(2, _state(5.0), {"s": 5})
    with CheckpointManager(root, every=1, keep=5) as mngr:
        _, data, step = mngr.restore()
    assert (step, data) == (2, {"s": 5})


def test_reader_skips_damage_without_moving_it(tmp_path):
    root = _two_steps(tmp_path / "c")
    _flip(root / "2")
    with CheckpointManager(root, every=1, keep=5) as mngr:
        _, data, step = mngr.restore()
        assert (step, data) == (1, {"s": 1})
        assert (root / "2").is_dir()  # a reader never moves a writer's files
        with pytest.raises(CheckpointIntegrityError, match="step 2 .* is damaged: .*sha256"):
            mngr.restore(2)


def test_no_step_verifies_is_one_line_naming_the_directory(tmp_path):
    root = _two_steps(tmp_path / "c")
    _flip(root / "1")
    (root / "2" / MANIFEST).unlink()
    with CheckpointManager(root, every=1, keep=5) as mngr:
        with pytest.raises(CheckpointIntegrityError) as err:
            mngr.resume(target=_state(0.0))
    message = user_message(err.value)
    assert message is not None and "\n" not in message and str(root) in message
    assert sorted(p.name for p in (root / CORRUPT_DIR).iterdir()) == ["1-checksum-mismatch", "2-no-manifest"]


def test_checkpoints_from_before_checksums_resume_unverified_with_a_warning(tmp_path, caplog):
    root = _two_steps(tmp_path / "c")
    for step in ("1", "2"):
        (root / step / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING), CheckpointManager(root, every=1, keep=5) as mngr:
        _, data, step = mngr.resume(target=_state(0.0))
    assert (step, data) == (2, {"s": 2})
    assert "no checksums" in caplog.text and not (root / CORRUPT_DIR).exists()


def test_second_writer_refused_naming_the_holder(tmp_path):
    from rag_jax.train.loop import train_and_evaluate

    work = tmp_path / "run"
    with workdir_lock(work):
        # Refused before the config is even looked at.
        with pytest.raises(LockedError) as err:
            train_and_evaluate(None, work, verbose=False)
    message = user_message(err.value)
    assert message is not None and "\n" not in message
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert not (work / ".lock").exists()  # released on exit


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_lock_taken_over_and_released(tmp_path, caplog):
    work = tmp_path / "run"
    work.mkdir()
    (work / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, "rag_jax.train.checkpointing"):
        with workdir_lock(work):
            assert json.loads((work / ".lock").read_text())["pid"] == os.getpid()
    assert any("taking over the stale lock" in r.getMessage() for r in caplog.records)
    assert not (work / ".lock").exists()


# ------------------------------------------------------ tiny training runs
@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from tests.train_fixtures import make_world

    return make_world(tmp_path_factory.mktemp("faults"))


def _sigterm_at(at):
    import signal

    def hook(step):
        if step == at:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


@pytest.mark.slow
def test_flipped_bytes_resume_from_previous_step_like_an_uninterrupted_run(paths, tmp_path, caplog):
    from rag_jax.train.loop import train_and_evaluate
    from tests.train_fixtures import tiny_config

    cfg = tiny_config(paths, steps=6, global_batch_size=4)
    cfg.checkpoint.every = 2
    cfg.checkpoint.keep = 20
    full = train_and_evaluate(cfg, tmp_path / "full", verbose=False)["losses"]

    work = tmp_path / "run"
    part = train_and_evaluate(cfg, work, verbose=False, on_step=_sigterm_at(4))
    assert part["preempted"] and part["step"] == 4
    _flip(work / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING, "rag_jax.train.checkpointing"):
        rest = train_and_evaluate(cfg, work, verbose=False)
    assert not rest["preempted"]
    assert any("step 4" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    assert (work / "checkpoints" / CORRUPT_DIR / "4-checksum-mismatch").is_dir()
    assert sorted(rest["losses"]) == [3, 4, 5, 6]
    for s in (3, 4, 5, 6):
        np.testing.assert_allclose(rest["losses"][s], full[s], rtol=1e-5)


@pytest.mark.slow
def test_nan_stop_names_a_step_that_verifies(paths, tmp_path):
    from rag_jax.train.loop import train_and_evaluate
    from tests.train_fixtures import tiny_config

    work = tmp_path / "nan"

    def cfg(lr, steps):
        c = tiny_config(paths, steps=steps, global_batch_size=4, lr=lr, warmup_steps=0, max_grad_norm=0.0,
                        end_lr=0.0, schedule="constant")
        c.checkpoint.every = 1
        c.checkpoint.keep = 20
        return c

    train_and_evaluate(cfg(1e-3, 3), work, verbose=False)

    def damage_each_new_step(step):
        _flip(work / "checkpoints" / str(step), n=16)

    # Resumed with an absurd learning rate (same optimizer state layout): the
    # first update blows the parameters up, the next loss is non-finite. Each
    # step saved meanwhile is damaged, so the newest step on disk never verifies.
    with pytest.raises(FloatingPointError, match=r"The last good checkpoint \(step 3\)"):
        train_and_evaluate(cfg(1e12, 12), work, verbose=False, on_step=damage_each_new_step)
    assert (work / "checkpoints" / "4").is_dir()  # a newer, damaged step was there to be passed over
    with CheckpointManager(work / "checkpoints", every=1) as mngr:
        assert mngr.latest_verified_step() == 3
