"""``rag-jax export`` and ``rag-jax ask``."""
from __future__ import annotations

import argparse
import json

from rag_jax.cli_train import add_config_arguments, add_distributed_arguments, load_config_and_join


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="training checkpoint -> inference directory (HF RAG format, no optimizer state)")
    add_config_arguments(p)  # the training config, with the overrides training ran with
    add_distributed_arguments(p)
    p.add_argument("--workdir", required=True, help="the training workdir (its latest checkpoint is exported)")
    p.add_argument("--out", required=True, help="inference directory to write")
    p.set_defaults(func=_run_export)


def add_ask_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="answer questions with an exported model and an index, showing sources")
    p.add_argument("--model", required=True, help="inference directory from `rag-jax export` (or an HF RAG dir)")
    p.add_argument("--index", default=None, help="index directory (default: the one recorded at export)")
    p.add_argument("questions", nargs="+")
    p.add_argument("--variant", choices=["sequence", "token"], default=None)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--n-docs", type=int, default=None)
    p.add_argument("--max-length", type=int, default=25)
    p.add_argument("--decoding", choices=["thorough", "fast"], default="thorough")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_run_ask)


def _run_export(args: argparse.Namespace) -> int:
    config = load_config_and_join(args)
    from rag_jax.infer import export_from_workdir

    export_from_workdir(config, args.workdir, args.out)
    print(f"[export] wrote {args.out}")
    return 0


def _run_ask(args: argparse.Namespace) -> int:
    from rag_jax.infer import RagPipeline

    pipe = RagPipeline.load(args.model, args.index, n_docs=args.n_docs, variant=args.variant)
    answers = pipe.answer(args.questions, num_beams=args.num_beams, max_length=args.max_length,
                          decoding=args.decoding)
    if args.json:
        print(json.dumps([a.__dict__ for a in answers], indent=2))
        return 0
    for a in answers:
        print(f"Q: {a.question}\nA: {a.answer}")
        for j, p in enumerate(a.passages):
            print(f"  [{j + 1}] p={p['prob']:.3f} score={p['score']:.2f} id={p['id']} {p['title']}: {p['text'][:100]}")
    return 0
