"""Forward-pass throughput: rag_jax (jitted) vs transformers PyTorch, same CPU
and threads, one run. DPR-base (BERT-base) and BART-base shapes, random
weights, batch 8 x 128 tokens (BART decoder: 8 x 32 target tokens).

    python benchmarks/bench_models.py [--batch 8 --length 128 --target 32 --reps 5]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, set_threads, timeit  # noqa: E402

THREADS = set_threads()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import linen as nn  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def bench_dpr(batch: int, length: int, reps: int) -> list[str]:
    from transformers import DPRConfig, DPRQuestionEncoder

    from rag_jax.hf.bert import dpr_to_hf  # noqa: F401 - import check
    from rag_jax.models.bert import BertConfig, DprEncoder

    config = BertConfig()  # BERT-base: 12 x 768, 12 heads, 3072 ffn, 30522 vocab
    ids = np.random.default_rng(0).integers(1000, 30000, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    model = DprEncoder(config)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids, mask)["params"])
    fwd = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
    t_jax = timeit(lambda: fwd(params, ids, mask).block_until_ready(), reps=reps)

    ref = DPRQuestionEncoder(DPRConfig()).eval()
    ti, tm = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    with torch.inference_mode():
        t_torch = timeit(lambda: ref(ti, tm), reps=reps)
    return _row("DPR-base encoder", batch * length, t_jax, t_torch)


def bench_bart(batch: int, length: int, target: int, reps: int) -> list[str]:
    from transformers import BartConfig as HFBartConfig
    from transformers import BartForConditionalGeneration

    from rag_jax.hf.bart import bart_config_from_hf
    from rag_jax.models.bart import Bart

    hf_cfg = HFBartConfig()  # BART-base shapes: 6 + 6 layers, 768, 12 heads, 3072 ffn, 50265 vocab
    ref = BartForConditionalGeneration(hf_cfg).eval()
    config = bart_config_from_hf(hf_cfg.to_dict())
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 50000, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    dec = rng.integers(1000, 50000, (batch, target)).astype(np.int32)
    model = Bart(config)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids, mask, dec)["params"])
    fwd = jax.jit(lambda p, i, m, d: model.apply({"params": p}, i, m, d))
    t_jax = timeit(lambda: fwd(params, ids, mask, dec).block_until_ready(), reps=reps)
    ti, tm, td = (torch.tensor(x, dtype=torch.long) for x in (ids, mask, dec))
    with torch.inference_mode():
        t_torch = timeit(lambda: ref(input_ids=ti, attention_mask=tm, decoder_input_ids=td).logits, reps=reps)
    return _row("BART-base enc-dec -> logits", batch * (length + target), t_jax, t_torch)


def _row(name: str, tokens: int, t_jax: float, t_torch: float) -> list[str]:
    return [
        name,
        f"{t_jax * 1e3:.0f}",
        f"{t_torch * 1e3:.0f}",
        f"{tokens / t_jax:,.0f}",
        f"{tokens / t_torch:,.0f}",
        f"{t_torch / t_jax:.2f}x",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--target", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=["dpr", "bart"], default=None)
    args = ap.parse_args()
    rows = []
    if args.only in (None, "dpr"):
        rows.append(bench_dpr(args.batch, args.length, args.reps))
    if args.only in (None, "bart"):
        rows.append(bench_bart(args.batch, args.length, args.target, args.reps))
    print_table(
        f"Forward pass, float32, batch {args.batch} x {args.length} tokens, {THREADS} threads "
        f"(torch {torch.__version__}, jax {jax.__version__}; {machine()})",
        ["model", "rag_jax ms", "torch ms", "rag_jax tok/s", "torch tok/s", "speed-up"],
        rows,
    )


if __name__ == "__main__":
    main()
