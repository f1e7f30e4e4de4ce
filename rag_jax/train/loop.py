"""``train_and_evaluate(config, workdir)``: the whole training run.

Sections: setup (mesh, models, tokenizers, retriever, data) -> state (sharded
init or orbax restore) -> loop (host retrieval, jitted sharded step, logging,
checkpoints, preemption) -> evaluation.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding

from rag_jax.checkpoint.hf_rag import RagSettings
from rag_jax.checkpoint.manager import CheckpointManager, PreemptionFlag
from rag_jax.data import qa_formats
from rag_jax.data.pipeline import make_loader
from rag_jax.data.tfds_builders import build_qa_dataset, open_split
from rag_jax.data.tokenize import TextTokenizer, load_tokenizer
from rag_jax.models.bart import Bart, BartConfig
from rag_jax.models.bert import BertConfig, DprEncoder
from rag_jax.parallel import rules as R
from rag_jax.parallel.mesh import make_mesh
from rag_jax.rag.model import RagConfig, RagModel
from rag_jax.train.evaluate import evaluate
from rag_jax.train.logger import MetricLogger
from rag_jax.train.optim import optimizer_from_config
from rag_jax.train.state import create_state, state_shardings
from rag_jax.train.step import jit_train_step, make_train_step
from rag_jax.train.task import RagTask

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ============================================================================
# Models and tokenizers
# ============================================================================


@dataclasses.dataclass
class Models:
    question_config: BertConfig
    generator_config: BartConfig
    params: dict[str, Any]  # {"question_encoder": ..., "generator": ...}, unboxed, host
    question_tokenizer: TextTokenizer
    generator_tokenizer: TextTokenizer


def _train_question_tokenizer(texts: list[str], out: Path, vocab_size: int) -> Path:
    from tokenizers import BertWordPieceTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, show_progress=False,
                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save_model(str(out))
    return out


def _corpus_texts(config: Any) -> list[str]:
    texts = []
    for f in (config.data.train_file, config.data.dev_file):
        if f:
            for rec in qa_formats.read_qa(f, config.data.format):
                texts.append(rec.question)
                texts.extend(rec.answers)
    if config.retrieval.index_dir:
        from rag_jax.retrieval.index import load_index

        corpus = load_index(config.retrieval.index_dir).corpus
        for i in range(min(len(corpus), 20000)):
            texts.append(corpus.title(i) + " " + corpus.text(i))
    return texts


def build_models(config: Any, workdir: str | os.PathLike, rng: jax.Array) -> Models:
    """Loads HF checkpoints named in the config, or builds tiny random ones
    (training their tokenizers on the run's own data when none is given)."""
    m = config.model
    dtype, param_dtype = DTYPES[m.dtype], DTYPES[m.param_dtype]
    dropout = m.get("dropout", None)
    tok_dir = Path(workdir) / "tokenizers"
    texts: list[str] | None = None

    q_tok_path = m.get("question_tokenizer", "") or m.question_encoder
    g_tok_path = m.get("generator_tokenizer", "") or m.generator
    if q_tok_path:
        q_tok = load_tokenizer(q_tok_path, "bert")
    else:
        texts = texts or _corpus_texts(config)
        q_tok = load_tokenizer(_train_question_tokenizer(texts, tok_dir / "question", m.tiny.question_encoder.vocab_size), "bert")
    if g_tok_path:
        g_tok = load_tokenizer(g_tok_path, "bart")
    else:
        from rag_jax.data.train_tokenizer import train_bart_tokenizer

        texts = texts or _corpus_texts(config)
        g_tok = load_tokenizer(train_bart_tokenizer(texts, tok_dir / "generator", m.tiny.generator.vocab_size), "bart")

    r_q, r_g = jax.random.split(rng)
    if m.question_encoder:
        from rag_jax.checkpoint.hf_bert import load_dpr

        overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        q_cfg, q_params, _ = load_dpr(m.question_encoder, dtype=dtype, param_dtype=param_dtype, **overrides)
    else:
        q_cfg = BertConfig(**{**dict(m.tiny.question_encoder), "vocab_size": q_tok.vocab_size},
                           dtype=dtype, param_dtype=param_dtype,
                           **({} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}))
        ids = jnp.ones((1, 4), jnp.int32)
        q_params = nn.meta.unbox(DprEncoder(q_cfg).init(r_q, ids, ids)["params"])
    if m.generator:
        from rag_jax.checkpoint.hf_bart import load_bart

        overrides = {} if dropout is None else {"dropout": dropout}
        g_cfg, g_params = load_bart(m.generator, dtype=dtype, param_dtype=param_dtype, **overrides)
    else:
        from rag_jax.generator import scratch_generator

        g_cfg, g_params = scratch_generator(
            dict(m.tiny.generator), g_tok, r_g, float(m.tiny.get("generator_sinusoidal_positions", 0.0)),
            dtype=dtype, param_dtype=param_dtype, **({} if dropout is None else {"dropout": dropout}),
        )
    if g_tok.vocab_size > g_cfg.vocab_size:
        raise ValueError(f"generator tokenizer has {g_tok.vocab_size} tokens but the model only {g_cfg.vocab_size}")
    return Models(q_cfg, g_cfg, {"question_encoder": q_params, "generator": g_params}, q_tok, g_tok)


def boxed_params(models: Models) -> Any:
    """Abstract params with logical axis names, for the sharding rules."""
    ids = jnp.ones((1, 4), jnp.int32)
    return jax.eval_shape(lambda: {
        "question_encoder": DprEncoder(models.question_config).init(jax.random.PRNGKey(0), ids, ids)["params"],
        "generator": Bart(models.generator_config).init(jax.random.PRNGKey(0), ids, ids, ids)["params"],
    })


# ============================================================================
# Data
# ============================================================================


def _read_split(path: str, fmt: str) -> tuple[list[str], list[list[str]], list[list[str]] | None]:
    """Questions, answers and, when any record names them, gold passage ids."""
    recs = list(qa_formats.read_qa(path, fmt))
    gold = [list(r.positive_ids or ()) for r in recs]
    return [r.question for r in recs], [list(r.answers) for r in recs], gold if any(gold) else None


def build_train_loader(config: Any, workdir: str | os.PathLike, global_batch: int, seed: int) -> Any:
    if not config.data.train_file:
        raise ValueError("config.data.train_file is empty")
    data_dir = config.data.dataset_dir or os.path.join(os.fspath(workdir), "data")
    ds_dir = build_qa_dataset({"train": config.data.train_file}, data_dir, fmt=config.data.format)
    per_process = global_batch // jax.process_count()
    return make_loader(open_split(ds_dir, "train"), per_process, seed=seed, shuffle=True,
                       num_threads=config.data.num_threads)


# ============================================================================
# The run
# ============================================================================


def batch_shardings(batch: dict[str, np.ndarray], mesh: Any, rules: Any) -> dict[str, NamedSharding]:
    """Leading axis on ``batch``; a global batch smaller than the data axes is replicated."""
    return {
        k: NamedSharding(mesh, R.leaf_spec(("batch",) + (None,) * (v.ndim - 1), v.shape, mesh, rules))
        for k, v in batch.items()
    }


def make_task(config: Any, models: Models, retriever: Any = None) -> RagTask:
    closed = bool(config.train.closed_book)
    if retriever is None and not closed:
        from rag_jax.retrieval.retriever import Retriever

        if not config.retrieval.index_dir:
            raise ValueError("config.retrieval.index_dir is empty (set it, or train.closed_book=True)")
        retriever = Retriever(config.retrieval.index_dir)
    rag_cfg = RagConfig(models.question_config, models.generator_config,
                        RagSettings(variant=config.model.variant, n_docs=config.retrieval.n_docs))
    return RagTask(
        config=rag_cfg, question_tokenizer=models.question_tokenizer, generator_tokenizer=models.generator_tokenizer,
        retriever=None if closed else retriever, variant=config.model.variant,
        n_docs=1 if closed else config.retrieval.n_docs, max_question_length=config.data.max_source_length,
        max_combined_length=config.data.max_combined_length, max_target_length=config.data.max_target_length,
        label_smoothing=config.train.label_smoothing, exclude_bos_score=config.train.exclude_bos_score,
        closed_book=closed, freeze_question_encoder=bool(config.train.freeze_question_encoder),
    )


def run_eval(config: Any, task: RagTask, rag_model: RagModel, params: Any, split_file: str,
             progress: bool = True, return_predictions: bool = False) -> dict[str, Any]:
    questions, answers, gold = _read_split(split_file, config.data.format)
    if config.eval.max_examples:
        m = config.eval.max_examples
        questions, answers, gold = questions[:m], answers[:m], (gold[:m] if gold else None)
    return evaluate(task, rag_model, params, questions, answers, batch_size=config.eval.batch_size,
                    num_beams=config.eval.num_beams, max_length=config.eval.max_length,
                    decoding=config.eval.decoding, progress=progress, return_predictions=return_predictions,
                    positive_ids=gold)


def global_batch_size(config: Any, num_devices: int) -> int:
    gb = int(config.train.get("global_batch_size", 0) or 0)
    if not gb:
        # per_device_batch_size already counts every micro-batch (config_checks).
        return config.train.per_device_batch_size * num_devices
    return gb


def train_and_evaluate(config: Any, workdir: str | os.PathLike, retriever: Any = None,
                       verbose: bool = True, devices: Sequence[jax.Device] | None = None,
                       on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Trains, checkpoints and evaluates; returns the final metrics and losses.

    ``devices`` restricts the mesh (default: all); ``on_step(step)`` is called
    after each step (tests use it to deliver a SIGTERM mid-run).
    """
    from rag_jax.train.config_checks import validate

    if config.get("multihost", False):
        jax.distributed.initialize()
    devices = list(devices or jax.devices())
    validate(config, len(devices))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # -- setup ----------------------------------------------------------------
    mesh = make_mesh(config.mesh.shape, devices)
    rules = R.rules_from_config(config.mesh.logical_axis_rules)
    rng = jax.random.PRNGKey(config.train.seed)
    init_rng, train_rng = jax.random.split(rng)
    models = build_models(config, workdir, init_rng)
    task = make_task(config, models, retriever)
    frozen = ("question_encoder",) if (config.train.freeze_question_encoder or config.train.closed_book) else ()
    tx, schedule = optimizer_from_config(config.train, frozen=frozen)
    global_batch = global_batch_size(config, len(devices))

    # -- state ----------------------------------------------------------------
    shardings = state_shardings(boxed_params(models), tx, mesh, rules)
    state = create_state(models.params, tx, train_rng, shardings)
    loader = build_train_loader(config, workdir, global_batch, config.train.seed)
    ckpt = CheckpointManager(workdir / "checkpoints", every=config.checkpoint.every, keep=config.checkpoint.keep,
                             async_save=config.checkpoint.async_save)
    if ckpt.latest_step() is not None:
        state, data_state, step = ckpt.restore(target=state)
        loader.set_state(data_state["loader"])
        if verbose:
            print(f"[train] resumed from {workdir / 'checkpoints'} at step {step}", flush=True)
    step_fn = make_train_step(task.loss_fn, tx, config.train.grad_accum_steps)
    train_step = None  # compiled at the first batch, whose shapes fix the batch shardings
    logger = MetricLogger(workdir, config.train.steps, global_batch, enabled=verbose)
    rag_model = RagModel(task.config, jax.device_get(state.params), models.question_tokenizer, models.generator_tokenizer)

    # -- loop -----------------------------------------------------------------
    losses: dict[int, float] = {}
    history: list[dict[str, Any]] = []
    start = int(state.step)
    with PreemptionFlag() as preempt:
        for step in range(start, config.train.steps):
            batch = next(loader)
            host = task.train_batch(state.params["question_encoder"], batch["question"], batch["answer"])
            if train_step is None:
                train_step = jit_train_step(step_fn, shardings, batch_shardings(host, mesh, rules))
            state, metrics = train_step(state, host)
            loss = float(metrics["loss"])
            done = step + 1
            if not math.isfinite(loss):
                _stop_diverged(ckpt, done, f"loss is {loss}", workdir)
            losses[done] = loss
            if done % config.train.log_every == 0 or done == config.train.steps:
                logger.log_train(done, {"loss": loss, "grad_norm": float(metrics["grad_norm"]),
                                        "lr": float(schedule(done - 1))})
            # A finite loss can still leave inf/NaN params after the update.
            params_finite = bool(metrics["params_finite"])
            if ckpt.should_save(done):
                if not params_finite:
                    _stop_diverged(ckpt, done, "parameters became non-finite", workdir)
                ckpt.save(done, state, {"loader": loader.get_state()})
            if config.eval.every and done % config.eval.every == 0 and done < config.train.steps and config.data.dev_file:
                ev = run_eval(config, task, rag_model, jax.device_get(state.params), config.data.dev_file, verbose)
                logger.write(done, {k: v for k, v in ev.items() if isinstance(v, float)}, "dev")
                history.append({"step": done, **ev})
                if verbose:
                    print(f"[eval] step {done}: " + _fmt_metrics(ev), flush=True)
            if on_step is not None:
                on_step(done)
            if preempt.requested:
                if not params_finite:
                    _stop_diverged(ckpt, done, "parameters became non-finite", workdir)
                ckpt.save(done, state, {"loader": loader.get_state()}, force=True)
                ckpt.wait()
                if verbose:
                    print(f"[train] preempted: saved step {done}", flush=True)
                break
        else:
            if int(state.step) > start and not params_finite:
                _stop_diverged(ckpt, int(state.step), "parameters became non-finite", workdir)
            ckpt.save(int(state.step), state, {"loader": loader.get_state()}, force=True)
    ckpt.wait()
    ckpt.close()

    # -- final evaluation -----------------------------------------------------
    results: dict[str, Any] = {"losses": losses, "history": history, "step": int(state.step)}
    final_params = jax.device_get(state.params)
    for name, f in (("dev", config.data.dev_file), ("test", config.data.test_file)):
        if f and int(state.step) >= config.train.steps:
            ev = run_eval(config, task, rag_model, final_params, f, verbose)
            logger.write(int(state.step), {k: v for k, v in ev.items() if isinstance(v, float)}, name)
            results[name] = ev
            if verbose:
                print(f"[eval] final {name}: " + _fmt_metrics(ev), flush=True)
    logger.close()
    results["params"] = final_params
    results["models"] = models
    results["task"] = task
    return results


def _stop_diverged(ckpt: CheckpointManager, step: int, why: str, workdir: Path) -> None:
    ckpt.wait()
    last = ckpt.latest_step()
    ckpt.close()
    raise FloatingPointError(
        f"step {step}: {why}; stopping. The last good checkpoint (step {last}) in "
        f"{workdir / 'checkpoints'} is untouched."
    )


def _fmt_metrics(ev: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if isinstance(v, float))


def restore_params(config: Any, workdir: str | os.PathLike, models: Models) -> tuple[Any, int]:
    """Params of the latest checkpoint in ``workdir/checkpoints`` (host arrays)."""
    ckpt = CheckpointManager(Path(workdir) / "checkpoints", every=config.checkpoint.every,
                             keep=config.checkpoint.keep, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no finished checkpoint in {Path(workdir) / 'checkpoints'}")
        state, _, step = ckpt.restore()
    finally:
        ckpt.close()
    params = jax.tree.map(np.asarray, state["params"])
    # Same structure as freshly built params (orbax returns plain nested dicts).
    jax.tree.map(lambda a, b: None, models.params, params)
    return params, step


def evaluate_checkpoint(config: Any, workdir: str | os.PathLike, split: str = "test",
                        verbose: bool = True) -> dict[str, Any]:
    """EM/F1, recall@k and collapse statistics of the latest checkpoint on a split."""
    file = {"dev": config.data.dev_file, "test": config.data.test_file}[split]
    if not file:
        raise ValueError(f"config.data.{split}_file is empty")
    models = build_models(config, workdir, jax.random.PRNGKey(config.train.seed))
    params, step = restore_params(config, workdir, models)
    task = make_task(config, models)
    rag_model = RagModel(task.config, params, models.question_tokenizer, models.generator_tokenizer)
    metrics = run_eval(config, task, rag_model, params, file, verbose)
    metrics["step"] = step
    return metrics
