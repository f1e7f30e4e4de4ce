"""build-index as several jax processes (launch/local_cluster.py: 2 local processes x 2 CPU devices,
gloo): each encodes its share of the embedding shards into the same OUT.work, process 0 builds the
corpus store and the index. The result must be the 1-process build's, byte for byte (same devices
per process), and a killed 2-process build must finish when re-run as 1 process.

Every build is a real subprocess (``python -m rag_jax.cli build-index``), so that each gets its own
jax runtime with 2 devices, as each process of the cluster does.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rag_jax.retrieval.encode import EncodingJob
from rag_jax.retrieval.faults import ENV as FAULT_ENV
from rag_jax.retrieval.index import INDEX_MANIFEST, load_index
from tests.tiny_context_encoder import WORDS, save_tiny_context_encoder

REPO = Path(__file__).resolve().parent.parent
# 75 passages, batches of 8 (2 devices: 4 rows each), shards of 16 rows: 5 shards, the last of 11 rows
# (its last batch padded). With 2 processes, process 0 encodes shards 0, 2, 4 and process 1 shards 1, 3.
N_PASSAGES = 75
ENCODE = ["--batch-size", "8", "--shard-rows", "16", "--max-length", "24", "--index-type", "exact"]
DEVICES = 2
# Fields that record when or how long, not what: excluded when comparing manifests.
TIMING = ("build_seconds", "checked_ns")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ctx = save_tiny_context_encoder(root / "ctx")
    tsv = root / "psgs.tsv"
    rng = np.random.default_rng(0)
    with open(tsv, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for i in range(N_PASSAGES):  # lengths 3..29 words: batches fall in different length buckets
            f.write(f'{i + 1}\t"{" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30))))}"\tTitle {i}\n')
    args = ["--passages", tsv, "--encoder", ctx, *ENCODE]
    reference = root / "one"
    done = _one_process([*args, "--out", reference])
    assert done.returncode == 0, done.stderr
    return args, reference


def _env(fault: str | None) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return env


def _one_process(args, fault=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rag_jax.cli", "build-index", *map(str, args), "--no-progress"],
                          env=_env(fault), capture_output=True, text=True, timeout=300)


def _two_processes(args, fault=None) -> subprocess.CompletedProcess:
    """The same command as 2 jax processes of 2 devices each (local_cluster sets each one's XLA_FLAGS)."""
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "local_cluster.py"), "-n", "2", "--devices-per-process", str(DEVICES),
         "--", "-m", "rag_jax.cli", "build-index", *map(str, args), "--no-progress"],
        env=_env(fault), capture_output=True, text=True, timeout=300,
    )


def _without_timing(x):
    if isinstance(x, dict):
        return {k: _without_timing(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_without_timing(v) for v in x]
    return x


def _assert_same_build(a: Path, b: Path) -> None:
    """Same ids, same embedding bytes shard by shard, same encoding job and manifests apart from timing."""
    ia, ib = load_index(a), load_index(b)
    assert ia.corpus.checksum == ib.corpus.checksum
    assert [ia.corpus.id(r) for r in range(ia.count)] == [ib.corpus.id(r) for r in range(ib.count)]
    shards = ia.embeddings.manifest["shards"]
    assert shards == ib.embeddings.manifest["shards"] and len(shards) == 5
    for name in shards:
        assert (a / "embeddings" / name).read_bytes() == (b / "embeddings" / name).read_bytes(), name
    assert EncodingJob.read(a / "embeddings") == EncodingJob.read(b / "embeddings")
    for manifest in (INDEX_MANIFEST, "embeddings/embeddings.json"):
        ma, mb = (json.loads((d / manifest).read_text()) for d in (a, b))
        assert _without_timing(ma) == _without_timing(mb), manifest


def test_two_processes_build_the_one_process_index(inputs, tmp_path):
    args, reference = inputs
    out = tmp_path / "two"
    done = _two_processes([*args, "--out", out])
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "[p0] [build-index] encoding 5 shards with 2 processes" in lines
    # Process 1 encodes quietly: only process 0 reports.
    assert not [line for line in lines if line.startswith("[p1]") and "[build-index]" in line], done.stdout
    _assert_same_build(reference, out)
    assert not (tmp_path / "two.lock").exists() and not (tmp_path / "two.work").exists()
    # A finished build re-run as 2 processes does nothing, in both.
    again = _two_processes([*args, "--out", out])
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr


def test_killed_two_process_build_resumes_as_one_process(inputs, tmp_path):
    args, reference = inputs
    out = tmp_path / "idx"
    # Process 0 dies (kill -9, holding OUT.lock) right after saving shard 2, its second of 0, 2, 4;
    # process 1 (shards 1, 3) is stopped by the launcher, finished or not.
    killed = _two_processes([*args, "--out", out], fault="shard-2")
    assert killed.returncode == 128 + signal.SIGKILL, killed.stdout + killed.stderr
    edir = tmp_path / "idx.work" / "embeddings"
    kept = {p.name: p.stat().st_mtime_ns for p in edir.glob("shard-*.npy")}
    assert {"shard-00000.npy", "shard-00002.npy"} <= kept.keys() and "shard-00004.npy" not in kept, sorted(kept)
    rerun = _one_process([*args, "--out", out])
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the stale lock" in rerun.stdout
    assert "embeddings of 75 passages ready" in rerun.stdout  # resumed, not encoded from scratch
    # Every finished shard was reused as it was (OUT.work became OUT).
    assert {name: (out / "embeddings" / name).stat().st_mtime_ns for name in kept} == kept
    _assert_same_build(reference, out)


def test_a_second_build_of_the_same_out_is_refused_while_two_processes_hold_it(inputs, tmp_path):
    args, _ = inputs
    out = tmp_path / "idx"
    cluster = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "local_cluster.py"), "-n", "2", "--devices-per-process", str(DEVICES),
         "--", "-m", "rag_jax.cli", "build-index", *map(str, args), "--out", str(out), "--no-progress"],
        env=_env("shard-0:stop"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # Process 0 stops itself after shard 0, holding OUT.lock; process 1 finishes and waits for it.
        shard = tmp_path / "idx.work" / "embeddings" / "shard-00000.npy"
        for _ in range(1200):
            if shard.exists() or cluster.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert shard.exists(), cluster.communicate()[0] if cluster.poll() is not None else "no shard 0"
        other = _one_process([*args, "--out", out])
        assert other.returncode == 2, other.stdout + other.stderr
        assert "held by pid" in other.stderr and "(2 processes)" in other.stderr, other.stderr
    finally:
        holder = json.loads((tmp_path / "idx.lock").read_text())["pid"]  # process 0, stopped
        cluster.send_signal(signal.SIGTERM)  # forwarded to both; process 0 gets it once continued
        os.kill(holder, signal.SIGCONT)
        cluster.communicate(timeout=60)


def test_an_error_in_process_0_stops_the_others_in_one_line(inputs, tmp_path):
    args, _ = inputs
    bad = [tmp_path / "missing.tsv" if a == args[1] else a for a in args]  # --passages names no file
    done = _two_processes([*bad, "--out", tmp_path / "idx"])
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert f"[p0] rag-jax build-index: error: {tmp_path / 'missing.tsv'}: no such file" in lines, done.stdout
    # Process 1 does not wait for a process 0 that gave up: it says why, in one line (unless the
    # launcher stopped it first, having seen process 0 fail).
    assert not [line for line in lines if line.startswith("[p1]") and "Traceback" in line], done.stdout
    assert not (tmp_path / "idx.lock").exists()
