"""``train_and_evaluate(config, workdir)``: the whole training run.

Sections: setup (mesh, models, tokenizers, retriever, data; ``train.setup``)
-> state (sharded init or orbax restore) -> loop (host retrieval, jitted
sharded step, logging, checkpoints, preemption) -> evaluation
(``train.evaluate``).
"""
from __future__ import annotations

import math
from pathlib import Path
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from rag_jax.parallel import rules as R
from rag_jax.parallel.mesh import make_mesh
from rag_jax.rag.model import RagModel
from rag_jax.train.checkpointing import CheckpointManager, PreemptionFlag, holding_workdir_lock
from rag_jax.train.evaluate import fmt_metrics, run_eval
from rag_jax.train.logger import MetricLogger
from rag_jax.train.optim import optimizer_from_config
from rag_jax.train.setup import (boxed_params, build_models, build_train_loader, check_inputs, global_batch_size,
                                  make_task)
from rag_jax.train.state import create_state, state_shardings
from rag_jax.train.step import jit_train_step, make_train_step


def batch_shardings(batch: dict[str, np.ndarray], mesh: Any, rules: Any) -> dict[str, NamedSharding]:
    """Leading axis on ``batch``; a global batch smaller than the data axes is replicated."""
    return {
        k: NamedSharding(mesh, R.leaf_spec(("batch",) + (None,) * (v.ndim - 1), v.shape, mesh, rules))
        for k, v in batch.items()
    }


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
    loader = build_train_loader(config, workdir, global_batch)
    ckpt = CheckpointManager(workdir / "checkpoints", every=config.checkpoint.every, keep=config.checkpoint.keep,
                             async_save=config.checkpoint.async_save)
    # The newest step whose files match their checksums; damaged newer ones are moved aside.
    resumed = ckpt.resume(target=state)
    if resumed is not None:
        state, data_state, step = resumed
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
            if int(state.step) > start and not params_finite:
                _stop_diverged(ckpt, int(state.step), "parameters became non-finite", workdir)
            ckpt.save(int(state.step), state, {"loader": loader.get_state()}, force=True)
    ckpt.wait()
    ckpt.close()

    # -- final evaluation -----------------------------------------------------
    results: dict[str, Any] = {"losses": losses, "history": history, "step": int(state.step),
                               # Only the preemption path leaves the loop before train.steps (state saved):
                               # launchers exit with checkpointing.PREEMPTED_EXIT_CODE on it.
                               "preempted": int(state.step) < config.train.steps}
    final_params = jax.device_get(state.params)
    for name, f in (("dev", config.data.dev_file), ("test", config.data.test_file)):
        if f and int(state.step) >= config.train.steps:
            ev = run_eval(config, task, rag_model, final_params, f, verbose)
            logger.write(int(state.step), {k: v for k, v in ev.items() if isinstance(v, float)}, name)
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

