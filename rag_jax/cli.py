"""The ``rag-jax`` command: one subcommand per job, ``--help`` on each."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the built-in demo end to end (no network)")
    p.add_argument("--workdir", default="demo_out", help="where data, index, checkpoints and results go")
    p.add_argument("--fresh", action="store_true", help="ignore cached stages and redo everything")
    p.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from rag_jax.demo.run import run_demo

    return run_demo(workdir=args.workdir, fresh=args.fresh, quick=args.quick)


def _optional_parsers() -> list[Callable[[argparse._SubParsersAction], None]]:
    adders: list[Callable] = [_add_demo]
    # Each job registers its own subcommands from the module that owns it.
    for module, names in [
        ("rag_jax.cli_retrieval", ("add_build_index_parser", "add_search_parser")),
        ("rag_jax.cli_train", ("add_train_parser", "add_eval_parser")),
        ("rag_jax.cli_infer", ("add_export_parser", "add_ask_parser")),
    ]:
        try:
            mod = __import__(module, fromlist=list(names))
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        adders += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return adders


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rag-jax", description="Retrieval-Augmented Generation in JAX/Flax (RAG-Sequence, RAG-Token)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _optional_parsers():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"rag-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
