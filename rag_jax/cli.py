"""The ``rag-jax`` command: one subcommand per job, ``--help`` on each.

Each ``cli_*`` module registers the subcommands of its job; their run
functions import jax and the rest only when called, so building the parser
(and ``rag-jax --help``) stays fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rag_jax import cli_infer, cli_retrieval, cli_train
from rag_jax.config import OVERRIDE_PREFIXES
from rag_jax.errors import run_reporting_errors


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the built-in demo end to end (no network)")
    p.add_argument("--workdir", default="demo_out", help="where data, index, checkpoints and results go")
    p.add_argument("--fresh", action="store_true", help="ignore cached stages and redo everything")
    p.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    p.add_argument("--fever", action="store_true",
                   help="also train on the world's FEVER claims with learned and frozen retrieval")
    p.add_argument("--bm25", action="store_true",
                   help="also train RAG-Sequence with a frozen BM25 retriever (the paper's BM25 ablation)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from rag_jax.demo.run import run_demo

    return run_demo(workdir=args.workdir, fresh=args.fresh, quick=args.quick, fever=args.fever, bm25=args.bm25)


SUBCOMMANDS = (
    _add_demo,
    cli_retrieval.add_build_index_parser,
    cli_retrieval.add_search_parser,
    cli_train.add_train_parser,
    cli_train.add_eval_parser,
    cli_infer.add_export_parser,
    cli_infer.add_ask_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rag-jax", description="Retrieval-Augmented Generation in JAX/Flax (RAG-Sequence, RAG-Token)."
    )
    debug_help = "on an error, show the full traceback instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    # Also after the subcommand ("rag-jax train --debug ..."); SUPPRESS keeps a
    # "rag-jax --debug train" from being reset by the subparser's default.
    for subparser in sub.choices.values():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse cannot declare "--config.<any field>"; the subcommands that load a
    # config file (cli_train.add_config_arguments) take them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "config_overrides")
    unknown = [a for a in extra if not (takes_overrides and a.startswith(OVERRIDE_PREFIXES))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if takes_overrides:
        args.config_overrides = extra
    return run_reporting_errors(lambda: args.func(args), f"rag-jax {args.command}", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
