"""build-index under faults: kill -9 at named points (RAG_JAX_FAULT_POINT), changed inputs,
concurrent writers, re-runs of a finished build, and bad passages files.

Each killed build is a real ``python -m rag_jax.cli build-index`` subprocess
that SIGKILLs (or SIGSTOPs) itself at a point of rag_jax.retrieval.faults;
the re-runs must give the uninterrupted build's index (same ids, same
embedding bytes), reuse the finished encoding work and leave no temporary
directories behind.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from rag_jax.cli import main as cli_main
from rag_jax.retrieval.faults import ENV
from rag_jax.retrieval.index import load_index
from tests.tiny_context_encoder import WORDS, save_tiny_context_encoder

# 37 passages, batches of 8, shards of 16 rows: shards of 16, 16 and 5 rows.
ENCODE = ["--batch-size", "8", "--shard-rows", "16", "--max-length", "24", "--index-type", "exact"]


def _tsv(path, n, start=0):
    rng = np.random.default_rng(start)
    with open(path, "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for i in range(start, start + n):
            f.write(f'{i + 1}\t"{" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30))))}"\tTitle {i}\n')
    return path


@pytest.fixture(scope="module")
def ctx_dir(tmp_path_factory):
    return save_tiny_context_encoder(tmp_path_factory.mktemp("ctx"))


def _spawn(args, fault=None):
    """``rag-jax build-index ARGS`` as a subprocess, with the in-process tests' jax settings."""
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    if fault:
        env[ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "rag_jax.cli", "build-index", *map(str, args), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _killed_at(args, fault):
    proc = _spawn(args, fault)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (fault, out, err)
    return out


def _build(args, capsys):
    rc = cli_main(["build-index", *map(str, args), "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _leftovers(root):
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.suffix in (".work", ".lock"))


def _same_index(a, b):
    ia, ib = load_index(a), load_index(b)
    assert ia.corpus.checksum == ib.corpus.checksum
    assert [ia.corpus.id(r) for r in range(ia.count)] == [ib.corpus.id(r) for r in range(ib.count)]
    assert ia.embeddings.manifest["shards"] == ib.embeddings.manifest["shards"]
    for name in ia.embeddings.manifest["shards"]:
        assert (a / "embeddings" / name).read_bytes() == (b / "embeddings" / name).read_bytes(), name


def test_kill_at_each_point_then_rerun_gives_the_uninterrupted_index(ctx_dir, tmp_path, capsys):
    tsv = _tsv(tmp_path / "psgs.tsv", 37)
    common = ["--passages", tsv, "--encoder", ctx_dir, *ENCODE]
    rc, _, err = _build([*common, "--out", tmp_path / "ref"], capsys)
    assert rc == 0, err
    out, work = tmp_path / "idx", tmp_path / "idx.work"
    args = [*common, "--out", out]

    # Killed right after the second of three shards: two shards on disk, nothing else.
    _killed_at(args, "shard-1")
    shards = work / "embeddings"
    assert sorted(p.name for p in shards.glob("shard-*")) == ["shard-00000.npy", "shard-00001.npy"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*")}
    assert not out.exists()

    # Killed with the finished index in the work dir: the done shards were not encoded again.
    log = _killed_at(args, "index")
    assert "reusing corpus store" in log
    assert {n: (shards / n).stat().st_mtime_ns for n in mtimes} == mtimes
    assert (shards / "shard-00002.npy").is_file() and (work / "manifest.json").is_file() and not out.exists()

    # Killed just after the commit: OUT is complete, the lock is stale.
    log = _killed_at(args, "commit")
    assert "reusing the finished index" in log and "reusing embedding store" in log
    assert out.is_dir() and not work.exists() and (tmp_path / "idx.lock").exists()
    assert {n: (out / "embeddings" / n).stat().st_mtime_ns for n in mtimes} == mtimes

    # The same command again: recognised as done, exit 0, stale lock taken over and removed.
    rc, log, err = _build(args, capsys)
    assert rc == 0, err
    assert "taking over the stale lock" in log and "already built from the same inputs" in log
    _same_index(out, tmp_path / "ref")
    assert _leftovers(tmp_path) == []
    # Other options on the finished OUT: refused, naming what differs.
    rc, _, err = _build([*common[:-1], "scann", "--out", out], capsys)
    assert rc == 2 and "already exists (built from other inputs or options: index_type: 'exact' -> 'scann'" in err


def test_changed_passages_and_a_second_writer(tmp_path, capsys):
    """The issue's scenario: 200 lines, stopped after the corpus, file grown to 400 lines, re-run."""
    tsv = _tsv(tmp_path / "st.tsv", 200)
    vecs = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    np.save(tmp_path / "v200.npy", vecs[:200])
    (tmp_path / "ids200.txt").write_text("".join(f"{i + 1}\n" for i in range(200)))
    out = tmp_path / "idx"
    first = _spawn(["--passages", tsv, "--embeddings-npy", tmp_path / "v200.npy", "--embeddings-ids",
                    tmp_path / "ids200.txt", "--out", out, "--index-type", "exact"], fault="corpus:stop")
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), first.communicate()
        assert (tmp_path / "idx.work" / "corpus" / "manifest.json").is_file()
        # A second writer while the first is alive (stopped, holding the lock): one line naming it.
        rc, _, err = _build(["--passages", tsv, "--embeddings-npy", tmp_path / "v200.npy", "--embeddings-ids",
                             tmp_path / "ids200.txt", "--out", out], capsys)
        assert rc == 2 and err.count("\n") == 1
        assert f"held by pid {first.pid} on host" in err and "build-index --out" in err
    finally:
        first.kill()
        first.communicate()

    _tsv(tmp_path / "extra.tsv", 200, start=200)
    with open(tsv, "a", encoding="utf-8") as f:
        f.write((tmp_path / "extra.tsv").read_text().split("\n", 1)[1])
    np.save(tmp_path / "v.npy", vecs)
    (tmp_path / "ids.txt").write_text("".join(f"{i + 1}\n" for i in range(400)))
    imports = ["--embeddings-npy", tmp_path / "v.npy", "--embeddings-ids", tmp_path / "ids.txt"]
    rc, log, err = _build(["--passages", tsv, *imports, "--out", out, "--index-type", "exact"], capsys)
    assert rc == 0, err
    assert f"taking over the stale lock {tmp_path / 'idx.lock'} of pid {first.pid}" in log
    assert "rebuilding the corpus store: " in log and "changed (" in log and "reusing corpus store" not in log
    idx = load_index(out)
    assert idx.count == 400 and idx.corpus.id(399) == "400"
    np.testing.assert_array_equal(idx.embeddings.to_array(), vecs)
    assert _leftovers(tmp_path) == []

    # Same size, one character changed, after a failed build left its corpus store behind.
    edited = tsv.read_text().replace("Title 7\n", "Title 8\n", 1)
    (tmp_path / "ids_bad.txt").write_text("".join(f"{i + 2}\n" for i in range(400)))
    args = ["--passages", tsv, "--embeddings-npy", tmp_path / "v.npy", "--out", tmp_path / "i2"]
    rc, _, err = _build([*args, "--embeddings-ids", tmp_path / "ids_bad.txt"], capsys)
    assert rc == 2 and "'401' not in corpus" in err and (tmp_path / "i2.work" / "corpus").is_dir()
    tsv.write_text(edited)
    rc, log, err = _build([*args, "--embeddings-ids", tmp_path / "ids.txt"], capsys)
    assert rc == 0, err
    assert "rebuilding the corpus store: " in log and "(same size, different content)" in log
    assert load_index(tmp_path / "i2").corpus.title(7) == "Title 8"


def test_finished_build_is_recognised_and_leftovers_are_cleaned(tmp_path, capsys):
    tsv = _tsv(tmp_path / "p.tsv", 30)
    np.save(tmp_path / "v.npy", np.random.default_rng(1).standard_normal((30, 4)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"{i + 1}\n" for i in range(30)))
    out = tmp_path / "idx"
    args = ["--passages", tsv, "--embeddings-npy", tmp_path / "v.npy", "--embeddings-ids", tmp_path / "ids.txt",
            "--out", out, "--index-type", "exact"]
    # What killed runs of older versions and of build_index leave: hidden temp dirs, an import's scratch.
    (tmp_path / ".idx.tmp-0123abcd" / "embeddings").mkdir(parents=True)
    (tmp_path / "idx.work").mkdir()
    (tmp_path / "idx.work" / "embeddings.import.f32").write_bytes(b"x" * 100)
    rc, log, err = _build(args, capsys)
    assert rc == 0, err
    assert "removing leftover temporary directory" in log and "removing leftover" in log
    assert _leftovers(tmp_path) == []
    manifest = json.loads((out / "manifest.json").read_text())
    # Touched (new mtime, same content): still the same build.
    os.utime(tsv, ns=(tsv.stat().st_atime_ns, tsv.stat().st_mtime_ns + 5_000_000_000))
    rc, log, err = _build(args, capsys)
    assert rc == 0 and "already built from the same inputs and options (30 passages); nothing to do" in log
    assert json.loads((out / "manifest.json").read_text()) == manifest
    rc, _, err = _build([*args, "--dtype", "float16"], capsys)
    assert rc == 2 and "dtype: 'float32' -> 'float16'" in err and "--overwrite" in err
    # A commit replacing OUT (--overwrite) killed between its two renames: the old index is put back.
    os.rename(out, tmp_path / ".idx.old-0badf00d")
    rc, log, err = _build(args, capsys)
    assert rc == 0 and "restored" in log and "nothing to do" in log and _leftovers(tmp_path) == []


def test_scann_options_are_applied_or_reported(tmp_path, capsys):
    tsv = _tsv(tmp_path / "p.tsv", 300)
    np.save(tmp_path / "v.npy", np.random.default_rng(2).standard_normal((300, 8)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"{i + 1}\n" for i in range(300)))
    base = ["--passages", tsv, "--embeddings-npy", tmp_path / "v.npy", "--embeddings-ids", tmp_path / "ids.txt"]
    rc, _, err = _build([*base, "--out", tmp_path / "a", "--num-leaves", "10"], capsys)
    assert rc == 0
    assert "--num-leaves 10: not applied (ScaNN brute force does not use them (300 passages < 20,000" in err
    scann = json.loads((tmp_path / "a" / "manifest.json").read_text())["scann"]
    assert scann["brute_force"] is True and scann["num_leaves"] == 0  # never records what was not used
    rc, _, err = _build([*base, "--out", tmp_path / "b", "--num-leaves", "10", "--no-brute-force"], capsys)
    assert rc == 0 and "not applied" not in err
    scann = json.loads((tmp_path / "b" / "manifest.json").read_text())["scann"]
    assert scann["brute_force"] is False and scann["num_leaves"] == 10 and scann["num_leaves_to_search"] == 8
    rc, _, err = _build([*base, "--out", tmp_path / "c", "--index-type", "exact", "--reorder-k", "50"], capsys)
    assert rc == 0 and "--reorder-k 50: ScaNN options, not applied to --index-type exact" in err


BAD_UTF8 = b"id\ttext\ttitle\n" + b"".join(b"%d\tok text\tT\n" % i for i in range(1, 61)) + b"61\tcaf\xe9\tT\n"


@pytest.mark.parametrize("name, body, strict, error", [
    ("empty.tsv", b"", False, "empty.tsv: no passages"),
    ("header.tsv", b"id\ttext\ttitle\n", False, "header.tsv: no passages"),
    ("utf.tsv", BAD_UTF8, False, "utf.tsv:62: not valid UTF-8 (byte 0xe9 at column 7)"),
    ("utf.jsonl", b'{"id": 1, "text": "a"}\n{"id": 2, "text": "caf\xe9"}\n', False,
     "utf.jsonl:2: not valid UTF-8 (byte 0xe9 at column 23)"),
    ("dup.tsv", b"id\ttext\ttitle\n1\ta\tT\n2\tb\tT\n3\tc\tT\n2\td\tT\n", False,
     "dup.tsv:5: duplicate id '2' (first on line 3)"),
    ("empty_text.tsv", b"id\ttext\ttitle\n1\ta\tT\n2\t\"\"\tT\n3\t \tT\n", True,
     "empty_text.tsv:3: empty passage text (--strict)"),
    ("ids.tsv", b"id\ttext\ttitle\n1\ta\tT\nx2\tb\tT\n", True,
     "ids.tsv:3: id 'x2' is not an integer (DPR TSV ids are integers) (--strict)"),
])
def test_passage_file_errors_are_one_line_with_file_and_line(tmp_path, capsys, name, body, strict, error):
    f = tmp_path / name
    f.write_bytes(body)
    np.save(tmp_path / "v.npy", np.zeros((1, 4), np.float32))
    (tmp_path / "ids.txt").write_text("1\n")
    args = ["--passages", f, "--embeddings-npy", tmp_path / "v.npy", "--embeddings-ids", tmp_path / "ids.txt",
            "--out", tmp_path / "idx", "--index-type", "exact", *(["--strict"] if strict else [])]
    rc, _, err = _build(args, capsys)
    assert rc == 2
    assert err == f"rag-jax build-index: error: {f.parent / error}\n"
    # Nothing of the bad file is kept: once fixed, the same command works (no "reusing ... (0 passages)").
    assert not (tmp_path / "idx.work" / "corpus").exists()
    f.write_bytes(b'{"id": 1, "text": "fixed"}\n' if name.endswith(".jsonl") else b"id\ttext\ttitle\n1\tfixed\tT\n")
    rc, log, err = _build(args, capsys)
    assert rc == 0, err
    assert "corpus: 1 passages" in log and load_index(tmp_path / "idx").corpus.text(0) == "fixed"


def test_suspicious_passages_warn_with_count_and_lines(tmp_path, capsys):
    f = tmp_path / "p.tsv"
    f.write_text("id\ttext\ttitle\n1\ta\tT\n2\t\"\"\tT\n3\tc\tT\nx4\t\tT\nx5\te\tT\n", encoding="utf-8")
    np.save(tmp_path / "v.npy", np.eye(5, 4, dtype=np.float32))
    (tmp_path / "ids.txt").write_text("1\n2\n3\nx4\nx5\n")
    args = ["--passages", f, "--embeddings-npy", tmp_path / "v.npy", "--embeddings-ids", tmp_path / "ids.txt",
            "--out", tmp_path / "idx", "--index-type", "exact"]
    rc, _, err = _build(args, capsys)
    assert rc == 0
    assert f"{f}: 2 passages with an empty text (line 3, 5; first: empty passage text)" in err
    assert f"{f}: 2 ids that are not integers (line 5, 6; first: id 'x4' is not an integer" in err
    # The finished build, re-run with --strict, fails on what it had warned about.
    rc, _, err = _build([*args, "--strict"], capsys)
    assert rc == 2 and err == f"rag-jax build-index: error: {f}:3: empty passage text (--strict)\n"


def test_switching_from_import_to_encoding_re_encodes(ctx_dir, tmp_path, capsys):
    tsv = _tsv(tmp_path / "p.tsv", 37)
    np.save(tmp_path / "v.npy", np.zeros((37, 16), np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"{i + 1}\n" for i in range(37)))
    out = tmp_path / "idx"
    # Fails after the import, at the index step: the imported store stays in the work dir.
    rc, _, err = _build(["--passages", tsv, "--embeddings-npy", tmp_path / "v.npy", "--embeddings-ids",
                         tmp_path / "ids.txt", "--out", out, "--no-brute-force", "--num-leaves", "99"], capsys)
    assert rc == 2 and "num_leaves=99 must be between 1 and the 37 passages" in err
    assert (tmp_path / "idx.work" / "embeddings" / "embeddings.json").is_file()
    rc, log, err = _build(["--passages", tsv, "--encoder", ctx_dir, *ENCODE, "--out", out], capsys)
    assert rc == 0, err
    assert "reusing corpus store" in log and "re-encoding from scratch" in log and "no job.json" in log
    assert np.abs(load_index(out).embeddings.to_array()).sum() > 0  # encoded, not the imported zeros


def test_corpus_directory_input_is_copied_and_rerun_recognised(tmp_path, capsys):
    from rag_jax.retrieval.corpus import build_corpus

    corpus = build_corpus(_tsv(tmp_path / "p.tsv", 20), tmp_path / "corpus", progress=False)
    np.save(tmp_path / "v.npy", np.random.default_rng(3).standard_normal((20, 4)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"{i + 1}\n" for i in range(20)))
    args = ["--corpus", tmp_path / "corpus", "--embeddings-npy", tmp_path / "v.npy", "--embeddings-ids",
            tmp_path / "ids.txt", "--out", tmp_path / "idx", "--index-type", "exact"]
    assert _build(args, capsys)[0] == 0
    assert load_index(tmp_path / "idx").corpus.checksum == corpus.checksum and (tmp_path / "corpus").is_dir()
    rc, log, _ = _build(args, capsys)
    assert rc == 0 and "nothing to do" in log
