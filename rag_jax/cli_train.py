"""``rag-jax train`` / ``rag-jax eval``: the launch scripts' jobs as subcommands."""
from __future__ import annotations

import argparse
import json


def _config(path: str, overrides: list[str]):  # noqa: ANN202
    from rag_jax.train.config_checks import load_config_module

    cfg = load_config_module(path).get_config()
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        old = node[parts[-1]]
        node[parts[-1]] = _parse_like(value, old, key)
    return cfg


def _parse_like(value: str, old, key: str):  # noqa: ANN001,ANN202
    import ast

    if isinstance(old, str):
        return value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"--set {key}: cannot parse {value!r}") from e
    if isinstance(old, float) and isinstance(parsed, int):
        parsed = float(parsed)
    return parsed


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train RAG (query encoder + generator) from a config file")
    p.add_argument("--config", required=True, help="configs/*.py file with get_config()")
    p.add_argument("--workdir", required=True, help="checkpoints, TensorBoard events; re-run to resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.set_defaults(func=_run_train)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a training workdir's latest checkpoint (EM/F1, recall@k)")
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", choices=["dev", "test"], default="test")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_run_eval)


def _run_train(args: argparse.Namespace) -> int:
    from rag_jax.train.loop import train_and_evaluate

    out = train_and_evaluate(_config(args.config, args.set), args.workdir)
    summary = {k: {m: v for m, v in out[k].items() if not isinstance(v, list)} for k in ("dev", "test") if k in out}
    print(json.dumps(summary, indent=2))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from rag_jax.train.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(_config(args.config, args.set), args.workdir, args.split)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))
    return 0
