"""Reader warm-up: a from-scratch BART generator learns to read before RAG.

The paper's generator is pretrained BART; no pretrained BART is installable
here, so a generator trained from scratch must first learn to copy an answer
span out of a passage. Measured on the demo world (2-layer, d_model 128):
with BART's default init it does not learn that in 96k examples; with
``init_std`` 0.1 and sinusoidal position tables it reaches ~40% teacher-forced
exact-sequence accuracy on dev questions (gold passage given) after ~25k. This stage spends those examples on the
cheapest possible input, one gold passage per question (``positive_ids`` of
the QA file, contexts built exactly as RAG builds them), then saves an HF
BART directory that RAG training loads as its pretrained generator.

Gold passages are supervision RAG itself never sees; the warm-up stands in
for pretraining and every run that follows (RAG, frozen retriever,
closed-book) starts from the same warmed-up weights.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from rag_jax.data.qa_formats import read_jsonl
from rag_jax.data.tokenize import TextTokenizer
from rag_jax.models.bart import Bart, BartConfig, with_sinusoidal_positions
from rag_jax.rag import marginals
from rag_jax.rag.inputs import build_context_strings
from rag_jax.rag.model import doc_logits
from rag_jax.retrieval.corpus import read_passages
from rag_jax.train.optim import make_optimizer


def gold_examples(qa_jsonl: str | os.PathLike, passages: str | os.PathLike, tokenizer: TextTokenizer,
                  max_combined_length: int, max_target_length: int) -> dict[str, np.ndarray]:
    """Context ids/mask ``[N, L]`` (title / text // question of the first
    positive passage) and ``<s> answer </s>`` labels ``[N, T]``."""
    rows = []
    for rec in read_jsonl(qa_jsonl):
        if not rec.positive_ids:
            raise ValueError(f"{rec.source}:{rec.line}: the reader warm-up needs 'positive_ids'")
        rows.append((rec.question, rec.answers[0], rec.positive_ids[0]))
    wanted = {pid for _, _, pid in rows}
    by_id = {p.id: p for p in read_passages(passages) if p.id in wanted}
    missing = sorted(wanted - set(by_id))
    if missing:
        raise ValueError(f"{qa_jsonl}: positive ids {missing[:5]} are not in {passages}")
    strings = build_context_strings([[by_id[p].title] for _, _, p in rows], [[by_id[p].text] for _, _, p in rows],
                                    [q for q, _, _ in rows])
    ctx = tokenizer([s[0] for s in strings], max_length=max_combined_length)
    labels = tokenizer([a for _, a, _ in rows], max_length=max_target_length)["input_ids"]
    return {"input_ids": ctx["input_ids"], "attention_mask": ctx["attention_mask"], "labels": labels}


def warmup_generator(
    generator: dict[str, Any],
    tokenizer: TextTokenizer,
    qa_jsonl: str | os.PathLike,
    passages: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 1e-3,
    sinusoidal_positions: float = 0.15,
    max_combined_length: int = 192,
    max_target_length: int = 16,
    seed: int = 0,
    verbose: bool = True,
) -> Path:
    """Trains a fresh generator with the ``generator`` BartConfig fields
    (vocabulary and special tokens from ``tokenizer``) and writes it to
    ``out_dir`` as an HF BART directory (atomically; an existing complete
    directory is returned as is)."""
    from rag_jax.generator import Generator

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    # decoding starts at <s>, as in train/loop.py build_models
    cfg = BartConfig(**{**generator, "vocab_size": tokenizer.vocab_size, "dropout": 0.0},
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.bos_token_id,
                     forced_eos_token_id=tokenizer.eos_token_id)
    data = gold_examples(qa_jsonl, passages, tokenizer, max_combined_length, max_target_length)
    n = len(data["labels"])
    ids = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(Bart(cfg).init(jax.random.PRNGKey(seed), ids, ids, ids)["params"])
    if sinusoidal_positions > 0:
        params = with_sinusoidal_positions(params, sinusoidal_positions)
    tx, _ = make_optimizer(lr, max(1, steps // 10), steps, schedule="linear", weight_decay=0.01, max_grad_norm=1.0)
    opt_state = tx.init(params)

    def loss_fn(p: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logits = doc_logits(cfg, p, batch["input_ids"][:, None], batch["attention_mask"][:, None], batch["labels"])
        b = batch["labels"].shape[0]
        losses = marginals.rag_nll(logits, jnp.zeros((b, 1), jnp.float32), batch["labels"], "sequence",
                                   pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id)
        return jnp.mean(losses)

    @jax.jit
    def step(p: Any, s: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, jax.Array]:
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(seed)
    t0, losses = time.perf_counter(), []
    every = max(1, steps // 10)
    for i in range(1, steps + 1):
        idx = rng.integers(0, n, batch_size)
        params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in data.items()})
        losses.append(loss)
        if verbose and (i % every == 0 or i == steps):
            rate = (time.perf_counter() - t0) / i
            print(f"[reader warm-up] step {i}/{steps} | loss {float(np.mean(jax.device_get(losses[-every:]))):.3f} "
                  f"| {rate:.2f}s/step | ETA {rate * (steps - i):.0f}s", flush=True)
    loss = float(np.mean(jax.device_get(losses[-every:])))
    if not np.isfinite(loss):
        raise FloatingPointError(f"reader warm-up diverged (loss {loss}); nothing written to {out}")
    Generator(cfg, params, tokenizer).save_hf(out)
    return out
