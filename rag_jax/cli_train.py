"""``rag-jax train`` / ``rag-jax eval``: the launch scripts' jobs as subcommands.

Like ``launch/train.py`` they take ``--config=FILE`` and any number of
``--config.a.b=value`` overrides, applied by ml_collections' config_flags
(``rag_jax.config.load_config``); ``rag_jax.cli`` hands the overrides over.
"""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config FILE``; ``config_overrides`` marks the subcommand as taking overrides."""
    p.add_argument("--config", required=True,
                   help="configs/*.py file with get_config(); override its fields with --config.a.b=value "
                        "(repeatable), e.g. --config.train.lr=1e-4")
    p.set_defaults(config_overrides=[])


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """The multi-process flags of ``launch/*.py`` (dashes accepted too); see
    ``rag_jax.train.distributed.initialize``."""
    p.add_argument("--coordinator_address", "--coordinator-address", dest="coordinator_address", default=None,
                   help="HOST:PORT of process 0 in a multi-process run (else JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num_processes", "--num-processes", dest="num_processes", type=int, default=None,
                   help="number of processes (else JAX_NUM_PROCESSES)")
    p.add_argument("--process_id", "--process-id", dest="process_id", type=int, default=None,
                   help="this process, in [0, num_processes) (else JAX_PROCESS_ID)")


def load_config_and_join(args: argparse.Namespace) -> Any:
    """The subcommand's config; then joins the other processes of a
    multi-process run (before any other jax use)."""
    from rag_jax.config import load_config
    from rag_jax.train.distributed import initialize

    config = load_config(args.config, args.config_overrides)
    initialize(args.coordinator_address, args.num_processes, args.process_id,
               multihost=config.get("multihost", False))
    return config


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train RAG (query encoder + generator) from a config file")
    add_config_arguments(p)
    add_distributed_arguments(p)
    p.add_argument("--workdir", required=True, help="checkpoints, TensorBoard events; re-run to resume")
    p.set_defaults(func=_run_train)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a training workdir's latest checkpoint (EM/F1, recall@k)")
    add_config_arguments(p)
    add_distributed_arguments(p)
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", choices=["dev", "test"], default="test")
    p.set_defaults(func=_run_eval)


def _run_train(args: argparse.Namespace) -> int:
    config = load_config_and_join(args)
    import jax
    from rag_jax.train.loop import train_and_evaluate

    from rag_jax.train.checkpointing import PREEMPTED_EXIT_CODE

    out = train_and_evaluate(config, args.workdir)
    summary = {k: {m: v for m, v in out[k].items() if not isinstance(v, list)} for k in ("dev", "test") if k in out}
    if jax.process_index() == 0:  # one process of a multi-process run prints
        print(json.dumps(summary, indent=2))
    # A preempted run saved its state but is not finished: schedulers requeue on this code.
    return PREEMPTED_EXIT_CODE if out["preempted"] else 0


def _run_eval(args: argparse.Namespace) -> int:
    config = load_config_and_join(args)
    import jax
    from rag_jax.train.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(config, args.workdir, args.split)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    return 0
