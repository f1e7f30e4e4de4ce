"""Reader warm-up: a from-scratch BART generator learns to read before RAG.

The paper's generator is pretrained BART; no pretrained BART is installable
here, so a generator trained from scratch must first learn to copy an answer
span out of a passage. It learns that on reading-comprehension pairs
(question, passage that states the answer) from *other* sources than the
ones RAG is then trained and tested on: the demo uses fictional worlds with
other seeds, so no fact of the demo world is seen here and a closed-book
model still cannot know them.

Two stages, both with the contexts RAG builds (``title / text // question``):

1. **short**: the sentence that states the answer with ``short_window``
   neighbours on each side. Measured on the demo world (2-layer, d_model 128,
   8 other worlds): the copy of multi-piece invented names is learned here;
   trained on whole passages from the start, 1000 steps of 32 reached 14%
   teacher-forced exact-sequence accuracy on dev, names 0%.
2. **full**: whole passages, so attention learns to pick the one span that
   answers this question among the passage's other names (47% after 1500
   short + 500 full steps, names 0-28% by relation; the demo runs 1200 short steps).

Fresh names matter: trained on the same few thousand pairs again and again,
the generator memorised which name answers which question instead of copying.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.data.qa_formats import read_jsonl
from rag_jax.data.tokenize import TextTokenizer
from rag_jax.models.bart import BartConfig
from rag_jax.rag import marginals
from rag_jax.rag.inputs import build_context_strings
from rag_jax.rag.model import doc_logits
from rag_jax.retrieval.corpus import read_passages
from rag_jax.train.optim import make_optimizer
from rag_jax.train.state import TrainState
from rag_jax.train.step import make_train_step


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def gold_examples(qa_jsonl: str | os.PathLike, passages: str | os.PathLike, tokenizer: TextTokenizer,
                  max_combined_length: int, max_target_length: int,
                  window: int | None = None) -> dict[str, np.ndarray]:
    """Context ids/mask ``[N, L]`` (title / text // question of the first
    positive passage) and ``<s> answer </s>`` labels ``[N, T]``.

    ``window=w`` keeps only the first sentence that contains the answer and
    ``w`` sentences either side; records whose answer is in no sentence of
    their passage are left out (at least one must remain)."""
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
    titles, texts, questions, answers = [], [], [], []
    for q, a, pid in rows:
        text = by_id[pid].text
        if window is not None:
            sents = _SENTENCE_END.split(text)
            hit = next((i for i, x in enumerate(sents) if a in x), None)
            if hit is None:
                continue
            text = " ".join(sents[max(0, hit - window) : hit + window + 1])
        titles.append([by_id[pid].title])
        texts.append([text])
        questions.append(q)
        answers.append(a)
    if not answers:
        raise ValueError(f"{qa_jsonl}: no answer occurs inside a sentence of its positive passage in {passages}")
    strings = build_context_strings(titles, texts, questions)
    ctx = tokenizer([s[0] for s in strings], max_length=max_combined_length)
    labels = tokenizer(answers, max_length=max_target_length)["input_ids"]
    return {"input_ids": ctx["input_ids"], "attention_mask": ctx["attention_mask"], "labels": labels}


def _examples(sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]], *args: Any, **kw: Any) -> dict[str, np.ndarray]:
    parts = [gold_examples(qa, ps, *args, **kw) for qa, ps in sources]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def warmup_generator(
    generator: dict[str, Any],
    tokenizer: TextTokenizer,
    sources: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    out_dir: str | os.PathLike,
    *,
    steps: int = 500,
    batch_size: int = 32,
    short_steps: int = 0,
    short_batch_size: int = 64,
    short_window: int = 1,
    short_max_length: int = 64,
    lr: float = 1e-3,
    sinusoidal_positions: float = 0.15,
    max_combined_length: int = 192,
    max_target_length: int = 16,
    seed: int = 0,
    verbose: bool = True,
) -> Path:
    """Trains a fresh generator with the ``generator`` BartConfig fields
    (vocabulary and special tokens from ``tokenizer``) on the (QA JSONL,
    passages TSV) ``sources``, ``short_steps`` on answer sentences then
    ``steps`` on whole passages, and writes it to ``out_dir`` as an HF BART
    directory (atomically; an existing complete directory is returned as is)."""
    from rag_jax.generator import Generator, scratch_generator

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    if not sources:
        raise ValueError("reader warm-up: no (qa_jsonl, passages) sources given")
    if steps < 1 or short_steps < 0:
        raise ValueError(f"reader warm-up: need steps >= 1 and short_steps >= 0, got {steps}, {short_steps}")
    cfg, params = scratch_generator(generator, tokenizer, jax.random.PRNGKey(seed), sinusoidal_positions,
                                    dropout=0.0)
    rng = np.random.default_rng(seed)
    if short_steps:
        data = _examples(sources, tokenizer, short_max_length, max_target_length, window=short_window)
        params, loss = _train(cfg, params, data, short_steps, short_batch_size, lr, rng, "short", verbose)
    data = _examples(sources, tokenizer, max_combined_length, max_target_length)
    params, loss = _train(cfg, params, data, steps, batch_size, lr, rng, "full", verbose)
    if not np.isfinite(loss):
        raise FloatingPointError(f"reader warm-up diverged (loss {loss}); nothing written to {out}")
    Generator(cfg, params, tokenizer).save_hf(out)
    return out


def _train(cfg: BartConfig, params: Any, data: dict[str, np.ndarray], steps: int, batch_size: int, lr: float,
           rng: np.random.Generator, stage: str, verbose: bool) -> tuple[Any, float]:
    """One stage: its own AdamW with linear warm-up and decay (the two stages'
    inputs differ in length, so each starts from a fresh optimizer)."""
    tx, _ = make_optimizer(lr, max(1, steps // 10), max(2, steps), schedule="linear", weight_decay=0.01,
                           max_grad_norm=1.0)

    def loss_fn(p: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng  # dropout is off: the warm-up generator is built with dropout 0
        logits = doc_logits(cfg, p, batch["input_ids"][:, None], batch["attention_mask"][:, None], batch["labels"])
        b = batch["labels"].shape[0]
        losses = marginals.rag_nll(logits, jnp.zeros((b, 1), jnp.float32), batch["labels"], "sequence",
                                   pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id)
        return jnp.mean(losses), {}

    # The same pure step and state as RAG training, on one device.
    step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=(0,))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    n = len(data["labels"])
    t0, losses = time.perf_counter(), []
    every = max(1, steps // 10)
    if verbose:
        print(f"[reader warm-up] {stage}: {steps} steps of {batch_size} from {n} pairs, "
              f"contexts of {data['input_ids'].shape[1]} tokens", flush=True)
    for i in range(1, steps + 1):
        idx = rng.integers(0, n, batch_size)
        state, metrics = step(state, {k: v[idx] for k, v in data.items()})
        losses.append(metrics["loss"])
        if verbose and (i % every == 0 or i == steps):
            rate = (time.perf_counter() - t0) / i
            print(f"[reader warm-up] {stage} step {i}/{steps} | loss {float(np.mean(jax.device_get(losses[-every:]))):.3f} "
                  f"| {rate:.2f}s/step | ETA {rate * (steps - i):.0f}s", flush=True)
    return state.params, float(np.mean(jax.device_get(losses[-every:])))
