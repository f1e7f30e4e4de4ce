"""Greedy decoding throughput of a BART-base-sized generator: rag_jax
(``init_cache`` + ``decode_step`` inside one jitted ``lax.while_loop``) vs
``transformers`` ``generate`` (PyTorch, KV cache), same random weights, same
CPU and threads, one run. Also reports how many generated tokens agree.

    python benchmarks/bench_models_bart.py [--batch 8 --length 128 --new 32 --reps 3]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, set_threads, timeit  # noqa: E402

THREADS = set_threads()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def make_greedy(model, new_tokens: int, start_id: int, eos_id: int):  # noqa: ANN001,ANN201
    """Pure ``(params, ids, mask) -> [B, new_tokens]``; EOS is suppressed so
    every row decodes exactly ``new_tokens`` (as HF's ``min_new_tokens``)."""
    from rag_jax.models.bart import Bart, decode_step, init_cache

    def greedy(params, ids, mask):  # noqa: ANN001,ANN202
        enc = model.apply({"params": params}, ids, mask, method=Bart.encode)
        cache = init_cache(model, params, enc, mask, new_tokens)
        out = jnp.full((ids.shape[0], new_tokens + 1), start_id, jnp.int32)

        def body(state):  # noqa: ANN001,ANN202
            t, out, cache = state
            prev = jax.lax.dynamic_slice_in_dim(out, t, 1, axis=1)
            logits, cache = decode_step(model, params, cache, prev, enc, mask)
            logits = logits.at[:, eos_id].set(-jnp.inf)
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
            return t + 1, jax.lax.dynamic_update_slice_in_dim(out, nxt, t + 1, axis=1), cache

        _, out, _ = jax.lax.while_loop(lambda s: s[0] < new_tokens, body, (0, out, cache))
        return out[:, 1:]

    return greedy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--new", type=int, default=32, help="generated tokens per row")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from transformers import BartConfig as HFBartConfig
    from transformers import BartForConditionalGeneration

    from rag_jax.hf.bart import bart_config_from_hf, import_bart
    from rag_jax.models.bart import Bart

    hf_cfg = HFBartConfig(forced_eos_token_id=None)  # BART-base: 6 + 6 layers, 768, 12 heads, 50265 vocab
    torch.manual_seed(0)
    ref = BartForConditionalGeneration(hf_cfg).eval()
    config = bart_config_from_hf(hf_cfg.to_dict())
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = jax.tree.map(jnp.asarray, import_bart(state, config, "torch model"))

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 50000, (args.batch, args.length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::2, args.length // 2 :] = 0  # ragged: every other row half padding
    ids = np.where(mask == 1, ids, config.pad_token_id).astype(np.int32)

    greedy = jax.jit(make_greedy(Bart(config), args.new, config.decoder_start_token_id, config.eos_token_id))
    ours = np.asarray(greedy(params, ids, mask))
    t_jax = timeit(lambda: greedy(params, ids, mask).block_until_ready(), warmup=1, reps=args.reps)

    ti, tm = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    gen_kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, num_beams=1, do_sample=False, use_cache=True)
    with torch.inference_mode():
        theirs = ref.generate(input_ids=ti, attention_mask=tm, **gen_kw).numpy()[:, 1:]
        t_torch = timeit(lambda: ref.generate(input_ids=ti, attention_mask=tm, **gen_kw), warmup=1, reps=args.reps)

    agree = float(np.mean(ours == theirs)) if ours.shape == theirs.shape else float("nan")
    tokens = args.batch * args.new
    print_table(
        f"Greedy decoding, BART-base random weights, float32, batch {args.batch}, source {args.length} tokens "
        f"(ragged), {args.new} new tokens, {THREADS} threads (torch {torch.__version__}, jax {jax.__version__}; "
        f"{machine()})",
        ["implementation", "ms / batch", "new tok/s", "speed-up", "tokens equal to HF"],
        [
            ["rag_jax while_loop + cache", f"{t_jax * 1e3:.0f}", f"{tokens / t_jax:,.0f}", f"{t_torch / t_jax:.2f}x",
             f"{agree:.1%}"],
            ["transformers generate", f"{t_torch * 1e3:.0f}", f"{tokens / t_torch:,.0f}", "1.00x", "-"],
        ],
    )


if __name__ == "__main__":
    main()
