"""Multi-process start-up: ``jax.distributed`` initialisation, a same-config
check across processes, and an N-process local cluster for CPU runs.

The launchers (``launch/*.py``, ``rag-jax train|eval|export``) call
``initialize`` before any other jax use; ``train_and_evaluate`` then calls
``check_same_config``. ``run_local_cluster`` backs ``launch/local_cluster.py``.

Measured with jax 0.10.2 on CPU: when the coordinator never answers, or
not every process arrives, ``jax.distributed.initialize`` does not raise but
aborts the process from C++ (``DEADLINE_EXCEEDED`` and a stack trace) a few
seconds after its ``initialization_timeout``. ``initialize`` therefore probes
the coordinator itself and guards the join with its own deadline.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import jax
import numpy as np

# Environment variables read when a flag is not given. jax itself reads
# JAX_COORDINATOR_ADDRESS; the other two follow its spelling.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

# jax's own join deadline is set this much past ours, so that our one-line
# error (not jax's C++ abort) is what a user sees when the join times out.
_JAX_TIMEOUT_MARGIN_S = 30
# Exit status of a process whose join timed out, as for other bad input.
_JOIN_TIMEOUT_EXIT = 2


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def _split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address {address!r} is not HOST:PORT (e.g. 10.0.0.1:1234)")
    return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, deadline: float, process_id: int, num_processes: int) -> None:
    """Retries a TCP connect to the coordinator until it accepts or ``deadline``
    passes: process 0 may start after the others, but never answering is an error."""
    host, port = _split_address(address)
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
        if time.monotonic() >= deadline:
            raise ValueError(
                f"coordinator {address} did not answer process {process_id} of {num_processes} ({reason}); "
                "start process 0 with the same --coordinator_address, and check the host and port"
            )
        time.sleep(0.2)


def _join_timed_out(message: str) -> None:
    # Runs on a timer thread while the main thread is blocked inside jax's C++
    # join, where no Python exception can reach it: say why, then leave.
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(_JOIN_TIMEOUT_EXIT)


def _join(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
          timeout_s: int, deadline: float) -> None:
    """``jax.distributed.initialize`` under our deadline (see the module docstring)."""
    who = "this process" if process_id is None else f"process {process_id} of {num_processes}"
    where = coordinator_address or "(auto-detected)"
    message = (f"{who}: not every process joined the JAX coordinator {where} within {timeout_s} s; "
               "were all processes started, with the same coordinator address and process count?")
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _join_timed_out, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S)
    finally:
        watchdog.cancel()


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, multihost: bool = False, timeout_s: int = 60) -> None:
    """Joins this process to a multi-process jax run; call before any other jax use.

    Arguments left ``None`` come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. With none of the three and
    ``multihost`` (``config.multihost``) True, plain ``jax.distributed.initialize()``
    detects a TPU pod slice, SLURM or Open MPI. With none and ``multihost`` False
    this is a single-process run and nothing happens.

    Bad arguments raise a one-line ``ValueError``, as does a coordinator that
    does not accept connections within ``timeout_s``. If the coordinator answers
    but not all processes join within ``timeout_s``, the process prints one line
    to stderr and exits with status 2 (jax would otherwise abort it from C++).
    """
    deadline = time.monotonic() + timeout_s
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)

    if coordinator_address is None and num_processes is None and process_id is None:
        if multihost:
            _use_cpu_collectives()
            try:
                _join(None, None, None, timeout_s, deadline)
            except ValueError as e:  # jax: "coordinator_address should be defined." and the like
                raise ValueError(
                    f"config.multihost=True but jax detected no TPU pod slice, SLURM or Open MPI job ({e}); "
                    "pass --coordinator_address, --num_processes and --process_id"
                ) from None
        return

    if num_processes is None and process_id is not None:
        raise ValueError(f"process_id={process_id} needs num_processes (--num_processes or {ENV_NUM_PROCESSES})")
    if num_processes is not None and coordinator_address is None:
        raise ValueError(f"num_processes={num_processes} needs a coordinator address "
                         f"(--coordinator_address=HOST:PORT or {ENV_COORDINATOR}) that every process can reach")
    if num_processes is not None and process_id is None:
        raise ValueError(f"num_processes={num_processes} needs this process's id "
                         f"(--process_id in [0, {num_processes}) or {ENV_PROCESS_ID})")
    assert coordinator_address is not None
    _split_address(coordinator_address)
    if num_processes is None:
        if not multihost:
            raise ValueError(f"coordinator {coordinator_address} given without --num_processes and --process_id "
                             "(or set config.multihost=True to detect them on a TPU pod slice or SLURM)")
        _use_cpu_collectives()
        _join(coordinator_address, None, None, timeout_s, deadline)
        return
    assert process_id is not None
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is outside [0, {num_processes}) for num_processes={num_processes}")

    if num_processes > 1:
        _use_cpu_collectives()
    if process_id != 0:
        _wait_for_coordinator(coordinator_address, deadline, process_id, num_processes)
    _join(coordinator_address, num_processes, process_id, timeout_s, deadline)


def _use_cpu_collectives() -> None:
    """CPU computations across processes need a collectives implementation:
    gloo (jax 0.10's default, set explicitly so that another default cannot
    silently break CPU runs), unless JAX_CPU_COLLECTIVES_IMPLEMENTATION chose one.
    On TPU/GPU hosts this only concerns the CPU backend, so it is harmless there."""
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


# -- same config everywhere ---------------------------------------------------

def config_json(config: Any) -> str:
    """Canonical JSON of a ConfigDict (or plain dict): sorted keys, no spaces."""
    data = config.to_dict() if hasattr(config, "to_dict") else config
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=repr)


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(node, sort_keys=True)}


def _first_difference(a: str, b: str) -> str:
    """The first dotted field whose value differs between two config JSONs."""
    fa, fb = _flatten(json.loads(a)), _flatten(json.loads(b))
    for key in sorted(fa.keys() | fb.keys()):
        if fa.get(key) != fb.get(key):
            return f"{key}: {fa.get(key, '(absent)')} vs {fb.get(key, '(absent)')}"
    return "no field differs"


def check_same_config(config: Any) -> None:
    """Raises a one-line ValueError in every process when the processes were
    started with different configs. Call it in all processes (it runs
    collectives); a no-op in a single-process run."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    text = config_json(config)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    other = next((p for p in range(1, len(digests)) if not np.array_equal(digests[p], digests[0])), None)
    if other is None:
        return
    # Every process sees the same digests and takes this branch, so the
    # collectives below match up; they fetch the two configs to name a field.
    raw = np.frombuffer(text.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int32)))[:, 0]
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    texts = np.asarray(multihost_utils.process_allgather(padded))
    first, differing = (bytes(texts[p, :lengths[p]]).decode() for p in (0, other))
    raise ValueError(
        f"process {other} runs a different config than process 0 "
        f"(hash {bytes(digests[other]).hex()[:12]} vs {bytes(digests[0]).hex()[:12]}; "
        f"{_first_difference(differing, first)}): start every process with the same config and overrides"
    )


# -- local N-process cluster --------------------------------------------------

def free_port() -> int:
    """A TCP port free on localhost right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _child_env(devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    # Replace any inherited device count: each process gets exactly its share.
    kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env.setdefault("JAX_PLATFORMS", "cpu")  # fake host devices; N processes must not share one accelerator
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixed output as they are printed
    return env


def _copy_prefixed(stream: Any, prefix: bytes, lock: threading.Lock) -> None:
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        with lock:
            out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            out.flush()
    stream.close()


def _exit_status(returncode: int) -> int:
    """A child killed by signal N reports -N; a shell reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def run_local_cluster(command: Sequence[str], num_processes: int, devices_per_process: int | None = None,
                      port: int | None = None, kill_after_s: float = 10.0) -> int:
    """Runs ``command`` (argv of a program taking --coordinator_address,
    --num_processes and --process_id) as ``num_processes`` local processes.

    Each gets ``devices_per_process`` fake CPU devices (default ``8 // n``, at
    least 1) and the three flags appended, coordinator ``localhost:port`` (a
    free port by default). Output lines come out prefixed ``[pI] ``. SIGTERM and
    SIGINT are forwarded to every process. When one process fails, the others
    get SIGTERM, then SIGKILL after ``kill_after_s`` (they may be blocked in a
    collective with the failed one). Returns the first failing process's exit
    status (128 + N for a signal N), else 0.
    """
    if num_processes < 1:
        raise ValueError(f"-n {num_processes}: need at least one process")
    devices = max(1, 8 // num_processes) if devices_per_process is None else devices_per_process
    if devices < 1:
        raise ValueError(f"--devices-per-process {devices}: need at least one device")
    address = f"localhost:{port or free_port()}"
    env = _child_env(devices)
    lock = threading.Lock()
    children: list[subprocess.Popen] = []
    copiers: list[threading.Thread] = []

    def forward(signum: int, frame: Any) -> None:
        del frame
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(num_processes):
            argv = [*command, f"--coordinator_address={address}", f"--num_processes={num_processes}",
                    f"--process_id={i}"]
            # Own session: a terminal's Ctrl-C reaches the children once, through forward().
            child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            children.append(child)
            copier = threading.Thread(target=_copy_prefixed, args=(child.stdout, f"[p{i}] ".encode(), lock),
                                      daemon=True)
            copier.start()
            copiers.append(copier)
        status = _supervise(children, kill_after_s)
    finally:
        for child in children:  # only reached live on an exception in the parent itself
            if child.poll() is None:
                child.kill()
                child.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    for copier in copiers:
        copier.join()
    return status


def _supervise(children: list[subprocess.Popen], kill_after_s: float) -> int:
    """Waits for all children; on the first failure terminates the rest."""
    failed: int | None = None
    kill_at: float | None = None
    while True:
        codes = [c.poll() for c in children]
        if failed is None:
            failed = next((_exit_status(c) for c in codes if c not in (None, 0)), None)
            if failed is not None:
                for child, code in zip(children, codes):
                    if code is None:
                        child.terminate()
                kill_at = time.monotonic() + kill_after_s
        if all(c is not None for c in codes):
            return failed or 0
        if kill_at is not None and time.monotonic() >= kill_at:
            for child in children:
                if child.poll() is None:
                    child.kill()
            kill_at = None
        time.sleep(0.1)
