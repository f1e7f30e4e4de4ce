"""RAG end to end: rag_jax (jitted) vs transformers PyTorch, same CPU and
threads, one run, random weights of DPR-base / BART-base shapes, B=8 questions,
K=5 documents, 128-token contexts, 25-token targets.

(a) loss + gradient step over all trainable weights (question encoder through
    ``doc_scores = q . d`` and the generator), RAG-Sequence and RAG-Token;
(b) RAG-Token beam 4 and RAG-Sequence thorough beam 4 generation
    (``max_length`` 20) vs HF ``generate``; rag_jax's fast decoding for reference.

    python benchmarks/bench_rag.py            # full shapes
    python benchmarks/bench_rag.py --small    # tiny shapes, a quick check
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, print_table, set_threads, timeit  # noqa: E402

THREADS = set_threads()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def build(small: bool, tmp: str):
    from transformers import BartConfig, DPRConfig, RagConfig, RagSequenceForGeneration

    if small:
        q = DPRConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, projection_dim=0)
        g = BartConfig(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
    else:
        q = DPRConfig()  # BERT-base: 12 x 768
        g = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                       decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    q.hidden_dropout_prob = q.attention_probs_dropout_prob = 0.0
    g.dropout = g.attention_dropout = g.activation_dropout = 0.0
    torch.manual_seed(0)
    hf = RagSequenceForGeneration(RagConfig.from_question_encoder_generator_configs(q, g, n_docs=5)).eval()
    hf.save_pretrained(tmp)
    import rag_jax

    return hf, rag_jax.load_rag(tmp)


def inputs(b: int, k: int, l: int, t: int, vq: int, vg: int, d: int):
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, vg, (b, k, l)).astype(np.int64)
    ctx[:, :, 0], ctx[:, :, -1] = 0, 2
    labels = rng.integers(3, vg, (b, t)).astype(np.int64)
    labels[:, 0] = 0
    for i in range(b):  # ragged targets: <s> ... </s> pad
        n = t - (i % 4) * 3
        labels[i, n - 1] = 2
        labels[i, n:] = 1
    return {
        "question_input_ids": rng.integers(1000 % vq, vq, (b, 32)).astype(np.int64),
        "question_attention_mask": np.ones((b, 32), np.int64),
        "doc_embeds": rng.normal(0, 0.05, (b, k, d)).astype(np.float32),
        "context_input_ids": ctx, "context_attention_mask": np.ones_like(ctx), "labels": labels,
    }


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--skip-loss", action="store_true", help="only the generation part (b)")
    args = ap.parse_args()
    b, k, l, t = (8, 5, 128, 25)
    if args.small:
        l = 32
    from rag_jax.rag.model import rag_loss

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        hf, ours = build(args.small, tmp)
        print(f"built models in {time.perf_counter() - t0:.0f}s; {machine()}; torch threads {THREADS}; "
              f"jax devices {jax.devices()}", flush=True)
    cfg = ours.config
    batch = inputs(b, k, l, t, cfg.question_encoder.vocab_size, cfg.generator.vocab_size, cfg.question_encoder.output_dim)
    jbatch = {n: jnp.asarray(v) for n, v in batch.items()}
    rows = []
    if not args.skip_loss:
        from bench_train import matmul_peak

        peak_j, peak_t = matmul_peak()
        rows.append(["f32 2048^3 matmul peak (GFLOP/s)", f"{peak_j:.0f}", f"{peak_t:.0f}", "-",
                     "upper bound for the gradient rows' GFLOP/s"])
        print(rows[-1], flush=True)

    # (a) loss + gradient step -------------------------------------------------
    for variant in () if args.skip_loss else ("sequence", "token"):
        grad_fn = jax.jit(jax.value_and_grad(
            lambda p, bt, v=variant: rag_loss(p, bt, config=cfg, variant=v, epsilon=0.1, reduction="mean")))

        def ours_step():
            loss, g = grad_fn(ours.params, jbatch)
            jax.block_until_ready(g)
            return float(loss)

        from transformers import RagTokenForGeneration

        ref = hf
        if variant == "token":
            ref = RagTokenForGeneration(hf.config)
            ref.load_state_dict(hf.state_dict())
            ref.eval()
        ref.config.label_smoothing = 0.1
        tb = {n: torch.tensor(v) for n, v in batch.items()}

        def hf_step():
            ref.zero_grad(set_to_none=True)
            q = ref.rag.question_encoder(tb["question_input_ids"], attention_mask=tb["question_attention_mask"])[0]
            scores = torch.bmm(q.unsqueeze(1), tb["doc_embeds"].transpose(1, 2)).squeeze(1)
            out = ref(context_input_ids=tb["context_input_ids"].reshape(b * k, l),
                      context_attention_mask=tb["context_attention_mask"].reshape(b * k, l),
                      doc_scores=scores, labels=tb["labels"], reduce_loss=False, n_docs=k)
            loss = out.loss.mean()
            loss.backward()
            return float(loss)

        l_ours, l_hf = ours_step(), hf_step()
        t_ours = timeit(ours_step, warmup=1, reps=args.reps)
        t_hf = timeit(hf_step, warmup=0, reps=args.reps)
        # Both sides do the same arithmetic; XLA counts it. Against the
        # machine's f32 matmul peak this bounds any speed-up at equal precision.
        flops = float(grad_fn.lower(ours.params, jbatch).compile().cost_analysis()["flops"])
        rows.append([f"loss+grad RAG-{variant.capitalize()}", f"{t_ours:.3f}", f"{t_hf:.3f}", ratio(t_hf, t_ours),
                     f"loss {l_ours:.4f} vs {l_hf:.4f}; {flops / 1e9:.0f} GFLOP: "
                     f"{flops / t_ours / 1e9:.0f} vs {flops / t_hf / 1e9:.0f} GFLOP/s"])
        print(rows[-1], flush=True)
        if variant == "token":
            del ref

    # (b) generation -----------------------------------------------------------
    from transformers import RagTokenForGeneration

    tok_model = RagTokenForGeneration(hf.config)
    tok_model.load_state_dict(hf.state_dict())
    tok_model.eval()
    hf.config.label_smoothing = tok_model.config.label_smoothing = 0.0  # HF re-scores with it
    ctx, mask = batch["context_input_ids"], batch["context_attention_mask"]
    with torch.no_grad():
        q = hf.rag.question_encoder(torch.tensor(batch["question_input_ids"]))[0]
        scores = torch.bmm(q.unsqueeze(1), torch.tensor(batch["doc_embeds"]).transpose(1, 2)).squeeze(1).numpy()
    gen_kw = dict(num_beams=4, max_length=args.max_length)

    def hf_gen(model):
        with torch.no_grad():
            return model.generate(context_input_ids=torch.tensor(ctx.reshape(b * k, l)),
                                  context_attention_mask=torch.tensor(mask.reshape(b * k, l)),
                                  doc_scores=torch.tensor(scores), n_docs=k, **gen_kw).numpy()

    for name, model, variant, decoding in (
        ("RAG-Token beam 4", tok_model, "token", "thorough"),
        ("RAG-Sequence thorough beam 4", hf, "sequence", "thorough"),
    ):
        out_ours = ours.generate(ctx, mask, scores, variant=variant, decoding=decoding, **gen_kw)
        t_ours = timeit(lambda: ours.generate(ctx, mask, scores, variant=variant, decoding=decoding, **gen_kw),
                        warmup=0, reps=args.reps)
        t0 = time.perf_counter()
        out_hf = hf_gen(model)
        t_hf = time.perf_counter() - t0
        if args.reps > 1:
            t_hf = min(t_hf, timeit(lambda: hf_gen(model), warmup=0, reps=args.reps - 1))
        same = out_ours.shape == out_hf.shape and bool(np.all(out_ours == out_hf))
        rows.append([name, f"{t_ours:.3f}", f"{t_hf:.3f}", ratio(t_hf, t_ours), f"identical outputs: {same}"])
        print(rows[-1], flush=True)
    ours.generate(ctx, mask, scores, variant="sequence", decoding="fast", **gen_kw)
    t_fast = timeit(lambda: ours.generate(ctx, mask, scores, variant="sequence", decoding="fast", **gen_kw),
                    warmup=0, reps=args.reps)
    rows.append(["RAG-Sequence fast beam 4 (rag_jax only)", f"{t_fast:.3f}", "-", "-", "HF has no fast decoding"])

    shape = "tiny shapes (--small)" if args.small else "DPR-base + BART-base shapes"
    print_table(
        f"RAG, {shape}, B={b}, K={k}, context {l}, target {t}, max_length {args.max_length}; "
        f"{machine()}, {THREADS} threads",
        ["workload", "rag_jax s", "HF torch s", "speed-up", "note"], rows,
    )


if __name__ == "__main__":
    main()
