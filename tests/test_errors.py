"""Every user mistake is one line on stderr with exit code 2 (rag_jax.errors):
the real ``rag-jax`` CLI and ``launch/*.py`` run as subprocesses on tiny
inputs; ``--debug`` brings the traceback back, and bugs keep theirs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rag_jax.config import load_config, suggest_field
from rag_jax.data.qa_formats import QAFormatError
from rag_jax.errors import run_reporting_errors, user_message

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
TRAIN = str(ROOT / "launch" / "train.py")
EVALUATE = str(ROOT / "launch" / "evaluate.py")
CLI = ("-m", "rag_jax.cli")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)  # the exit code is what the tests check


def _one_line(p: subprocess.CompletedProcess, prefix: str, *needles: str) -> str:
    """The single stderr line of a failed run, checked to start with ``prefix`` and hold ``needles``."""
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    paths = {
        "ok": d / "ok.jsonl", "empty": d / "empty.jsonl", "blank": d / "blank.jsonl",
        "utf8": d / "bad.csv", "malformed": d / "bad.jsonl", "no_vocab": d / "tokenizer_dir",
    }
    paths["ok"].write_text('{"question": "who?", "answers": ["me"]}\n')
    paths["empty"].write_bytes(b"")
    paths["blank"].write_text("\n  \n")
    # Line 3 holds a Latin-1 byte: the error must name line 3, not a block offset.
    paths["utf8"].write_bytes(b'q one\t["a"]\nq two\t["b"]\nq thr\xe9e\t["c"]\nq four\t["d"]\n')
    paths["malformed"].write_text('{"question": "a", "answers": ["b"]}\n{"question": "c", "answers": "d"}\n')
    paths["no_vocab"].mkdir()
    (paths["no_vocab"] / "config.json").write_text("{}")
    return paths


# -- command-line and config mistakes (no jax import: about a second each) ------

@pytest.mark.parametrize("args, needles", [
    (["--config.train.foo=1"], ["--config.train.foo: no such field in", "tiny.py"]),
    (["--config.trian.lr=1"], ["--config.trian.lr: no such field", "did you mean --config.train.lr?"]),
    (["--config.train.steps=1.5"], ["--config.train.steps=1.5"]),
    (["--workdri=x"], ["workdri", "workdir"]),
])
def test_launch_bad_flags_are_one_line(tmp_path, args, needles):
    p = _run(TRAIN, f"--config={TINY}", f"--workdir={tmp_path / 'w'}", *args, cwd=tmp_path)
    _one_line(p, "train.py", *needles)


def test_launch_missing_config_file_and_workdir(tmp_path):
    _one_line(_run(EVALUATE, f"--config={tmp_path / 'nope.py'}", "--workdir=w", cwd=tmp_path),
              "evaluate.py", "nope.py: No such file or directory")
    _one_line(_run(TRAIN, f"--config={TINY}", cwd=tmp_path), "train.py", "--workdir")


def test_cli_override_mistakes_stay_one_line(tmp_path):
    for override, needles in (("--config.train.lrr=1", ["--config.train.lrr", "did you mean --config.train.lr?"]),
                              ("--config.train.steps=1.5", ["config.train.steps"])):
        p = _run(*CLI, "train", "--config", TINY, "--workdir", str(tmp_path / "w"), override, cwd=tmp_path)
        _one_line(p, "rag-jax train", *needles)


# -- input mistakes, found before anything is written ---------------------------

def test_empty_qa_file_is_one_line_and_writes_nothing(tmp_path, files):
    workdir = tmp_path / "w"
    workdir.mkdir()
    p = _run(TRAIN, f"--config={TINY}", f"--workdir={workdir}", f"--config.data.train_file={files['empty']}",
             cwd=tmp_path)
    _one_line(p, "train.py", f"{files['empty']}: no questions")
    assert list(workdir.iterdir()) == []  # no tokenizers/, no data/


@pytest.mark.parametrize("overrides, needle", [
    ([], "config.data.train_file is empty"),
    (["--config.data.train_file={utf8}"], "bad.csv:3: invalid UTF-8"),
    (["--config.data.train_file={ok}", "--config.data.dev_file={malformed}"],
     "bad.jsonl:2: answers must be a list of strings"),
    (["--config.data.train_file={ok}", "--config.data.dev_file={ok}x"], "ok.jsonlx"),
    (["--config.data.train_file={ok}"], "config.retrieval.index_dir is empty"),
    (["--config.data.train_file={ok}", "--config.train.closed_book", "--config.model.question_tokenizer={no_vocab}"],
     "tokenizer_dir: no tokenizer files (vocab.txt or tokenizer.json)"),
])
def test_cli_train_input_mistakes(tmp_path, files, overrides, needle):
    workdir = tmp_path / "w"
    workdir.mkdir()
    args = [o.format(**{k: str(v) for k, v in files.items()}) for o in overrides]
    p = _run(*CLI, "train", "--config", TINY, "--workdir", str(workdir), *args, cwd=tmp_path)
    _one_line(p, "rag-jax train", needle)
    assert list(workdir.iterdir()) == []


def test_launch_evaluate_blank_split(tmp_path, files):
    p = _run(EVALUATE, f"--config={TINY}", f"--workdir={tmp_path}", f"--config.data.test_file={files['blank']}",
             cwd=tmp_path)
    _one_line(p, "evaluate.py", "blank.jsonl: no questions")


def test_debug_shows_the_traceback(tmp_path, files):
    for args in ((*CLI, "--debug", "train", "--config", TINY, "--workdir", "w", "--config.train.lrr=1"),
                 (*CLI, "train", "--debug", "--config", TINY, "--workdir", "w", "--config.train.lrr=1"),
                 (TRAIN, "--debug", f"--config={TINY}", "--workdir=w", f"--config.data.train_file={files['empty']}")):
        p = _run(*args, cwd=tmp_path)
        assert p.returncode != 0 and p.stderr.count("\n") > 3, p.stderr
        assert "Traceback" in p.stderr and ("ConfigError" in p.stderr or "QAFormatError" in p.stderr)


# -- the boundary itself ---------------------------------------------------------

def _library_value_error() -> None:
    import numpy as np

    np.zeros(3).reshape(2, 2)  # raised inside numpy: a bug, not a user error


def test_boundary_keeps_tracebacks_of_bugs(capsys):
    assert run_reporting_errors(lambda: 0, "x") == 0
    assert run_reporting_errors(lambda: None, "x") == 0

    def bad_file() -> None:
        raise QAFormatError("f.jsonl:3: malformed JSON")

    assert run_reporting_errors(bad_file, "rag-jax eval") == 2
    assert capsys.readouterr().err == "rag-jax eval: error: f.jsonl:3: malformed JSON\n"
    with pytest.raises(QAFormatError):
        run_reporting_errors(bad_file, "x", debug=True)
    with pytest.raises(ValueError, match="reshape"):
        run_reporting_errors(_library_value_error, "x")
    with pytest.raises(KeyError):  # not raised by a raise statement of rag_jax
        run_reporting_errors(lambda: {}["k"], "x")
    missing = FileNotFoundError(2, "No such file or directory", "a/b.txt")
    assert user_message(missing) == "a/b.txt: No such file or directory"


def test_did_you_mean():
    cfg = load_config(TINY)
    assert suggest_field(cfg, "trian.lr") == "train.lr"
    assert suggest_field(cfg, "train.lrr") == "train.lr"
    assert suggest_field(cfg, "eval.lr") == "train.lr"  # a field of that name elsewhere
    assert suggest_field(cfg, "model.tiny.generator.d_modle") == "model.tiny.generator.d_model"
    assert suggest_field(cfg, "train.foo") is None


def test_eval_of_an_untrained_workdir_writes_nothing(tmp_path, files):
    workdir = tmp_path / "w"
    workdir.mkdir()
    p = _run(EVALUATE, f"--config={TINY}", f"--workdir={workdir}", "--config.train.closed_book",
             f"--config.data.train_file={files['ok']}", f"--config.data.test_file={files['ok']}", cwd=tmp_path)
    _one_line(p, "evaluate.py", f"{workdir / 'checkpoints'}: no such directory")
    assert list(workdir.iterdir()) == []
