"""Multi-process start-up (``rag_jax.train.distributed``) and ``launch/local_cluster.py``.

Real processes: two local jax processes with 4 fake CPU devices each join
through ``initialize`` (gloo) and form one 8-device system. Helper scripts are
written to ``tmp_path``; nothing here joins the pytest process itself to a
cluster (its jax backend is already up), only bad arguments are checked in-process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rag_jax.train import distributed as D

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = str(ROOT / "launch" / "local_cluster.py")
TIMEOUT_S = 120  # a hung subprocess fails the test instead of the whole run

# Joins through distributed.initialize, checks the config and reports what it sees
# on one "RESULT {json}" line (gloo prints its own lines beside it).
JOIN_SCRIPT = """
import argparse, json, sys
from rag_jax.train.distributed import check_same_config, initialize

p = argparse.ArgumentParser()
p.add_argument("--coordinator_address")
p.add_argument("--num_processes", type=int)
p.add_argument("--process_id", type=int)
p.add_argument("--lr", type=float, default=0.1)
p.add_argument("--timeout_s", type=int, default=60)
a = p.parse_args()
try:
    initialize(a.coordinator_address, a.num_processes, a.process_id, timeout_s=a.timeout_s)
    import jax, ml_collections, numpy as np
    from jax.experimental import multihost_utils
    check_same_config(ml_collections.ConfigDict({"train": {"lr": a.lr, "steps": 3}, "mesh": {"shape": (8, 1, 1)}}))
    gathered = multihost_utils.process_allgather(np.array([jax.process_index() + 1]))
except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print("RESULT " + json.dumps({"process_count": jax.process_count(), "device_count": jax.device_count(),
                              "local_device_count": jax.local_device_count(), "process_index": jax.process_index(),
                              "gathered": np.asarray(gathered).ravel().tolist()}), flush=True)
"""

# A stand-in for launch/train.py: takes the three flags; --mode picks a behaviour.
CHILD_SCRIPT = """
import argparse, os, pathlib, signal, sys, time

p = argparse.ArgumentParser()
p.add_argument("--mode", default="ok")
p.add_argument("--coordinator_address")
p.add_argument("--num_processes", type=int)
p.add_argument("--process_id", type=int)
a = p.parse_args()
print(f"process {a.process_id} of {a.num_processes} at {a.coordinator_address}; XLA_FLAGS={os.environ['XLA_FLAGS']}")
if a.mode == "fail":
    if a.process_id == 1:
        sys.exit(3)
    time.sleep(60)
if a.mode == "term":
    def on_term(signum, frame):
        print("got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    pathlib.Path(f"ready_{a.process_id}").touch()
    time.sleep(60)
"""


def _script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _env(devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for name in (D.ENV_COORDINATOR, D.ENV_NUM_PROCESSES, D.ENV_PROCESS_ID):
        env.pop(name, None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _results(stdout: str, prefix: str = "") -> list[dict]:
    return [json.loads(line.split("RESULT ", 1)[1]) for line in stdout.splitlines()
            if line.startswith(prefix) and "RESULT " in line]


@pytest.fixture
def no_distributed_env(monkeypatch):
    for name in (D.ENV_COORDINATOR, D.ENV_NUM_PROCESSES, D.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)


# -- two real processes -------------------------------------------------------

def test_two_processes_form_one_eight_device_system(tmp_path):
    """Through the launcher: 2 processes x 4 fake devices, gloo collectives across them."""
    script = _script(tmp_path, "join.py", JOIN_SCRIPT)
    # The launcher replaces pytest's 8-device XLA_FLAGS with 4 per process.
    out = subprocess.run([sys.executable, LOCAL_CLUSTER, "-n", "2", "--", script], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stdout + out.stderr
    for i in range(2):
        (result,) = _results(out.stdout, prefix=f"[p{i}] ")
        assert result == {"process_count": 2, "device_count": 8, "local_device_count": 4, "process_index": i,
                          "gathered": [1, 2]}


def test_different_configs_fail_in_every_process_with_one_line(tmp_path):
    script = _script(tmp_path, "join.py", JOIN_SCRIPT)
    address = f"localhost:{D.free_port()}"
    procs = [subprocess.Popen([sys.executable, script, f"--coordinator_address={address}", "--num_processes=2",
                               f"--process_id={i}", f"--lr={lr}"], env=_env(devices=4), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, lr in enumerate((0.1, 0.2))]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 2, err
        (line,) = [l for l in err.splitlines() if l.startswith("error:")]
        assert "process 1 runs a different config than process 0 (hash " in line
        assert "train.lr: 0.2 vs 0.1" in line


def test_missing_process_is_a_one_line_error_within_the_timeout(tmp_path):
    """Process 0 of 2 alone: jax would abort from C++ after its own deadline;
    initialize's deadline prints one line and exits 2 first."""
    script = _script(tmp_path, "join.py", JOIN_SCRIPT)
    address = f"localhost:{D.free_port()}"
    start = time.monotonic()
    out = subprocess.run([sys.executable, script, f"--coordinator_address={address}",
                          "--num_processes=2", "--process_id=0", "--timeout_s=3"], env=_env(devices=4),
                         cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - start < 30
    assert out.stderr.strip().splitlines() == [
        f"error: process 0 of 2: not every process joined the JAX coordinator {address} within 3 s; "
        "were all processes started, with the same coordinator address and process count?"
    ]


# -- bad arguments (in-process: each fails before jax is touched) -------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2),
     "process_id=2 is outside [0, 2) for num_processes=2"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=-1), "process_id=-1 is outside [0, 2)"),
    (dict(num_processes=2, process_id=0), "num_processes=2 needs a coordinator address"),
    (dict(coordinator_address="localhost:1234", process_id=1), "process_id=1 needs num_processes"),
    (dict(coordinator_address="localhost:1234", num_processes=2), "num_processes=2 needs this process's id"),
    (dict(coordinator_address="localhost:1234"), "given without --num_processes and --process_id"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "is not HOST:PORT"),
    (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0), "must be at least 1"),
])
def test_bad_arguments_are_one_line_value_errors(no_distributed_env, kwargs, message):
    with pytest.raises(ValueError) as e:
        D.initialize(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_environment_variables_stand_in_for_flags(monkeypatch):
    monkeypatch.setenv(D.ENV_COORDINATOR, "localhost:1234")
    monkeypatch.setenv(D.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(D.ENV_PROCESS_ID, "5")
    with pytest.raises(ValueError, match=r"process_id=5 is outside \[0, 2\)"):
        D.initialize()
    monkeypatch.setenv(D.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        D.initialize()


def test_unreachable_coordinator_errors_within_the_timeout(no_distributed_env):
    address = f"localhost:{D.free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"coordinator {address} did not answer process 1 of 2"):
        D.initialize(address, 2, 1, timeout_s=2)
    assert 2 <= time.monotonic() - start < 10


def test_single_process_needs_nothing(no_distributed_env):
    import jax

    D.initialize()  # no flags, no environment, multihost False: a plain single-process run
    D.check_same_config({"train": {"lr": 0.1}})  # one process: nothing to compare
    assert not jax.distributed.is_initialized()


def test_cli_rejects_a_bad_process_id_in_one_line(no_distributed_env, tmp_path, capsys):
    from rag_jax.cli import main as cli

    rc = cli(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path),
              "--coordinator-address=localhost:1234", "--num-processes=2", "--process_id=7",
              "--config.train.steps=1"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["rag-jax train: error: process_id=7 is outside [0, 2) for num_processes=2"]


def test_multihost_outside_a_cluster_is_one_line(tmp_path):
    """config.multihost=True with nothing to detect: jax's complaint, named, in one line (a subprocess:
    jax.distributed.initialize refuses to run once this process's backend is up)."""
    out = subprocess.run([sys.executable, "-m", "rag_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny.py"),
                          "--workdir", str(tmp_path), "--config.multihost=True"],
                         env=_env(devices=1), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "rag-jax train: error: config.multihost=True but jax detected no TPU pod slice, SLURM or Open MPI job "
        "(coordinator_address should be defined.); pass --coordinator_address, --num_processes and --process_id"
    ]


# -- launch/local_cluster.py ---------------------------------------------------

def test_local_cluster_starts_prefixed_processes(tmp_path):
    script = _script(tmp_path, "child.py", CHILD_SCRIPT)
    out = subprocess.run([sys.executable, LOCAL_CLUSTER, "-n", "2", "--port", "23456", "--", script],
                         env=_env(devices=8), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == [
        f"[p{i}] process {i} of 2 at localhost:23456; XLA_FLAGS=--xla_force_host_platform_device_count=4"
        for i in range(2)
    ]


def test_local_cluster_stops_the_others_when_one_fails(tmp_path):
    script = _script(tmp_path, "child.py", CHILD_SCRIPT)
    start = time.monotonic()
    out = subprocess.run([sys.executable, LOCAL_CLUSTER, "-n", "3", "--", script, "--mode=fail"],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    # Process 1's status; processes 0 and 2 (sleeping 60 s) were terminated.
    assert out.returncode == 3, out.stdout + out.stderr
    assert time.monotonic() - start < 30


def test_local_cluster_forwards_sigterm(tmp_path):
    script = _script(tmp_path, "child.py", CHILD_SCRIPT)
    proc = subprocess.Popen([sys.executable, LOCAL_CLUSTER, "-n", "2", "--", script, "--mode=term"], env=_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not all((tmp_path / f"ready_{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err
    assert "[p0] got SIGTERM" in out.splitlines() and "[p1] got SIGTERM" in out.splitlines()


def test_local_cluster_runs_launch_train_without_a_script(tmp_path):
    """``-- --config=...`` goes to launch/train.py (here: a config file that does not exist)."""
    out = subprocess.run([sys.executable, LOCAL_CLUSTER, "-n", "1", "--", "--config=missing.py", "--workdir=w"],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode != 0
    assert any(line.startswith("[p0] ") and "missing.py" in line for line in out.stdout.splitlines()), out.stdout


def test_local_cluster_needs_the_separator(tmp_path):
    out = subprocess.run([sys.executable, LOCAL_CLUSTER, "-n", "2", "child.py"], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 2 and "missing '--'" in out.stderr
