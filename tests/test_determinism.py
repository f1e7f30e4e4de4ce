"""Same seed, same bits, whatever else runs on the machine.

A small pipeline (fictional world -> BPE tokenizer -> reader warm-up of a tiny
generator, i.e. jitted AdamW steps; a grain loader; a ScaNN tree + AH index)
runs in a fresh process twice: once as is, once while busy-loop processes
compete for every core. Its outputs must agree bit for bit. Fresh processes,
so per-process randomness (hash seeds, unseeded native RNGs) counts too.

Without ``ScannParams.random_init=False`` the ScaNN part fails: ScaNN's random
k-means initialization ignores its seeds, so every build differed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_PIPELINE = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    import numpy as np

    from rag_jax.data.pipeline import make_loader
    from rag_jax.data.tokenize import load_tokenizer
    from rag_jax.data.train_tokenizer import train_bart_tokenizer
    from rag_jax.demo.world import generate_world
    from rag_jax.retrieval.corpus import read_passages
    from rag_jax.retrieval.index import ScannIndex, ScannParams
    from rag_jax.train.reader_warmup import warmup_generator

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    root = Path(sys.argv[1])
    out = {}
    w = generate_world(root / "world", seed=5, num_people=30, num_orgs=10, num_cities=10, num_countries=3,
                       num_rivers=4)
    texts = [f"{p.title} / {p.text}" for p in read_passages(w.passages)]
    tok_dir = train_bart_tokenizer(texts, root / "tok", vocab_size=400, min_frequency=1, add_prefix_space=True)
    out["tokenizer"] = digest((tok_dir / "tokenizer.json").read_bytes())
    tiny = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=200,
                init_std=0.1)
    gen = warmup_generator(tiny, load_tokenizer(tok_dir, "bart"), [(w.qa_jsonl["train"], w.passages)],
                           root / "gen", steps=4, batch_size=8, short_steps=4, short_batch_size=8,
                           max_combined_length=128, verbose=False)
    out["generator"] = digest((gen / "model.safetensors").read_bytes())

    rows = [{"question": f"q{i}", "answer": "a", "answers": ["a"], "qid": i} for i in range(50)]
    loader = make_loader(rows, 8, seed=3, num_threads=2)
    out["loader"] = [int(q) for _ in range(12) for q in next(loader)["qid"]]

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(32, 32)).astype(np.float32)
    emb = centers[rng.integers(0, 32, 4000)] + 0.3 * rng.normal(size=(4000, 32)).astype(np.float32)
    index = ScannIndex.build(emb, ScannParams.for_size(len(emb), brute_force=False, reorder_dtype="float32"))
    index.serialize(root / "scann")
    out["scann"] = {f.name: digest(f.read_bytes()) for f in sorted((root / "scann").iterdir())}
    ids, _ = index.search(emb[:200], 5)
    out["scann_search"] = digest(np.ascontiguousarray(ids).tobytes())
    print("DIGESTS " + json.dumps(out, sort_keys=True))
""")


def _run_pipeline(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the process's own CPU device, as in the demo
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", _PIPELINE, str(root)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("DIGESTS "))
    return json.loads(line[len("DIGESTS "):])


def _busy_loops() -> list[subprocess.Popen]:
    # One spinning process per core: the pipeline's threads now get the CPU
    # late and in a different order than on an idle machine.
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(2, os.cpu_count() or 2))]


# Slow (about 3 CPU-minutes: the whole pipeline twice, once against busy loops): `make test-slow`; the default run stays within CI's 15 minutes.
@pytest.mark.slow
def test_pipeline_is_bit_identical_under_competing_cpu_load(tmp_path):
    quiet = _run_pipeline(tmp_path / "quiet")
    spinners = _busy_loops()
    try:
        loaded = _run_pipeline(tmp_path / "loaded")
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    for key in quiet:
        assert loaded[key] == quiet[key], f"{key} differs between an idle and a loaded run"
