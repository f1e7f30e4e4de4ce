"""The ``rag-jax`` command line: ``--config.a.b=value`` overrides reach the
config through ml_collections' config_flags; bad ones fail in one line."""
import json
from pathlib import Path

import numpy as np
import pytest

from rag_jax.cli import main as cli
from rag_jax.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


@pytest.fixture
def fake_train(monkeypatch):
    """``train_and_evaluate`` that records the config it is given instead of training."""
    import rag_jax.train.loop as loop

    seen = []

    def fake(config, workdir):
        seen.append((config, workdir))
        return {"test": {"exact_match": 0.5, "per_example": [1, 0]}, "preempted": False}

    monkeypatch.setattr(loop, "train_and_evaluate", fake)
    return seen


def test_train_override_takes_effect(fake_train, tmp_path, capsys):
    rc = cli(["train", "--config", TINY, "--workdir", str(tmp_path), "--config.train.lr=0.25",
              "--config.train.steps=7", "--config.model.variant=token", "--config.mesh.shape=(2,1,1)",
              "--config.train.freeze_question_encoder"])
    assert rc == 0
    (config, workdir), = fake_train
    assert workdir == str(tmp_path)
    assert config.train.lr == 0.25 and config.train.steps == 7 and config.model.variant == "token"
    assert tuple(config.mesh.shape) == (2, 1, 1) and config.train.freeze_question_encoder is True
    # Untouched fields keep the file's values.
    plain = load_config(TINY)
    assert config.train.warmup_steps == plain.train.warmup_steps and plain.train.lr != 0.25
    assert json.loads(capsys.readouterr().out) == {"test": {"exact_match": 0.5}}


@pytest.mark.parametrize("override, field", [
    ("--config.train.no_such_field=1", "config.train.no_such_field"),
    ("--config.nowhere.lr=1", "config.nowhere.lr"),
    ("--config.train.steps=1.5", "config.train.steps"),  # an int field
    ("--config.train.freeze_question_encoder=maybe", "config.train.freeze_question_encoder"),
])
def test_bad_override_is_one_line_naming_the_field(fake_train, tmp_path, capsys, override, field):
    rc = cli(["train", "--config", TINY, "--workdir", str(tmp_path), override])
    assert rc == 2 and not fake_train
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rag-jax train: error:")
    assert field in err and "Traceback" not in err


def test_other_unknown_arguments_are_argparse_errors(fake_train, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["train", "--config", TINY, "--workdir", str(tmp_path), "--set", "train.lr=1e-4"])
    assert e.value.code == 2 and "unrecognized arguments: --set train.lr=1e-4" in capsys.readouterr().err
    # Only subcommands that load a config file take overrides.
    with pytest.raises(SystemExit) as e:
        cli(["search", "--index", "i", "--encoder", "e", "question", "--config.train.lr=1"])
    assert e.value.code == 2 and "unrecognized arguments: --config.train.lr=1" in capsys.readouterr().err
    assert not fake_train


def test_missing_config_file(tmp_path, capsys):
    assert cli(["eval", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)]) == 2
    assert "nope.py" in capsys.readouterr().err


def test_load_config_is_locked_against_new_fields():
    cfg = load_config(TINY, ["--noconfig.train.freeze_question_encoder"])
    assert cfg.train.freeze_question_encoder is False
    with pytest.raises(AttributeError):
        cfg.train.new_field = 1


def test_build_index_dir_returns_manifest(tmp_path, capsys):
    from rag_jax.retrieval.build import build_index_dir

    n, d = 12, 4
    tsv = tmp_path / "p.tsv"
    tsv.write_text("id\ttext\ttitle\n" + "".join(f'{i + 1}\t"text {i}"\tT{i}\n' for i in range(n)), encoding="utf-8")
    vecs = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    np.save(tmp_path / "v.npy", vecs)
    (tmp_path / "ids.txt").write_text("".join(f"{i + 1}\n" for i in range(n)))
    out = tmp_path / "index"
    manifest = build_index_dir(out, passages=tsv, embeddings_npy=tmp_path / "v.npy",
                               embeddings_ids=tmp_path / "ids.txt", index_type="exact", progress=False)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == n and manifest["dim"] == d and not (tmp_path / "index.work").exists()
    assert "[build-index] exact index of 12 x 4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already exists"):
        build_index_dir(out, passages=tsv, embeddings_npy=tmp_path / "v.npy", embeddings_ids=tmp_path / "ids.txt")
