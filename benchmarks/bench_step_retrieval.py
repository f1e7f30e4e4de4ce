"""Train-step time with host retrieval vs retrieval inside the step
(``retrieval.on_device``), side by side on 8 fake CPU devices (issue 15).

Both sides run the training loop's own pieces on the same corpus, index,
models, questions and mesh (batch and index rows split over data x fsdp,
parameters over fsdp and tensor):

* host: ``RagTask.train_batch`` (question encoder jit call, copy to host,
  ScaNN search, context strings tokenized) + the jitted step;
* on device: ``OnDeviceTask.train_batch`` (question tokens only) + the jitted
  step that embeds, searches the sharded vectors and assembles contexts.

Each row is the median wall time of one whole step (batch building + step,
blocking). A synthetic corpus of DPR-shaped passages (100 words and a title)
and random unit document vectors; tokenizers trained on it (the generator's
vocabulary is small, the model's is BART's 50265 at base size). On one CPU
host the fake devices share the cores: the ratio shows the host round trip
removed, not pod-scale speed.

    python benchmarks/bench_step_retrieval.py --size tiny
    python benchmarks/bench_step_retrieval.py --size base --reps 2
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine, print_table, timeit  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

# (global batch, docs, question tokens, context tokens, target tokens, passages, mesh (data, fsdp, tensor))
SIZES = {
    # configs/tiny.py shapes, 2 examples per batch shard.
    "tiny": dict(b=16, k=2, lq=16, l=48, t=8, n=2000, mesh=(1, 8, 1)),
    # DPR-base + BART-base at bench_train.py's B=2, 1 example per batch shard (B=8 over 8 shards and
    # B=4 over 4 shards x tensor 2 went past 16 GB on this 23 GB machine).
    "base": dict(b=2, k=5, lq=32, l=128, t=25, n=20000, mesh=(1, 2, 4)),
}
WORDS = [w for w in "the of and in to a was is for on as by with he at from his an were are which this be first "
         "also has had its city river born new after where founded company school years time later north".split()]


def corpus_file(path: Path, n: int, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            title = " ".join(rnd.choice(WORDS).title() for _ in range(rnd.randint(1, 3)))
            text = " ".join(rnd.choice(WORDS) for _ in range(100))
            f.write(json.dumps({"id": str(i + 1), "title": title, "text": text}) + "\n")
    return path


def setup(size: str, root: Path):
    from tokenizers import BertWordPieceTokenizer

    from rag_jax.data.tokenize import load_tokenizer
    from rag_jax.data.train_tokenizer import train_bart_tokenizer
    from rag_jax.models.bart import BartConfig, init_params
    from rag_jax.models.bert import BertConfig, DprEncoder
    from rag_jax.rag.model import RagConfig
    from rag_jax.retrieval.corpus import build_corpus
    from rag_jax.retrieval.index import build_index
    from rag_jax.retrieval.retriever import Retriever
    from rag_jax.train.setup import Models
    from rag_jax.train.task import RagTask
    from flax import linen as nn

    s = SIZES[size]
    corpus = build_corpus(corpus_file(root / "passages.jsonl", s["n"]), root / "corpus", progress=False)
    sample = [corpus.title(i) + " " + corpus.text(i) for i in range(min(len(corpus), 2000))]
    g_tok = load_tokenizer(train_bart_tokenizer(sample, root / "gtok", 2000), "bart")
    (root / "qtok").mkdir()
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(sample, vocab_size=2000, show_progress=False,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    wp.save_model(str(root / "qtok"))
    q_tok = load_tokenizer(root / "qtok", "bert")
    if size == "tiny":
        q_cfg = BertConfig(vocab_size=q_tok.vocab_size, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        g_cfg = BartConfig(vocab_size=g_tok.vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0)
    else:
        q_cfg = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # BERT-base
        g_cfg = BartConfig(dropout=0.0)  # BART-base shapes, vocab 50265
    g_cfg = g_cfg.replace(pad_token_id=g_tok.pad_token_id, bos_token_id=g_tok.bos_token_id,
                          eos_token_id=g_tok.eos_token_id, decoder_start_token_id=g_tok.bos_token_id)
    vectors = np.random.default_rng(0).normal(size=(len(corpus), q_cfg.output_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_index(vectors, root / "index", kind="scann", corpus=corpus, include_corpus=True)
    ids = np.ones((1, 4), np.int32)
    params = {"question_encoder": nn.meta.unbox(DprEncoder(q_cfg).init(jax.random.PRNGKey(0), ids, ids)["params"]),
              "generator": init_params(g_cfg, jax.random.PRNGKey(1))}
    task = RagTask(config=RagConfig(q_cfg, g_cfg), question_tokenizer=q_tok, generator_tokenizer=g_tok,
                   retriever=Retriever(index), n_docs=s["k"], max_question_length=s["lq"],
                   max_combined_length=s["l"], max_target_length=s["t"])
    questions = [" ".join(random.Random(i).choice(WORDS) for _ in range(9)) + "?" for i in range(s["b"])]
    answers = [random.Random(-i).choice(WORDS) for i in range(s["b"])]
    return Models(q_cfg, g_cfg, params, q_tok, g_tok), task, questions, answers


def run(size: str, reps: int) -> list[list[str]]:
    from rag_jax.parallel import rules as R
    from rag_jax.parallel.host_arrays import to_global
    from rag_jax.parallel.mesh import make_mesh
    from rag_jax.retrieval.on_device import bytes_per_device, shard_count
    from rag_jax.train.loop import batch_shardings
    from rag_jax.train.on_device_task import OnDeviceTask, batch_axes, open_device_index
    from rag_jax.train.optim import make_optimizer
    from rag_jax.train.setup import boxed_params
    from rag_jax.train.state import create_state, state_shardings
    from rag_jax.train.step import jit_train_step, make_train_step

    s = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        models, task, questions, answers = setup(size, Path(tmp))
        # fsdp: parameters and Adam moments split (replicated on 8 fake devices, base needs ~24 GB).
        mesh = make_mesh(s["mesh"])
        rules = R.DEFAULT_RULES
        axes = batch_axes(rules)
        tx, _ = make_optimizer(3e-5, 0, 1000, weight_decay=0.001, max_grad_norm=0.1)
        shardings = state_shardings(boxed_params(models), tx, mesh, rules)
        t1 = time.perf_counter()
        index = open_device_index(task, mesh, axes, progress=False)
        table_s = time.perf_counter() - t1
        od = OnDeviceTask(task, mesh, axes, index)
        print(f"[{size}] setup {t1 - t0:.1f} s, token table + placement {table_s:.1f} s; "
              f"on-device index {bytes_per_device(index.count, index.vectors.shape[1], index.tokens.shape[1], shard_count(mesh, axes)) / 2**20:.1f} MiB/device",
              flush=True)
        rows = []
        for name in ("host ScaNN", "on device"):
            state = create_state(models.params, tx, jax.random.PRNGKey(2), shardings)
            if name == "host ScaNN":
                def make_batch(st):
                    return task.train_batch(st.params["question_encoder"], questions, answers)
                loss_fn, resident, res_sh = task.loss_fn, (), None
            else:
                def make_batch(st):
                    return od.train_batch(questions, answers)
                loss_fn, resident, res_sh = od.loss_fn, (index.arrays(),), index.shardings()
            host = make_batch(state)
            bsh = batch_shardings(host, mesh, rules, s["b"])
            step = jit_train_step(make_train_step(loss_fn, tx), shardings, bsh, res_sh)
            box = {"state": state}
            t2 = time.perf_counter()
            box["state"], m = step(box["state"], to_global(host, bsh, s["b"]), *resident)
            jax.block_until_ready(m["loss"])
            compile_s = time.perf_counter() - t2

            def one() -> None:
                b = make_batch(box["state"])
                box["state"], m = step(box["state"], to_global(b, bsh, s["b"]), *resident)
                jax.block_until_ready(m["loss"])

            def prep() -> None:
                make_batch(box["state"])

            total = timeit(one, warmup=1, reps=reps)
            host_s = timeit(prep, warmup=0, reps=reps)
            rows.append([size, name, "x".join(map(str, s["mesh"])), f"{s['b']}x{s['k']}x{s['l']}", f"{len(task.retriever.index.corpus)}",
                         f"{compile_s:.1f}", f"{host_s * 1e3:.1f}", f"{total:.3f}", f"{float(m['loss']):.4f}"])
            print(rows[-1], flush=True)
        base = float(rows[0][7])
        for r in rows:
            r.append(f"{base / float(r[7]):.2f}x")
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=[*SIZES, "both"], default="tiny")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    sizes = list(SIZES) if args.size == "both" else [args.size]
    rows = [r for size in sizes for r in run(size, args.reps)]
    print(f"\n{machine()}; jax {jax.__version__}, {jax.device_count()} fake CPU devices; load avg "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print_table("train step with host vs on-device retrieval (median wall s per step, batch building included)",
                ["size", "retrieval", "mesh", "B x K x L", "passages", "compile s", "host prep ms", "step s", "loss",
                 "speed vs host"], rows)


if __name__ == "__main__":
    main()
