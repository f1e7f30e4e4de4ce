"""``validate``: catch a bad config before any device work starts, naming
the offending field (loading config files is ``rag_jax.config``)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rag_jax.data.padding import PADDINGS
from rag_jax.data.qa_formats import FORMATS
from rag_jax.models.layers import DTYPES, PRECISIONS, REMAT_MODES
from rag_jax.parallel.mesh import resolve_mesh_shape
from rag_jax.parallel.rules import MESH_AXES
from rag_jax.rag.model import VARIANTS
from rag_jax.retrieval.fusion import FUSIONS
from rag_jax.train.optim import SCHEDULES

QA_FORMATS = ("auto",) + FORMATS
DECODINGS = ("thorough", "fast")
TASK_KINDS = ("qa", "abstractive", "question_generation", "classification")
ANSWER_MATCHES = ("string", "regex")


def _fail(field: str, msg: str) -> ValueError:
    return ValueError(f"config.{field}: {msg}")


def _need(cfg: Any, field: str, kind: type | tuple[type, ...]) -> Any:
    node = cfg
    for part in field.split("."):
        if part not in node:
            raise _fail(field, "missing")
        node = node[part]
    if kind is float and isinstance(node, int) and not isinstance(node, bool):
        node = float(node)
    if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _fail(field, f"expected {names}, got {type(node).__name__} {node!r}")
    return node


def validate(cfg: Any, num_devices: int | None = None) -> None:
    """Checks types and values; ``num_devices`` also checks the mesh resolves."""
    m = cfg.model
    if _need(cfg, "model.variant", str) not in VARIANTS:
        raise _fail("model.variant", f"{m.variant!r} not in {VARIANTS}")
    for f in ("model.dtype", "model.param_dtype"):
        if _need(cfg, f, str) not in DTYPES:
            raise _fail(f, f"not in {tuple(DTYPES)}")
    if _need(cfg, "model.matmul_precision", str) not in PRECISIONS:
        raise _fail("model.matmul_precision", f"not in {PRECISIONS}")
    if _need(cfg, "model.remat", str) not in REMAT_MODES:
        raise _fail("model.remat", f"{m.remat!r} not in {REMAT_MODES}")
    _need(cfg, "model.question_encoder", str)
    _need(cfg, "model.generator", str)
    if not m.question_encoder or not m.generator:
        # Empty paths mean tiny random models: their shapes must be given.
        for f in ("model.tiny.question_encoder", "model.tiny.generator"):
            node = _need(cfg, f, object)
            for k, v in node.items():
                if k == "init_std":  # the one float among the shapes
                    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                        raise _fail(f"{f}.{k}", f"expected a positive number, got {v!r}")
                elif not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise _fail(f"{f}.{k}", f"expected a positive int, got {v!r}")
        pos = m.tiny.get("generator_sinusoidal_positions", 0.0)
        if not isinstance(pos, (int, float)) or isinstance(pos, bool) or pos < 0:
            raise _fail("model.tiny.generator_sinusoidal_positions", f"expected a number >= 0, got {pos!r}")
    d = _need(cfg, "model.dropout", (float, type(None)))
    if d is not None and not 0.0 <= d < 1.0:
        raise _fail("model.dropout", f"{d} outside [0, 1)")

    if _need(cfg, "data.format", str) not in QA_FORMATS:
        raise _fail("data.format", f"{cfg.data.format!r} not in {QA_FORMATS}")
    for f in ("data.train_file", "data.dev_file", "data.test_file", "data.dataset_dir"):
        _need(cfg, f, str)
    for f in ("data.max_source_length", "data.max_target_length", "data.max_combined_length"):
        if _need(cfg, f, int) <= 0:
            raise _fail(f, "must be positive")
    if cfg.data.max_combined_length < cfg.data.max_source_length:
        raise _fail("data.max_combined_length", "shorter than max_source_length")
    if _need(cfg, "data.padding", str) not in PADDINGS:
        raise _fail("data.padding", f"{cfg.data.padding!r} not in {PADDINGS}")
    buckets = _need(cfg, "data.length_buckets", (tuple, list))
    for i, b in enumerate(buckets):
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            raise _fail(f"data.length_buckets[{i}]", f"expected a positive int, got {b!r}")
    if list(buckets) != sorted(set(buckets)):
        raise _fail("data.length_buckets", f"must be strictly ascending, got {tuple(buckets)}")
    if _need(cfg, "data.num_threads", int) <= 0:
        raise _fail("data.num_threads", "must be positive")

    _validate_task(cfg)

    _need(cfg, "retrieval.index_dir", str)
    if _need(cfg, "retrieval.n_docs", int) <= 0:
        raise _fail("retrieval.n_docs", "must be positive")
    _check_on_device(cfg, num_devices)
    r = cfg.retrieval
    if _need(cfg, "retrieval.fusion", str) not in ("none",) + FUSIONS:
        raise _fail("retrieval.fusion", f"{r.fusion!r} not in {('none',) + FUSIONS}")
    if bool(_need(cfg, "retrieval.bm25_dir", str)) != (r.fusion != "none"):
        raise _fail("retrieval.fusion", f"is {r.fusion!r} with retrieval.bm25_dir {r.bm25_dir!r}: hybrid retrieval "
                    "needs both (bm25_dir and fusion rrf|score), dense or BM25 alone neither")
    if _need(cfg, "retrieval.rrf_k", float) <= 0:
        raise _fail("retrieval.rrf_k", "must be > 0")
    if not 0 <= _need(cfg, "retrieval.fusion_weight", float) <= 1:
        raise _fail("retrieval.fusion_weight", "must be in [0, 1]")
    if _need(cfg, "retrieval.fusion_depth", int) < r.n_docs:
        raise _fail("retrieval.fusion_depth", f"must be >= retrieval.n_docs ({r.n_docs})")

    t = cfg.train
    for f in ("train.steps", "train.per_device_batch_size", "train.grad_accum_steps", "train.log_every"):
        if _need(cfg, f, int) <= 0:
            raise _fail(f, "must be positive")
    if _need(cfg, "train.warmup_steps", int) < 0:
        raise _fail("train.warmup_steps", "must be >= 0")
    if _need(cfg, "train.lr", float) <= 0:
        raise _fail("train.lr", f"must be > 0, got {t.lr}")
    if _need(cfg, "train.schedule", str) not in SCHEDULES:
        raise _fail("train.schedule", f"{t.schedule!r} not in {SCHEDULES}")
    if not 0 <= _need(cfg, "train.end_lr", float) < t.lr:
        raise _fail("train.end_lr", f"must be in [0, lr={t.lr})")
    if _need(cfg, "train.weight_decay", float) < 0:
        raise _fail("train.weight_decay", "must be >= 0")
    if _need(cfg, "train.max_grad_norm", float) < 0:
        raise _fail("train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    if not 0 <= _need(cfg, "train.label_smoothing", float) < 1:
        raise _fail("train.label_smoothing", "must be in [0, 1)")
    for f in ("train.adam_b1", "train.adam_b2"):
        if not 0 <= _need(cfg, f, float) < 1:
            raise _fail(f, "must be in [0, 1)")
    if _need(cfg, "train.adam_eps", float) <= 0:
        raise _fail("train.adam_eps", "must be > 0")
    _need(cfg, "train.seed", int)
    for f in ("train.freeze_question_encoder", "train.closed_book", "train.exclude_bos_score"):
        _need(cfg, f, bool)
    if t.per_device_batch_size % t.grad_accum_steps:
        raise _fail("train.grad_accum_steps",
                    f"must divide per_device_batch_size {t.per_device_batch_size}")

    shape = _need(cfg, "mesh.shape", (tuple, list))
    if len(shape) != len(MESH_AXES) or not all(isinstance(s, int) for s in shape):
        raise _fail("mesh.shape", f"expected {len(MESH_AXES)} ints for axes {MESH_AXES}, got {shape!r}")
    try:
        resolve_mesh_shape(shape, num_devices if num_devices is not None else _any_count(shape))
    except ValueError as e:
        raise _fail("mesh.shape", str(e)) from None
    rules = _need(cfg, "mesh.logical_axis_rules", (tuple, list))
    for i, rule in enumerate(rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise _fail(f"mesh.logical_axis_rules[{i}]", f"expected (name, mesh axes), got {rule!r}")
        axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for a in axes:
            if a is not None and a not in MESH_AXES:
                raise _fail(f"mesh.logical_axis_rules[{i}]", f"unknown mesh axis {a!r}; axes are {MESH_AXES}")

    for f in ("checkpoint.every", "checkpoint.keep"):
        if _need(cfg, f, int) <= 0:
            raise _fail(f, "must be positive")
    _need(cfg, "checkpoint.async_save", bool)

    for f in ("eval.every", "eval.num_beams", "eval.max_length", "eval.batch_size"):
        if _need(cfg, f, int) <= 0:
            raise _fail(f, "must be positive")
    if _need(cfg, "eval.decoding", str) not in DECODINGS:
        raise _fail("eval.decoding", f"not in {DECODINGS}")
    if _need(cfg, "eval.max_examples", int) < 0:
        raise _fail("eval.max_examples", "must be >= 0 (0 = all)")
    _need(cfg, "multihost", bool)


def _validate_task(cfg: Any) -> None:
    kind = _need(cfg, "task.kind", str)
    if kind not in TASK_KINDS:
        raise _fail("task.kind", f"{kind!r} not in {TASK_KINDS}")
    match = _need(cfg, "task.answer_match", str)
    if match not in ANSWER_MATCHES:
        raise _fail("task.answer_match", f"{match!r} not in {ANSWER_MATCHES}")
    if match == "regex" and kind != "qa":
        raise _fail("task.answer_match", f"'regex' applies to task.kind 'qa' only, not {kind!r}")
    lists = {f: tuple(_need(cfg, f"task.{f}", (tuple, list))) for f in ("labels", "label_words", "ignore_labels")}
    for f, values in lists.items():
        for v in values:
            if not isinstance(v, str) or not v.strip():
                raise _fail(f"task.{f}", f"expected non-empty strings, got {v!r}")
        if len(set(values)) != len(values):
            raise _fail(f"task.{f}", f"repeats a value: {values!r}")
    labels = lists["labels"]
    if kind != "classification":
        for f, values in lists.items():
            if values:
                raise _fail(f"task.{f}", f"only for task.kind 'classification' (kind is {kind!r})")
        return
    if len(labels) < 2:
        raise _fail("task.labels", f"classification needs at least 2 labels, got {labels!r}")
    if lists["label_words"] and len(lists["label_words"]) != len(labels):
        raise _fail("task.label_words", f"{len(lists['label_words'])} words for {len(labels)} labels "
                    "(one per label, or empty to use the labels themselves)")
    if isinstance(cfg.eval.get("max_length"), int) and cfg.eval.max_length < 3:
        raise _fail("eval.max_length", f"{cfg.eval.max_length} cannot hold a predicted label's <s> label </s>")
    both = set(labels) & set(lists["ignore_labels"])
    if both:
        raise _fail("task.ignore_labels", f"{sorted(both)} also in task.labels")


def _check_on_device(cfg: Any, num_devices: int | None) -> None:
    """Types of the ``retrieval.on_device`` fields and, when the index and the
    device count are known, whether one shard of the index fits its budget."""
    r = cfg.retrieval
    if not _need(cfg, "retrieval.on_device", bool):
        return
    from rag_jax.retrieval.on_device import DEVICE_DTYPES, bytes_per_device

    if _need(cfg, "retrieval.device_dtype", str) not in DEVICE_DTYPES:
        raise _fail("retrieval.device_dtype", f"{r.device_dtype!r} not in {tuple(DEVICE_DTYPES)}")
    if not 0 <= _need(cfg, "retrieval.approx_recall", float) < 1:
        raise _fail("retrieval.approx_recall", "must be in [0, 1) (0 = exact top-k)")
    if _need(cfg, "retrieval.device_budget_gib", float) < 0:
        raise _fail("retrieval.device_budget_gib", "must be >= 0 (0 = half the device memory when known)")
    if cfg.train.closed_book:
        raise _fail("retrieval.on_device", "a closed-book run retrieves nothing; set it False")
    if r.get("bm25_dir", ""):
        raise _fail("retrieval.on_device", "hybrid retrieval (retrieval.bm25_dir) runs on the host; set one of them off")
    manifest = Path(r.index_dir) / "manifest.json" if r.index_dir else None
    if num_devices is None or manifest is None or not manifest.is_file():
        return  # check_inputs names a missing index
    from rag_jax.parallel.rules import rules_from_config

    axes = dict(rules_from_config(cfg.mesh.logical_axis_rules)).get("batch")
    axes = tuple(axes) if isinstance(axes, (tuple, list)) else (() if axes is None else (axes,))
    if not axes:
        raise _fail("retrieval.on_device", "the 'batch' logical axis maps to no mesh axis to shard the index over")
    sizes = dict(zip(MESH_AXES, resolve_mesh_shape(cfg.mesh.shape, num_devices)))
    shards = math.prod(sizes[a] for a in axes)
    m = json.loads(manifest.read_text())
    if m.get("kind") == "bm25":
        raise _fail("retrieval.on_device", f"{r.index_dir} is a BM25 index; on-device retrieval searches dense vectors")
    need = bytes_per_device(int(m["count"]), int(m["dim"]), cfg.data.max_combined_length - 2, shards, r.device_dtype)
    budget = r.device_budget_gib * 2**30 or _half_device_memory()
    what = (f"the on-device index needs {need / 2**30:.3f} GiB per device ({m['count']} rows over {shards} shards x "
            f"({m['dim']} x {r.device_dtype} + {cfg.data.max_combined_length - 2} int32 tokens + length))")
    if budget and need > budget:
        raise _fail("retrieval.on_device", f"{what}, over the budget of {budget / 2**30:.3f} GiB "
                    "(retrieval.device_budget_gib); use host retrieval, bfloat16 vectors or more shards")


def _half_device_memory() -> float:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 0) / 2


def _any_count(shape: Any) -> int:
    # Without a device count, check the fixed sizes are sane: -1 resolves to 1.
    import math

    return math.prod(s for s in shape if s != -1) if all(s == -1 or s > 0 for s in shape) else 0
