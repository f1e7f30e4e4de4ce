"""Tiny random HF RAG models for the tests/test_rag_*.py files (not a test module)."""
from __future__ import annotations

import numpy as np
import torch
from transformers import BartConfig, DPRConfig, RagConfig, RagSequenceForGeneration, RagTokenForGeneration

V = 48  # generator vocab: 0 <s>, 1 <pad>, 2 </s>
PAD, BOS, EOS = 1, 0, 2

QE = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
          projection_dim=0, max_position_embeddings=32, initializer_range=0.5,
          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GEN = dict(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
           decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=64,
           init_std=0.5, dropout=0.0)


def build(variant: str, std: float = 0.5, seed: int = 0, n_docs: int = 3, eos_bias: float | None = None, **rag_kw):
    """``eos_bias``: identity LayerNorms and a zero logits bias except ``eos_bias``
    on ``</s>``, so that greedy/beam outputs vary across contexts and lengths
    (with every parameter at std 0.5 one token wins everywhere)."""
    torch.manual_seed(seed)
    cfg = RagConfig.from_question_encoder_generator_configs(DPRConfig(**QE), BartConfig(**GEN), n_docs=n_docs, **rag_kw)
    cls = RagSequenceForGeneration if variant == "sequence" else RagTokenForGeneration
    model = cls(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0.0, std)
        model.rag.generator.final_logits_bias.normal_(0.0, std)
        if eos_bias is not None:
            for name, p in model.named_parameters():
                if "norm" in name.lower():
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
            model.rag.generator.final_logits_bias.zero_()
            model.rag.generator.final_logits_bias[0, EOS] = eos_bias
    return model


def context(batch: int, n_docs: int, length: int, seed: int = 0):
    """Ragged context ids ``[B*K, L]`` (pad on the right), mask, and scores ``[B, K]``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, (batch * n_docs, length))
    ids[:, 0] = BOS
    lens = rng.integers(3, length + 1, batch * n_docs)
    lens[0] = length
    mask = (np.arange(length)[None] < lens[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, PAD)
    ids[np.arange(batch * n_docs), lens - 1] = EOS
    scores = rng.normal(0, 2.0, (batch, n_docs)).astype(np.float32)
    return ids, mask, scores


def labels(batch: int, length: int, seed: int = 1, start=(EOS, BOS)):
    """Labels as decoder inputs: ``start`` tokens, content, ``</s>``, then pads (ragged)."""
    rng = np.random.default_rng(seed)
    out = np.full((batch, length), PAD, np.int64)
    for i in range(batch):
        n = int(rng.integers(len(start) + 2, length + 1)) if i else length
        row = list(start) + list(rng.integers(3, V, n - len(start) - 1)) + [EOS]
        out[i, :n] = row[:n]
    return out
