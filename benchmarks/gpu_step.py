"""Paper-shape RAG-Sequence train step on the local accelerator(s): tokens/s and MFU.

The model of configs/rag_sequence_nq.py with random weights: BERT-base
question encoder + BART-large generator (12+12 layers, d 1024), bf16 compute
over f32 params and AdamW, K=5 documents, question 128 / context 300 / target
25 tokens (HF ``finetune_rag`` pads contexts to 300), batch 8 per device.
Synthetic token ids, no hub access. Data parallel over every local device.

MFU = (the step's FLOPs from XLA's cost analysis of the compiled program) /
step time / (bf16 dense peak of the device x devices). With ``--remat`` other
than none the compiled program also counts the recomputed forward, so the
FLOPs of the same step without remat (cost analysis of its lowering, no
compile) are the model FLOPs and the compiled program's give the hardware
utilisation (HFU).

    python benchmarks/gpu_step.py                    # on a GPU machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_step.py --dry-run          # tiny shapes on CPU: the same code path
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# bf16 dense (no sparsity) tensor-core peaks, TFLOP/s per device, from the
# vendors' datasheets, matched against jax's device_kind (first match wins).
BF16_PEAK_TFLOPS = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (device_kind "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)

PAPER = dict(k=5, lq=128, l=300, t=25, per_device_batch=8)
TINY = dict(k=2, lq=16, l=48, t=8, per_device_batch=2)


def peak_tflops(device_kind: str) -> float | None:
    for name, tflops in BF16_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def models(dry_run: bool, remat: str):
    import jax.numpy as jnp

    from rag_jax.models.bart import BartConfig
    from rag_jax.models.bert import BertConfig

    if dry_run:  # configs/base.py tiny shapes, one layer per stack
        q = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64, dtype=jnp.bfloat16, remat=remat)
        g = BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                       dtype=jnp.bfloat16, remat=remat)
        return q, g
    q = BertConfig(dtype=jnp.bfloat16, remat=remat)  # BERT-base, DPR's question tower
    g = BartConfig(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                   decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, dropout=0.1,
                   dtype=jnp.bfloat16, remat=remat)
    return q, g


def synthetic_batch(b: int, k: int, lq: int, l: int, t: int, vq: int, vg: int, d: int):
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(3, vg, (b, t))
    labels[:, 0], labels[:, -1] = 0, 2
    return {
        "question_input_ids": rng.integers(5, vq, (b, lq)).astype(np.int32),
        "question_attention_mask": np.ones((b, lq), np.int32),
        "question_token_type_ids": np.zeros((b, lq), np.int32),
        "doc_embeds": rng.normal(0, 0.05, (b, k, d)).astype(np.float32),
        "context_input_ids": rng.integers(3, vg, (b, k, l)).astype(np.int32),
        "context_attention_mask": np.ones((b, k, l), np.int32),
        "labels": labels.astype(np.int32),
    }


def flops_of(cost) -> float:
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def cpu_matmul_peak_tflops(n: int = 512, reps: int = 5) -> float:
    """--dry-run's stand-in for a datasheet peak: a jitted f32 n^3 matmul here."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        mm(a, a).block_until_ready()
    return 2.0 * n**3 * reps / (time.perf_counter() - t) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (no accelerator needed)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default 10; 2 with --dry-run)")
    ap.add_argument("--per-device-batch", type=int, default=0, help="examples per device (default 8; 2 dry-run)")
    ap.add_argument("--remat", choices=("none", "minimal", "full"), default="none", help="model.remat")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="bf16 dense peak per device (default: from the device name)")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
        # One CPU device (whatever device count the caller's XLA_FLAGS force)
        # and no LLVM optimisation: a dry run checks the path, not the speed,
        # and LLVM is most of a CPU compile.
        os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from rag_jax.models.bart import Bart
    from rag_jax.models.bert import DprEncoder
    from rag_jax.parallel import rules as R
    from rag_jax.parallel.mesh import make_mesh
    from rag_jax.rag.model import RagConfig, rag_loss
    from rag_jax.rag.settings import RagSettings
    from rag_jax.train.loop import batch_shardings
    from rag_jax.train.optim import make_optimizer
    from rag_jax.train.state import create_state, state_shardings
    from rag_jax.train.step import jit_train_step, make_train_step

    shape = TINY if args.dry_run else PAPER
    devices = jax.devices()
    n_dev = len(devices)
    kind = devices[0].device_kind
    b = (args.per_device_batch or shape["per_device_batch"]) * n_dev
    k, lq, l, t = shape["k"], shape["lq"], shape["l"], shape["t"]
    steps = args.steps or (2 if args.dry_run else 10)
    print(f"jax {jax.__version__}; {n_dev} x {kind} ({devices[0].platform}); global batch {b}, K={k}, "
          f"question {lq}, context {l}, target {t} tokens; remat {args.remat}", flush=True)

    mesh = make_mesh((n_dev, 1, 1))
    rules = R.DEFAULT_RULES
    # HF finetune_rag.sh: lr 3e-5, weight decay 0.001, grad norm 0.1, label smoothing 0.1.
    tx, _ = make_optimizer(3e-5, 0, 10_000, schedule="constant", weight_decay=0.001, max_grad_norm=0.1)

    def step_fn(remat: str):
        qc, gc = models(args.dry_run, remat)
        cfg = RagConfig(qc, gc, RagSettings(variant="sequence", n_docs=k))

        def loss_fn(params, bt, rng):
            return rag_loss(params, bt, config=cfg, variant="sequence", epsilon=0.1, reduction="mean",
                            dropout_rng=rng), {}

        return make_train_step(loss_fn, tx), qc, gc

    step, qc, gc = step_fn(args.remat)
    ids = jnp.ones((1, 4), jnp.int32)

    def init():
        return {"question_encoder": DprEncoder(qc).init(jax.random.PRNGKey(0), ids, ids)["params"],
                "generator": Bart(gc).init(jax.random.PRNGKey(1), ids, ids, ids)["params"]}

    boxed = jax.eval_shape(init)
    shardings = state_shardings(boxed, tx, mesh, rules)
    t0 = time.perf_counter()
    # Initialised straight into their shardings: 515M f32 params never pass through the host.
    params = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings.params)()
    state = create_state(params, tx, jax.random.PRNGKey(2), shardings)
    del params
    host_batch = synthetic_batch(b, k, lq, l, t, qc.vocab_size, gc.vocab_size, qc.output_dim)
    b_shard = batch_shardings(host_batch, mesh, rules)
    batch = {n: jax.device_put(v, b_shard[n]) for n, v in host_batch.items()}
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(f"init {time.perf_counter() - t0:.1f}s: {n_params / 1e6:.1f}M params", flush=True)

    jitted = jit_train_step(step, shardings, b_shard)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    t_compile = time.perf_counter() - t0
    program_flops = flops_of(compiled.cost_analysis())  # per device: the SPMD program each runs
    model_flops = program_flops
    if args.remat != "none":
        plain = jit_train_step(step_fn("none")[0], shardings, b_shard)
        model_flops = flops_of(plain.lower(state, batch).cost_analysis())
    mem = compiled.memory_analysis()
    if mem is not None:
        gib = 1024**3
        print(f"compile {t_compile:.1f}s; per device: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, "
              f"temp {mem.temp_size_in_bytes / gib:.2f} GiB", flush=True)

    state, m = compiled(state, batch)  # warm-up (first-run allocations)
    first_loss = float(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / steps
    loss = float(m["loss"])
    if not (first_loss == first_loss and loss == loss):
        raise SystemExit(f"non-finite loss {first_loss} -> {loss}")

    if args.peak_tflops:
        peak, peak_src = args.peak_tflops, "--peak-tflops"
    elif args.dry_run:
        peak, peak_src = cpu_matmul_peak_tflops(), "measured f32 512^3 matmul (dry run)"
    else:
        peak, peak_src = peak_tflops(kind), f"bf16 dense datasheet peak of {kind}"
    tokens = b * (lq + k * (l + t))  # question + K x (context + target) tokens through the towers
    print(f"step {dt * 1e3:.1f} ms (mean of {steps}); loss {first_loss:.4f} -> {loss:.4f}", flush=True)
    print(f"examples/s: {b / dt:.1f}", flush=True)
    print(f"tokens/s: {tokens / dt:.0f} (question + K x (context + target) tokens, {tokens} per step)", flush=True)
    achieved = model_flops / dt / 1e12  # per device
    if peak:
        print(f"MFU: {100 * achieved / peak:.1f}% ({achieved:.4g} TFLOP/s per device of {peak:.4g}, {peak_src}; "
              f"{model_flops / 1e12:.4g} TFLOP per device per step, XLA cost analysis)", flush=True)
        if args.remat != "none":
            print(f"HFU: {100 * program_flops / dt / 1e12 / peak:.1f}% (recomputed forward included)", flush=True)
    else:
        print(f"MFU: unknown peak for {kind!r} (pass --peak-tflops); {achieved:.4g} TFLOP/s per device", flush=True)


if __name__ == "__main__":
    main()
