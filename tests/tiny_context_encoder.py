"""A tiny random DPR context encoder with a word-level vocabulary, saved as an
HF directory, for the index-building tests (not a test module)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import DPRConfig, DPRContextEncoder

WORDS = "the a of in is was river city born capital mountain paris france music earth sea who where".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("bcdefghijklmnopqrstuvwxyz")


def save_tiny_context_encoder(out: Path) -> Path:
    """Writes the encoder (weights drawn with std 0.5, so passages differ) and its vocab.txt to ``out``."""
    model = DPRContextEncoder(DPRConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=24, max_position_embeddings=32))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return out
