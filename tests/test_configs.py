"""Every config file loads and validates; bad values name the field."""
import glob
import os

import pytest

from rag_jax.config import load_config_module
from rag_jax.parallel.mesh import resolve_mesh_shape
from rag_jax.parallel.rules import DEFAULT_RULES
from rag_jax.train import config_checks as C
from rag_jax.train.setup import global_batch_size
from rag_jax.train.optim import optimizer_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not f.endswith("__init__.py"))


def _load(name):
    return load_config_module(os.path.join(ROOT, "configs", f"{name}.py")).get_config()


def test_expected_configs_exist():
    names = {os.path.basename(f)[:-3] for f in CONFIG_FILES}
    assert {"base", "tiny", "demo", "rag_sequence_nq", "rag_token_nq"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_config_loads_validates_and_builds_optimizer(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs must not depend on the working directory
    cfg = load_config_module(path).get_config()
    C.validate(cfg, num_devices=8)
    assert tuple(cfg.mesh.logical_axis_rules) == DEFAULT_RULES
    tx, sched = optimizer_from_config(cfg.train)
    assert float(sched(cfg.train.warmup_steps)) == pytest.approx(cfg.train.lr, rel=1e-5)
    assert resolve_mesh_shape(cfg.mesh.shape, 8)[0] >= 1


@pytest.mark.parametrize("variant", ["sequence", "token"])
def test_paper_configs_carry_finetune_rag_hyperparameters(variant):
    cfg = _load(f"rag_{variant}_nq")
    assert cfg.model.variant == variant
    t = cfg.train
    assert (t.lr, t.warmup_steps, t.schedule, t.label_smoothing, t.weight_decay, t.max_grad_norm) == (
        3e-5, 500, "polynomial", 0.1, 0.001, 0.1)
    assert (cfg.retrieval.n_docs, cfg.data.max_source_length, cfg.data.max_target_length) == (5, 128, 25)
    assert (t.per_device_batch_size, cfg.model.dropout) == (8, 0.1)
    assert cfg.model.question_encoder and cfg.model.generator
    assert global_batch_size(cfg, 8) == 64  # HF: 8 per GPU on 8 GPUs


@pytest.mark.parametrize("field,value,needle", [
    ("train.lr", 0.0, "train.lr"),
    ("train.lr", -1e-3, "train.lr"),
    ("train.schedule", "cosine", "train.schedule"),
    ("train.label_smoothing", 1.0, "train.label_smoothing"),
    ("train.grad_accum_steps", 3, "train.grad_accum_steps"),
    ("model.variant", "seq", "model.variant"),
    ("model.dtype", "int8", "model.dtype"),
    ("model.matmul_precision", "fastest", "model.matmul_precision"),
    ("retrieval.n_docs", 0, "retrieval.n_docs"),
    ("mesh.shape", (-1, -1, 1), "at most one entry may be -1"),
    ("mesh.shape", (3, 1, 1), "uses 3 devices"),
    ("mesh.shape", (2, 2), "mesh.shape"),
    ("mesh.logical_axis_rules", (("batch", "dataa"),), "unknown mesh axis 'dataa'"),
    ("data.format", "xml", "data.format"),
    ("checkpoint.keep", 0, "checkpoint.keep"),
    ("eval.decoding", "greedy", "eval.decoding"),
])
def test_validate_rejects_bad_values(field, value, needle):
    cfg = _load("tiny")
    node = cfg
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        C.validate(cfg, num_devices=8)


def test_tiny_random_shapes_are_checked():
    cfg = _load("tiny")
    cfg.model.tiny.generator.d_model = 0
    with pytest.raises(ValueError, match="model.tiny.generator.d_model"):
        C.validate(cfg)
    cfg = _load("demo")
    cfg.model.tiny.generator.init_std = -0.1
    with pytest.raises(ValueError, match="model.tiny.generator.init_std"):
        C.validate(cfg)
    cfg = _load("demo")
    cfg.model.tiny.generator_sinusoidal_positions = -1.0
    with pytest.raises(ValueError, match="generator_sinusoidal_positions"):
        C.validate(cfg)


def test_command_line_overrides(tmp_path):
    from absl import flags
    from ml_collections import config_flags

    argv = [
        "prog", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
        "--config.train.lr=0.01", "--config.mesh.shape=(2,2,2)", "--config.train.freeze_question_encoder=True",
    ]
    fv = flags.FlagValues()
    # Override flags are declared from the argv seen at definition time.
    config_flags.DEFINE_config_file("config", default=None, flag_values=fv, sys_argv=argv)
    fv(argv)
    cfg = fv.config
    assert cfg.train.lr == 0.01 and tuple(cfg.mesh.shape) == (2, 2, 2) and cfg.train.freeze_question_encoder
    C.validate(cfg, num_devices=8)
