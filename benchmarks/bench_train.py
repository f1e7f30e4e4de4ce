"""Training-step benchmark (issue 5): rag_jax vs HF PyTorch, MFU, paper-scale AOT.

1. Throughput of one full RAG-Sequence train step (question encoder forward,
   ``doc_scores = q . d``, BART over K documents, marginal NLL, backward,
   AdamW update) of rag_jax (``make_train_step`` + ``make_optimizer``, jitted)
   vs ``transformers.RagSequenceForGeneration`` + ``torch.optim.AdamW`` on the
   same CPU, threads, weights and batch (HF ``finetune_rag`` recipe: scores
   from a question-encoder forward so gradients reach it).
2. Model FLOPs utilisation of the rag_jax step: XLA's FLOP count of the
   compiled step (``cost_analysis``) over step time, against this CPU's
   measured f32 matmul peak; ``6 N tokens`` as a cross-check.
3. (``--aot``) ahead-of-time compile of the paper-scale config
   (configs/rag_sequence_nq.py: BERT-base + BART-large, global batch 64, K=5,
   context 300, target 25) for 8 (or ``--devices``) fake CPU devices, each
   mesh shape and ``model.remat`` mode given, with per-device memory from
   ``memory_analysis()``. Abstract shapes only: no weights are ever allocated.

    python benchmarks/bench_train.py --size tiny
    python benchmarks/bench_train.py --size base            # DPR-base + BART-base shapes
    python benchmarks/bench_train.py --aot                  # 8 fake devices, in a subprocess
    python benchmarks/bench_train.py --aot --remat none --remat minimal --remat full --mesh 8,1,1
    python benchmarks/bench_train.py --aot --devices 64 --mesh 8,8,1 --remat full
    python benchmarks/bench_train.py --size base --with-aot # all three tables in one run
    python benchmarks/bench_train.py --size base --real-lengths  # DPR-shaped inputs, each side's own padding
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# The AOT child needs 8 (``--devices``) host devices, set before jax is
# imported; the throughput part must see the one real CPU device, so only the
# child sets it.
AOT_DEVICES = int(sys.argv[sys.argv.index("--devices") + 1]) if "--devices" in sys.argv else 8
if "--aot-child" in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={AOT_DEVICES}").strip()

from common import machine, print_table, set_threads, timeit  # noqa: E402

THREADS = set_threads()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GIB = 1024**3

# (B, K, question tokens, context tokens, target tokens)
SIZES = {
    # configs/tiny.py: batch 2, n_docs 2, source 16, combined 48, target 8.
    "tiny": dict(b=2, k=2, lq=16, l=48, t=8),
    "base": dict(b=2, k=5, lq=32, l=128, t=25),
}

LR, WD, CLIP, EPS_LS = 3e-5, 0.001, 0.1, 0.1  # HF finetune_rag.sh


def load_avg() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ============================================================================
# Models and data
# ============================================================================


def hf_configs(size: str):
    from transformers import BartConfig, DPRConfig

    if size == "tiny":
        q = DPRConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, projection_dim=0)
        g = BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                       max_position_embeddings=128)
    else:
        q = DPRConfig(projection_dim=0)  # BERT-base 12 x 768
        g = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                       decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    # No dropout on either side: the two programs then compute the same loss,
    # which the table prints as a check that both do the same work.
    q.hidden_dropout_prob = q.attention_probs_dropout_prob = 0.0
    g.dropout = g.attention_dropout = g.activation_dropout = 0.0
    return q, g


def build_models(size: str, k: int):
    """HF model with random weights, and rag_jax loaded from its save_pretrained copy."""
    import torch
    from transformers import RagConfig, RagSequenceForGeneration

    import rag_jax

    q, g = hf_configs(size)
    torch.manual_seed(0)
    hf = RagSequenceForGeneration(RagConfig.from_question_encoder_generator_configs(q, g, n_docs=k))
    hf.config.label_smoothing = EPS_LS
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = rag_jax.load_rag(tmp)
    return hf, ours


def make_batch(b: int, k: int, lq: int, l: int, t: int, vq: int, vg: int, d: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    qids = rng.integers(5, vq, (b, lq))
    qids[:, 0] = 101 % vq
    qmask = np.ones((b, lq), np.int64)
    qmask[b // 2:, lq * 3 // 4:] = 0  # some padded questions
    ctx = rng.integers(3, vg, (b, k, l))
    ctx[:, :, 0], ctx[:, :, -1] = 0, 2
    labels = rng.integers(3, vg, (b, t))
    labels[:, 0] = 0
    for i in range(b):  # ragged answers: <s> ... </s> pad
        n = max(2, t - (i % 3) * (t // 4))
        labels[i, n - 1] = 2
        labels[i, n:] = 1
    return {
        "question_input_ids": qids.astype(np.int64),
        "question_attention_mask": qmask,
        "question_token_type_ids": np.zeros((b, lq), np.int64),
        "doc_embeds": rng.normal(0, 0.05, (b, k, d)).astype(np.float32),
        "context_input_ids": ctx.astype(np.int64),
        "context_attention_mask": np.ones((b, k, l), np.int64),
        "labels": labels.astype(np.int64),
    }


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def six_n_tokens(params, b: int, k: int, lq: int, l: int, t: int) -> float:
    """6 x (matmul params) x (tokens through them): question encoder on B*Lq,
    BART encoder layers on B*K*L, decoder layers and the tied LM head on B*K*T.
    Embedding lookups and attention score FLOPs are left out."""
    def layer_params(tree, prefix: str) -> int:
        return count_params({n: v for n, v in tree.items() if n.startswith(prefix)})

    qe = params["question_encoder"]
    qe_n = count_params(qe) - count_params(jax.tree_util.tree_map_with_path(
        lambda p, x: x if "embedding" in jax.tree_util.keystr(p) else np.zeros(0), qe))
    gen = params["generator"]
    enc_n, dec_n = layer_params(gen, "encoder_layers"), layer_params(gen, "decoder_layers")
    head_n = int(np.prod(gen["shared"]["embedding"].shape))
    return 6.0 * (qe_n * b * lq + enc_n * b * k * l + (dec_n + head_n) * b * k * t)


def step_flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


# ============================================================================
# 1 + 2: throughput and MFU
# ============================================================================


def matmul_peak(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """GFLOP/s of a jitted f32 n^3 matmul (XLA) and of torch.mm, same threads."""
    import torch

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    bm = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    t_j = timeit(lambda: mm(a, bm).block_until_ready(), warmup=2, reps=reps)
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    t_t = timeit(lambda: torch.mm(ta, tb), warmup=2, reps=reps)
    flops = 2.0 * n**3
    return flops / t_j / 1e9, flops / t_t / 1e9


def hf_param_groups(model):
    # HF finetune_rag: no weight decay on biases and LayerNorm weights.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if ("bias" in name or "LayerNorm.weight" in name or "layer_norm" in name) else decay).append(p)
    return [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]


def make_hf_step(hf, batch: dict[str, np.ndarray]):
    """One HF train step (as finetune_rag: question encoder, doc_scores from the
    given document vectors, RAG loss, clip, torch AdamW) on ``batch`` as padded."""
    import torch

    hf.train()
    opt = torch.optim.AdamW(hf_param_groups(hf), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    tb = {n: torch.tensor(v) for n, v in batch.items()}
    b, k, lc = batch["context_input_ids"].shape

    def hf_step() -> float:
        opt.zero_grad(set_to_none=True)
        q = hf.rag.question_encoder(tb["question_input_ids"], attention_mask=tb["question_attention_mask"],
                                    token_type_ids=tb["question_token_type_ids"])[0]
        scores = torch.bmm(q.unsqueeze(1), tb["doc_embeds"].transpose(1, 2)).squeeze(1)
        out = hf(context_input_ids=tb["context_input_ids"].reshape(b * k, lc),
                 context_attention_mask=tb["context_attention_mask"].reshape(b * k, lc),
                 doc_scores=scores, labels=tb["labels"], reduce_loss=False, n_docs=k, use_cache=False)
        loss = out.loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), CLIP)
        opt.step()
        return float(loss.detach())

    return hf_step


def run_throughput(args) -> None:
    import torch

    from rag_jax.rag.model import rag_loss
    from rag_jax.train.optim import make_optimizer
    from rag_jax.train.state import TrainState
    from rag_jax.train.step import make_train_step

    s = SIZES[args.size]
    b, k, lq, l, t = (args.batch or s["b"]), s["k"], s["lq"], s["l"], s["t"]
    reps = args.reps or (5 if args.size == "tiny" else 2)
    print(f"{machine()}; threads {THREADS}; jax devices {jax.devices()}; {load_avg()}", flush=True)

    t0 = time.perf_counter()
    peak_jax, peak_torch = matmul_peak(reps=3 if args.size == "base" else 5)
    print(f"matmul peak: XLA {peak_jax:.1f} GFLOP/s, torch {peak_torch:.1f} GFLOP/s "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)

    t0 = time.perf_counter()
    hf, ours = build_models(args.size, k)
    cfg = ours.config
    print(f"built models in {time.perf_counter() - t0:.1f}s: rag_jax {count_params(ours.params) / 1e6:.1f}M params, "
          f"HF {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M", flush=True)
    batch = make_batch(b, k, lq, l, t, cfg.question_encoder.vocab_size, cfg.generator.vocab_size,
                       cfg.question_encoder.output_dim)

    # -- rag_jax ---------------------------------------------------------------
    tx, _ = make_optimizer(LR, 0, 10_000, schedule="constant", weight_decay=WD, max_grad_norm=CLIP)

    def loss_fn(params, bt, rng):
        return rag_loss(params, bt, config=cfg, variant="sequence", epsilon=EPS_LS, reduction="mean",
                        dropout_rng=rng), {}

    step = make_train_step(loss_fn, tx)
    jbatch = {n: jnp.asarray(v) for n, v in batch.items()}
    params = ours.params
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, jbatch).compile()
    t_compile = time.perf_counter() - t0
    flops = step_flops(compiled)
    flops_6n = six_n_tokens(params, b, k, lq, l, t)
    holder = {"state": state}
    ours.params = None  # the first step donates these buffers

    def jax_step() -> float:
        holder["state"], m = compiled(holder["state"], jbatch)
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"])

    loss_ours = jax_step()
    t_ours = timeit(jax_step, warmup=1, reps=reps)
    print(f"rag_jax: compile {t_compile:.1f}s, step {t_ours:.3f}s, first loss {loss_ours:.4f}; {load_avg()}", flush=True)

    # -- HF PyTorch ------------------------------------------------------------
    hf_step = make_hf_step(hf, batch)
    loss_hf = hf_step()
    t_hf = timeit(hf_step, warmup=1 if args.size == "tiny" else 0, reps=reps)
    print(f"HF: step {t_hf:.3f}s, first loss {loss_hf:.4f}; {load_avg()}", flush=True)
    # On a shared, oversubscribed machine torch's intra-op thread pool can cost
    # more than tiny ops gain from it; one thread shows that overhead apart.
    t_hf1 = None
    if THREADS > 1 and (args.size == "tiny" or args.hf_single_thread):
        torch.set_num_threads(1)
        t_hf1 = timeit(hf_step, warmup=1 if args.size == "tiny" else 0, reps=reps)
        torch.set_num_threads(THREADS)
        print(f"HF 1 thread: step {t_hf1:.3f}s; {load_avg()}", flush=True)

    shape = ("configs/tiny.py shapes" if args.size == "tiny"
             else "DPR/BERT-base question encoder + BART-base generator")
    print_table(
        f"Train step, RAG-Sequence, {shape}: B={b}, K={k}, question {lq}, context {l}, target {t} tokens, "
        f"AdamW + clip {CLIP}, label smoothing {EPS_LS}, f32; {machine()}, {THREADS} threads, {load_avg()}; "
        f"median of {reps}",
        ["implementation", "s/step", "steps/s", "examples/s", "first-step loss", "rag_jax speed-up"],
        [["rag_jax (jit, optax)", f"{t_ours:.4f}", f"{1 / t_ours:.2f}", f"{b / t_ours:.2f}", f"{loss_ours:.5f}",
          f"{t_hf / t_ours:.2f}x"],
         ["HF RagSequenceForGeneration (torch)", f"{t_hf:.4f}", f"{1 / t_hf:.2f}", f"{b / t_hf:.2f}",
          f"{loss_hf:.5f}", "1.00x"]]
        + ([["HF torch, torch.set_num_threads(1)", f"{t_hf1:.4f}", f"{1 / t_hf1:.2f}", f"{b / t_hf1:.2f}", "-",
             f"{t_hf1 / t_ours:.2f}x"]] if t_hf1 else []),
    )
    print_table(
        f"Model FLOPs utilisation ({args.size}); peak = jitted f32 2048^3 matmul: XLA {peak_jax:.1f} GFLOP/s "
        f"(torch.mm {peak_torch:.1f} GFLOP/s); rag_jax compile {t_compile:.1f}s",
        ["implementation", "FLOPs/step (XLA cost_analysis)", "6*N*tokens", "achieved GFLOP/s", "MFU"],
        [["rag_jax", f"{flops / 1e9:.2f} G", f"{flops_6n / 1e9:.2f} G", f"{flops / t_ours / 1e9:.1f}",
          f"{100 * flops / t_ours / 1e9 / peak_jax:.2f}%"],
         ["HF torch (same FLOP count)", "-", "-", f"{flops / t_hf / 1e9:.2f}",
          f"{100 * flops / t_hf / 1e9 / peak_jax:.2f}%"]],
    )


# ============================================================================
# --real-lengths: DPR-shaped passages and NQ-length questions, each side padded its own way
# ============================================================================

# Token counts per word (GPT-2/BART BPE and BERT WordPiece on English prose are
# about 1.3 tokens a word); drawn per word so passages differ in length.
TOKENS_PER_WORD = ((1, 0.75), (2, 0.18), (3, 0.07))
MAX_QUESTION, MAX_COMBINED, MAX_TARGET = 128, 300, 25  # configs/rag_sequence_nq.py, HF finetune_rag


def _words_to_tokens(rng: np.random.Generator, words: int) -> int:
    counts, probs = zip(*TOKENS_PER_WORD)
    return int(rng.choice(counts, size=words, p=probs).sum())


def real_length_examples(b: int, k: int, vq: int, vg: int, d: int, seed: int = 0) -> dict[str, np.ndarray]:
    """B examples with K contexts each, padded to HF's maxima (questions 128,
    contexts 300, targets 25). Contexts are ``<s> title / passage // question
    </s>`` with a 100-word passage and a 1-6-word title, questions 6-13 words
    (NQ averages about 9), answers 1-4 words; token counts from
    ``TOKENS_PER_WORD``. Token ids are random: lengths are what is measured."""
    rng = np.random.default_rng(seed)
    q_len = [min(MAX_QUESTION, 2 + _words_to_tokens(rng, int(rng.integers(6, 14)))) for _ in range(b)]
    qids = np.zeros((b, MAX_QUESTION), np.int64)
    qmask = np.zeros_like(qids)
    ctx = np.ones((b, k, MAX_COMBINED), np.int64)  # BART <pad> = 1
    cmask = np.zeros_like(ctx)
    labels = np.ones((b, MAX_TARGET), np.int64)
    for i in range(b):
        qids[i, : q_len[i]] = rng.integers(5, vq, q_len[i])
        qids[i, 0], qids[i, q_len[i] - 1] = 101 % vq, 102 % vq
        qmask[i, : q_len[i]] = 1
        question = _words_to_tokens(rng, q_len[i] - 2)  # the same question in BART's tokens
        for j in range(k):
            n = min(MAX_COMBINED, 1 + _words_to_tokens(rng, int(rng.integers(1, 7))) + 1
                    + _words_to_tokens(rng, 100) + 1 + question + 1)
            ctx[i, j, :n] = rng.integers(3, vg, n)
            ctx[i, j, 0], ctx[i, j, n - 1] = 0, 2
            cmask[i, j, :n] = 1
        t = min(MAX_TARGET, 2 + _words_to_tokens(rng, int(rng.integers(1, 5))))
        labels[i, :t] = rng.integers(3, vg, t)
        labels[i, 0], labels[i, t - 1] = 0, 2
    return {"question_input_ids": qids, "question_attention_mask": qmask,
            "question_token_type_ids": np.zeros_like(qids), "doc_embeds": rng.normal(0, 0.05, (b, k, d)).astype(np.float32),
            "context_input_ids": ctx, "context_attention_mask": cmask, "labels": labels}


def hf_finetune_rag_padding(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What HF ``finetune_rag`` feeds: its collate ``trim_batch`` cuts questions
    and targets to the batch's longest, while the retriever's contexts stay
    padded to ``max_combined_length`` (``padding="max_length"``)."""
    q = int(batch["question_attention_mask"].any(0).nonzero()[0].max()) + 1
    t = int((batch["labels"] != 1).any(0).nonzero()[0].max()) + 1
    out = dict(batch)
    for key in ("question_input_ids", "question_attention_mask", "question_token_type_ids"):
        out[key] = batch[key][:, :q]
    out["labels"] = batch["labels"][:, :t]
    return out


def run_real_lengths(args) -> None:
    """rag_jax with its bucketed padding (data/padding.py, base config's
    buckets) vs HF with finetune_rag's, on the same examples, one run."""
    from configs.base import get_config
    from rag_jax.data.padding import trim_to_buckets
    from rag_jax.rag.model import rag_loss
    from rag_jax.train.optim import make_optimizer
    from rag_jax.train.setup import length_buckets
    from rag_jax.train.state import TrainState
    from rag_jax.train.step import make_train_step

    if args.size != "base":
        raise SystemExit("--real-lengths needs --size base (the tiny models have 64/128 positions, not 300)")
    b, k = (args.batch or SIZES[args.size]["b"]), SIZES[args.size]["k"]
    reps = args.reps or 2
    print(f"{machine()}; threads {THREADS}; {load_avg()}", flush=True)
    peak_jax, peak_torch = matmul_peak(reps=3)
    print(f"matmul peak: XLA {peak_jax:.1f} GFLOP/s, torch {peak_torch:.1f} GFLOP/s", flush=True)
    hf, ours = build_models(args.size, k)
    cfg = ours.config
    full = real_length_examples(b, k, cfg.question_encoder.vocab_size, cfg.generator.vocab_size,
                                cfg.question_encoder.output_dim)
    data = get_config().data
    data.max_source_length, data.max_combined_length, data.max_target_length = MAX_QUESTION, MAX_COMBINED, MAX_TARGET
    mine = trim_to_buckets(full, length_buckets(data), pad_token_id=1)
    theirs = hf_finetune_rag_padding(full)
    lens = full["context_attention_mask"].sum(-1)
    shape = lambda x: (f"question {x['question_input_ids'].shape[1]}, context {x['context_input_ids'].shape[2]}, "
                       f"target {x['labels'].shape[1]}")
    print(f"contexts {lens.min()}-{lens.max()} tokens (mean {lens.mean():.0f}); rag_jax pads to {shape(mine)}; "
          f"HF to {shape(theirs)}", flush=True)

    tx, _ = make_optimizer(LR, 0, 10_000, schedule="constant", weight_decay=WD, max_grad_norm=CLIP)

    def loss_fn(params, bt, rng):
        return rag_loss(params, bt, config=cfg, variant="sequence", epsilon=EPS_LS, reduction="mean",
                        dropout_rng=rng), {}

    step = make_train_step(loss_fn, tx)
    jbatch = {n: jnp.asarray(v) for n, v in mine.items()}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=ours.params, opt_state=tx.init(ours.params),
                       rng=jax.random.PRNGKey(0))
    jitted = jax.jit(step, donate_argnums=(0,))
    # The FLOPs HF's padded shapes cost, from the same program lowered (not compiled) at them.
    flops_hf = float(jitted.lower(state, {n: jnp.asarray(v) for n, v in theirs.items()}).cost_analysis()["flops"])
    t0 = time.perf_counter()
    compiled = jitted.lower(state, jbatch).compile()
    t_compile = time.perf_counter() - t0
    flops = step_flops(compiled)
    holder = {"state": state}
    ours.params = None  # donated by the first step

    def jax_step() -> float:
        holder["state"], m = compiled(holder["state"], jbatch)
        jax.block_until_ready((holder["state"], m))
        return float(m["loss"])

    loss_ours = jax_step()
    t_ours = timeit(jax_step, warmup=1, reps=reps)
    print(f"rag_jax: compile {t_compile:.1f}s, step {t_ours:.3f}s, first loss {loss_ours:.5f}; {load_avg()}", flush=True)

    hf_step = make_hf_step(hf, theirs)
    loss_hf = hf_step()
    t_hf = timeit(hf_step, warmup=1 if args.size == "tiny" else 0, reps=reps)
    print(f"HF: step {t_hf:.3f}s, first loss {loss_hf:.5f}; {load_avg()}", flush=True)
    print_table(
        f"Train step on real-length inputs, RAG-Sequence, {args.size} shapes, B={b}, K={k}: contexts "
        f"{lens.min()}-{lens.max()} tokens (100-word passage + title + ~9-word question), each side padded its own "
        f"way; AdamW + clip, f32; {machine()}, {THREADS} threads, {load_avg()}; median of {reps}; matmul peak "
        f"XLA {peak_jax:.1f} / torch.mm {peak_torch:.1f} GFLOP/s",
        ["implementation", "padded to", "s/step", "examples/s", "first-step loss", "GFLOP/step", "GFLOP/s",
         "of XLA peak", "useful GFLOP/s", "speed-up"],
        [["rag_jax (data.padding=bucket)", shape(mine), f"{t_ours:.3f}", f"{b / t_ours:.3f}", f"{loss_ours:.5f}",
          f"{flops / 1e9:.1f}", f"{flops / t_ours / 1e9:.1f}", f"{100 * flops / t_ours / 1e9 / peak_jax:.0f}%",
          f"{flops / t_ours / 1e9:.1f}", f"{t_hf / t_ours:.2f}x"],
         ["HF finetune_rag padding (torch)", shape(theirs), f"{t_hf:.3f}", f"{b / t_hf:.3f}", f"{loss_hf:.5f}",
          f"{flops_hf / 1e9:.1f}", f"{flops_hf / t_hf / 1e9:.1f}", f"{100 * flops_hf / t_hf / 1e9 / peak_jax:.0f}%",
          f"{flops / t_hf / 1e9:.1f}", "1.00x"]],
    )
    print("GFLOP/step: XLA cost_analysis of the step at each side's padded shapes; useful GFLOP/s: rag_jax's "
          "(bucketed) FLOPs over each side's step time.")


# ============================================================================
# 3: ahead-of-time compile of the paper-scale config
# ============================================================================


def paper_models(layers: int | None, dtype, remat: str = "none"):
    from rag_jax.models.bart import BartConfig
    from rag_jax.models.bert import BertConfig

    q = BertConfig(dtype=dtype, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                   remat=remat)  # BERT-base 768
    n = layers or 12
    g = BartConfig(vocab_size=50265, d_model=1024, encoder_layers=n, decoder_layers=n, encoder_attention_heads=16,
                   decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, dropout=0.1,
                   scale_embedding=False, dtype=dtype, remat=remat)
    return q, g


def run_aot_child(args) -> None:
    from flax import linen as nn

    from rag_jax.rag.settings import RagSettings
    from rag_jax.models.bart import Bart
    from rag_jax.models.bert import DprEncoder
    from rag_jax.parallel import rules as R
    from rag_jax.parallel.mesh import make_mesh
    from rag_jax.rag.model import RagConfig, rag_loss
    from rag_jax.config import load_config_module
    from rag_jax.train.loop import batch_shardings
    from rag_jax.train.optim import optimizer_from_config
    from rag_jax.train.state import TrainState, state_shardings
    from rag_jax.train.step import jit_train_step, make_train_step

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    config = load_config_module(os.path.join(root, "configs", "rag_sequence_nq.py")).get_config()
    n_dev = len(jax.devices())
    if n_dev != AOT_DEVICES:
        raise SystemExit(f"bench_train.py --aot: expected {AOT_DEVICES} fake CPU devices, got {n_dev}")
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[config.model.dtype]
    # The paper's global batch (HF finetune_rag: 8 per GPU on 8 GPUs) on every
    # mesh, so rows of different device counts train the same thing.
    b = config.train.per_device_batch_size * 8
    k, lq, l, t = (config.retrieval.n_docs, config.data.max_source_length, config.data.max_combined_length,
                   config.data.max_target_length)

    # The param tree is the same in every remat mode (tests/test_remat.py).
    qc, gc = paper_models(args.layers, dtype)
    ids = jnp.ones((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda: {
        "question_encoder": DprEncoder(qc).init(jax.random.PRNGKey(0), ids, ids)["params"],
        "generator": Bart(gc).init(jax.random.PRNGKey(0), ids, ids, ids)["params"],
    })
    abstract_params = nn.meta.unbox(boxed)
    n_params = count_params(abstract_params)
    tx, _ = optimizer_from_config(config.train)
    rules = R.rules_from_config(config.mesh.logical_axis_rules)

    def train_step(remat: str):
        q_cfg, g_cfg = paper_models(args.layers, dtype, remat)
        rag_cfg = RagConfig(q_cfg, g_cfg, RagSettings(variant="sequence", n_docs=k))

        def loss_fn(params, bt, rng):
            return rag_loss(params, bt, config=rag_cfg, variant="sequence", epsilon=config.train.label_smoothing,
                            reduction="mean", dropout_rng=rng), {}

        return make_train_step(loss_fn, tx, config.train.grad_accum_steps)

    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
        opt_state=jax.eval_shape(tx.init, abstract_params), rng=jax.eval_shape(lambda: jax.random.PRNGKey(0)),
    )
    i64 = jnp.int32  # the loader's ids become int32 on device (x64 is off)
    abstract_batch = {
        "question_input_ids": jax.ShapeDtypeStruct((b, lq), i64),
        "question_attention_mask": jax.ShapeDtypeStruct((b, lq), i64),
        "question_token_type_ids": jax.ShapeDtypeStruct((b, lq), i64),
        "doc_embeds": jax.ShapeDtypeStruct((b, k, qc.output_dim), jnp.float32),
        "context_input_ids": jax.ShapeDtypeStruct((b, k, l), i64),
        "context_attention_mask": jax.ShapeDtypeStruct((b, k, l), i64),
        "labels": jax.ShapeDtypeStruct((b, t), i64),
    }
    state_bytes = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))
    print(f"paper-scale: {n_params / 1e6:.1f}M params, train state {state_bytes / GIB:.2f} GiB unsharded; "
          f"global batch {b}; {n_dev} devices; {machine()}; {load_avg()}", flush=True)

    rows = []
    for remat in args.remat:
        step = train_step(remat)
        for shape in args.meshes:
            mesh = make_mesh(shape)
            if b % (mesh.shape["data"] * mesh.shape["fsdp"]):
                raise SystemExit(f"mesh {shape}: global batch {b} does not split over data x fsdp")
            shardings = state_shardings(boxed, tx, mesh, rules)
            b_shard = batch_shardings(abstract_batch, mesh, rules)
            jitted = jit_train_step(step, shardings, b_shard)
            t0 = time.perf_counter()
            lowered = jitted.lower(abstract_state, abstract_batch)
            t_lower = time.perf_counter() - t0
            t0 = time.perf_counter()
            compiled = lowered.compile()
            t_compile = time.perf_counter() - t0
            ma = compiled.memory_analysis()
            arg, out, tmp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
            alias, code = ma.alias_size_in_bytes, ma.generated_code_size_in_bytes
            # Donated state aliases the output, so the live peak is about arg + out - alias + temp.
            peak = arg + out - alias + tmp
            per_dev_batch = b // (mesh.shape["data"] * mesh.shape["fsdp"])
            rows.append([str(tuple(mesh.devices.shape)), remat, str(per_dev_batch), f"{arg / GIB:.2f}",
                         f"{out / GIB:.2f}", f"{alias / GIB:.2f}", f"{tmp / GIB:.2f}", f"{code / 2**20:.1f} MiB",
                         f"{peak / GIB:.2f}", f"{step_flops(compiled) / 1e12:.2f}", f"{t_lower:.0f}+{t_compile:.0f}"])
            print(rows[-1], f"{load_avg()}", flush=True)
    lay = ("BART-large 12+12 layers" if not args.layers or args.layers == 12
           else f"BART-large shapes with ONLY {args.layers}+{args.layers} layers (fallback; paper: 12+12)")
    print_table(
        f"AOT compile, paper scale (configs/rag_sequence_nq.py): BERT-base question encoder + {lay}, "
        f"{n_params / 1e6:.0f}M params, {config.model.dtype} compute / f32 params+Adam, global batch {b}, "
        f"K={k}, question {lq}, context {l}, target {t}; {n_dev} fake CPU devices, "
        f"memory_analysis() per device in GiB; {load_avg()}",
        ["mesh (data,fsdp,tensor)", "remat", "examples/data shard", "argument", "output", "alias (donated)", "temp",
         "generated code", "peak ~ arg+out-alias+temp", "TFLOP/device/step (XLA)", "lower+compile s"],
        rows,
    )


def run_remat_probe() -> None:
    """Does this backend keep jax.checkpoint's recomputation? An 8-layer MLP's
    gradient compiled with and without it: per-device temp and the matmuls
    in the compiled program (a kept remat recomputes 2 per layer)."""
    import re

    def layer(w, x):
        return x + jnp.tanh(jnp.tanh(x @ w) @ w.T)

    ws = [jax.ShapeDtypeStruct((256, 1024), jnp.float32)] * 8
    x = jax.ShapeDtypeStruct((4096, 256), jnp.float32)
    rows = []
    for name, f in (("none", layer), ("jax.checkpoint", jax.checkpoint(layer))):
        def loss(ws, x, f=f):
            for w in ws:
                x = f(w, x)
            return jnp.sum(x)

        lowered = jax.jit(jax.grad(loss)).lower(ws, x)
        compiled = lowered.compile()
        text = compiled.as_text()
        rows.append([name, f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f}",
                     str(lowered.as_text().count("stablehlo.dot_general")),
                     str(len(re.findall(r"\} dot\(", text))), str(text.count(" tanh("))])
    print_table(f"remat probe, 8-layer MLP gradient on {jax.devices()[0].platform}",
                ["layers", "temp MiB", "dots lowered (jax)", "dots compiled (XLA)", "tanh compiled"], rows)


def run_aot(args) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), "--aot-child", "--devices", str(args.devices)]
    for mode in args.remat:
        cmd += ["--remat", mode]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    for m in args.meshes:
        cmd += ["--mesh", ",".join(map(str, m))]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--batch", type=int, default=0, help="override B (base default 2)")
    ap.add_argument("--reps", type=int, default=0, help="timed steps (default 5 tiny, 2 base)")
    ap.add_argument("--hf-single-thread", action="store_true", help="also time HF with 1 torch thread")
    ap.add_argument("--real-lengths", action="store_true",
                    help="only the real-length table: DPR-shaped contexts, each side padded its own way")
    ap.add_argument("--aot", action="store_true", help="only the paper-scale AOT compile (8 fake devices)")
    ap.add_argument("--with-aot", action="store_true", help="throughput tables, then the AOT table")
    ap.add_argument("--aot-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--remat-probe", action="store_true",
                    help="only: does this backend keep jax.checkpoint's recomputation (memory, HLO)?")
    ap.add_argument("--layers", type=int, default=0, help="AOT: BART encoder/decoder layers (default 12 = paper)")
    ap.add_argument("--mesh", action="append", default=None, help="AOT mesh shape, e.g. 2,4,1 (repeatable)")
    ap.add_argument("--devices", type=int, default=8, help="AOT: fake CPU devices (default 8)")
    ap.add_argument("--remat", action="append", default=None, choices=("none", "minimal", "full"),
                    help="AOT: model.remat mode(s) to compile (repeatable; default none)")
    args = ap.parse_args()
    args.remat = args.remat or ["none"]
    # Default meshes: three 8-device layouts, or the pod default (data x 8-way fsdp) on other counts.
    default = ["8,1,1", "2,4,1", "2,2,2"] if args.devices == 8 else ["-1,8,1"]
    args.meshes = [tuple(int(x) for x in m.split(",")) for m in (args.mesh or default)]
    if args.aot_child:
        run_aot_child(args)
        return
    if args.remat_probe:
        run_remat_probe()
        return
    if args.real_lengths:
        run_real_lengths(args)
        return
    if not args.aot:
        run_throughput(args)
    if args.aot or args.with_aot:
        run_aot(args)


if __name__ == "__main__":
    main()
