"""``train_and_evaluate(config, workdir)``: the whole training run.

Sections: setup (mesh, models, tokenizers, retriever, data; ``train.setup``)
-> state (sharded init or orbax restore) -> loop (host retrieval, jitted
sharded step, logging, checkpoints, preemption) -> evaluation
(``train.evaluate``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from rag_jax.parallel import rules as R
from rag_jax.parallel.host_arrays import fetch, local_rows, process_positions, scalar, to_global
from rag_jax.parallel.mesh import make_mesh
from rag_jax.rag.model import RagModel, question_embedding
from rag_jax.train.checkpointing import CheckpointManager, PreemptionFlag, holding_workdir_lock
from rag_jax.train.evaluate import fmt_metrics, run_eval
from rag_jax.train.logger import MetricLogger
from rag_jax.train.setup import (boxed_params, build_models, build_train_loader, check_inputs, global_batch_size,
                                  make_task, optimizer)
from rag_jax.train.state import create_state, state_shardings
from rag_jax.train.step import jit_train_step, make_train_step


def batch_shardings(batch: dict[str, np.ndarray], mesh: Any, rules: Any,
                    global_batch: int | None = None) -> dict[str, NamedSharding]:
    """Leading axis on ``batch`` (whose leading size is ``global_batch``, by
    default its own); a global batch smaller than the data axes is replicated."""
    def spec(v: np.ndarray) -> Any:
        shape = (global_batch or v.shape[0],) + v.shape[1:]
        return R.leaf_spec(("batch",) + (None,) * (v.ndim - 1), shape, mesh, rules)

    return {k: NamedSharding(mesh, spec(v)) for k, v in batch.items()}


def _global_question_embedder(task: Any, mesh: Any, rules: Any, global_batch: int) -> Callable[..., np.ndarray]:
    """With several processes, each retrieves for its own rows, but the
    question encoder's params span all of them: the embedding runs as one
    program over the global batch, and each process keeps its rows."""
    sharding = NamedSharding(mesh, R.leaf_spec(("batch", None), (global_batch, 1), mesh, rules))
    embed = jax.jit(functools.partial(question_embedding, task.config.question_encoder), out_shardings=sharding)

    def run(params: Any, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        local = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        g = to_global(local, dict.fromkeys(local, sharding), global_batch)
        return local_rows(embed(params, g["input_ids"], g["attention_mask"], g["token_type_ids"]))

    return run


def _on_device_task(config: Any, task: Any, mesh: Any, rules: Any, verbose: bool) -> Any:
    """``retrieval.on_device``: the index placed on the mesh and the task that retrieves in the step; else None."""
    if not config.retrieval.on_device:
        return None
    from rag_jax.retrieval.on_device import bytes_per_device, shard_count
    from rag_jax.train.on_device_task import OnDeviceTask, batch_axes, open_device_index

    axes = batch_axes(rules)
    index = open_device_index(task, mesh, axes, config.retrieval.device_dtype, progress=verbose)
    if verbose:
        dim, width = index.vectors.shape[1], index.tokens.shape[1]
        need = bytes_per_device(index.count, dim, width, shard_count(mesh, axes), config.retrieval.device_dtype)
        print(f"[train] on-device index: {index.count} rows x ({dim} {config.retrieval.device_dtype} + {width} "
              f"tokens) over mesh axes {axes}: {need / 2**20:.1f} MiB per device", flush=True)
    return OnDeviceTask(task, mesh, axes, index, config.retrieval.approx_recall)


@holding_workdir_lock  # one training per workdir: a second one stops, naming the holder
def train_and_evaluate(config: Any, workdir: str | os.PathLike, retriever: Any = None,
                       verbose: bool = True, devices: Sequence[jax.Device] | None = None,
                       on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Trains, checkpoints and evaluates; returns the final metrics and losses.

    ``devices`` restricts the mesh (default: all); ``on_step(step)`` is called
    after each step (tests use it to deliver a SIGTERM mid-run).
    """
    from rag_jax.train.config_checks import validate
    from rag_jax.train.distributed import check_same_config

    check_same_config(config)  # the launchers joined the processes (distributed.initialize)
    devices = list(devices or jax.devices())
    validate(config, len(devices))
    check_inputs(config, need_index=retriever is None)  # before anything is written to workdir
    # One process speaks: the others train silently beside it.
    verbose = verbose and jax.process_index() == 0
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # -- setup ----------------------------------------------------------------
    mesh = make_mesh(config.mesh.shape, devices)
    rules = R.rules_from_config(config.mesh.logical_axis_rules)
    rng = jax.random.PRNGKey(config.train.seed)
    init_rng, train_rng = jax.random.split(rng)
    models = build_models(config, workdir, init_rng)
    task = make_task(config, models, retriever)
    tx, schedule = optimizer(config)
    global_batch = global_batch_size(config, len(devices))
    # The rows of each global batch that this process's devices hold: it reads,
    # retrieves for and feeds only those (the same stream for any topology).
    positions = process_positions(NamedSharding(mesh, R.leaf_spec(("batch",), (global_batch,), mesh, rules)),
                                  global_batch)
    if jax.process_count() > 1 and not task.closed_book:
        task = dataclasses.replace(task, embed_questions=_global_question_embedder(task, mesh, rules, global_batch))

    # -- state ----------------------------------------------------------------
    shardings = state_shardings(boxed_params(models), tx, mesh, rules)
    state = create_state(models.params, tx, train_rng, shardings)
    loader = build_train_loader(config, workdir, global_batch, positions)
    ckpt = CheckpointManager(workdir / "checkpoints", every=config.checkpoint.every, keep=config.checkpoint.keep,
                             async_save=config.checkpoint.async_save)
    # The newest step whose files match their checksums; damaged newer ones are moved aside.
    resumed = ckpt.resume(target=state)
    if resumed is not None:
        state, data_state, step = resumed
        loader.set_state(data_state["loader"])
        if verbose:
            print(f"[train] resumed from {workdir / 'checkpoints'} at step {step}", flush=True)
    on_device = _on_device_task(config, task, mesh, rules, verbose)
    step_fn = make_train_step(on_device.loss_fn if on_device else task.loss_fn, tx, config.train.grad_accum_steps)
    # The on-device index stays on the mesh from step to step, passed to every step whole.
    resident = (on_device.index.arrays(),) if on_device else ()
    train_step = None  # compiled at the first batch, whose shapes fix the batch shardings
    logger = MetricLogger(workdir, config.train.steps, global_batch, enabled=verbose,
                          write_files=jax.process_index() == 0)
    rag_model = RagModel(task.config, fetch(state.params), models.question_tokenizer, models.generator_tokenizer)

    # -- loop -----------------------------------------------------------------
    losses: dict[int, float] = {}
    history: list[dict[str, Any]] = []
    start = int(scalar(state.step))
    with PreemptionFlag() as preempt:
        for step in range(start, config.train.steps):
            batch = next(loader)
            if on_device:
                host = on_device.train_batch(batch["question"], batch["answer"])
            else:
                host = task.train_batch(state.params["question_encoder"], batch["question"], batch["answer"])
            if train_step is None:
                host_shardings = batch_shardings(host, mesh, rules, global_batch)
                train_step = jit_train_step(step_fn, shardings, host_shardings,
                                            on_device.index.shardings() if on_device else None)
            state, metrics = train_step(state, to_global(host, host_shardings, global_batch), *resident)
            loss = scalar(metrics["loss"])
            done = step + 1
            if not math.isfinite(loss):
                _stop_diverged(ckpt, done, f"loss is {loss}", workdir)
            losses[done] = loss
            if done % config.train.log_every == 0 or done == config.train.steps:
                logger.log_train(done, {"loss": loss, "grad_norm": scalar(metrics["grad_norm"]),
                                        "lr": float(schedule(done - 1))})
            # A finite loss can still leave inf/NaN params after the update.
            params_finite = bool(scalar(metrics["params_finite"]))
            if ckpt.should_save(done):
                if not params_finite:
                    _stop_diverged(ckpt, done, "parameters became non-finite", workdir)
                ckpt.save(done, state, {"loader": loader.get_state()})
            if config.eval.every and done % config.eval.every == 0 and done < config.train.steps and config.data.dev_file:
                ev = run_eval(config, task, rag_model, fetch(state.params), config.data.dev_file, verbose)
                logger.write(done, {k: v for k, v in ev.items() if isinstance(v, float)}, "dev")
                history.append({"step": done, **ev})
                if verbose:
                    print(f"[eval] step {done}: " + fmt_metrics(ev), flush=True)
            if on_step is not None:
                on_step(done)
            # Every process must agree to stop at the same step (a notice can reach one host late).
            if preempt.sync(done, ckpt):
                if not params_finite:
                    _stop_diverged(ckpt, done, "parameters became non-finite", workdir)
                ckpt.save(done, state, {"loader": loader.get_state()}, force=True)
                ckpt.wait()
                if verbose:
                    print(f"[train] preempted: saved step {done}", flush=True)
                break
        else:
            if int(scalar(state.step)) > start and not params_finite:
                _stop_diverged(ckpt, int(scalar(state.step)), "parameters became non-finite", workdir)
            ckpt.save(int(scalar(state.step)), state, {"loader": loader.get_state()}, force=True)
    ckpt.wait()
    ckpt.close()

    # -- final evaluation -----------------------------------------------------
    results: dict[str, Any] = {"losses": losses, "history": history, "step": int(scalar(state.step)),
                               # Only the preemption path leaves the loop before train.steps (state saved):
                               # launchers exit with checkpointing.PREEMPTED_EXIT_CODE on it.
                               "preempted": int(scalar(state.step)) < config.train.steps}
    final_params = fetch(state.params)
    for name, f in (("dev", config.data.dev_file), ("test", config.data.test_file)):
        if f and int(scalar(state.step)) >= config.train.steps:
            ev = run_eval(config, task, rag_model, final_params, f, verbose)
            logger.write(int(scalar(state.step)), {k: v for k, v in ev.items() if isinstance(v, float)}, name)
            results[name] = ev
            if verbose:
                print(f"[eval] final {name}: " + fmt_metrics(ev), flush=True)
    logger.close()
    results["params"] = final_params
    results["models"] = models
    results["task"] = task
    return results


def _stop_diverged(ckpt: CheckpointManager, step: int, why: str, workdir: Path) -> None:
    ckpt.wait()
    # Named only if its files still match their checksums: what a rerun would resume from.
    last = ckpt.latest_verified_step()
    ckpt.close()
    where = workdir / "checkpoints"
    raise FloatingPointError(
        f"step {step}: {why}; stopping. "
        + (f"The last good checkpoint (step {last}) in {where} is untouched." if last is not None
           else f"No checkpoint in {where} passed verification.")
    )

