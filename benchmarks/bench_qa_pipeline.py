"""QA input pipeline throughput: parse a DPR CSV of NQ-train size, build the
TFDS array_record dataset, read shuffled batches with grain.

    python benchmarks/bench_qa_pipeline.py [--questions 79168] [--batch 64]

Prints one JSON line. Synthetic questions (9 words, 1-2 answers), so the
figures measure the pipeline, not NQ's text.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from rag_jax.data import pipeline as P
from rag_jax.data import qa_formats as F
from rag_jax.data import tfds_builders as T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=79168)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv = root / "nq-train.qa.csv"
        with open(csv, "w") as f:
            for i in range(args.questions):
                q = " ".join(rng.choice(words) for _ in range(9))
                answers = [" ".join(rng.choice(words) for _ in range(2)) for _ in range(1 + (i % 7 == 0))]
                f.write(f"{q}\t{answers!r}\n")
        t = time.perf_counter()
        n = sum(1 for _ in F.read_qa(csv))
        parse_s = time.perf_counter() - t
        t = time.perf_counter()
        ds_dir = T.build_qa_dataset({"train": csv}, root / "tfds")
        build_s = time.perf_counter() - t
        loader = P.qa_loader_from_dir(ds_dir, "train", args.batch, seed=0,
                                      num_threads=args.threads)
        next(loader)
        t = time.perf_counter()
        for _ in range(args.batches):
            next(loader)
        read_s = time.perf_counter() - t
    print(json.dumps({
        "questions": n,
        "parse_questions_per_s": round(n / parse_s), "tfds_build_s": round(build_s, 2),
        "batch": args.batch, "batches_per_s": round(args.batches / read_s, 1),
        "rows_per_s": round(args.batches * args.batch / read_s),
    }))


if __name__ == "__main__":
    main()
