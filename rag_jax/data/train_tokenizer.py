"""Training a small byte-level BPE generator tokenizer on a corpus.

No pretrained BART ships on PyPI, so the demo's generator gets a vocabulary
learned from its own corpus: a few thousand tokens instead of BART's 50265
keeps the embedding and softmax cheap on CPU. The files written
(``vocab.json``, ``merges.txt``, ``tokenizer.json`` + configs) follow the HF
BART layout, so ``transformers.BartTokenizer`` and our loader read them alike.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import ByteLevelBPETokenizer

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4 as in BART


def train_bart_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 4000, min_frequency: int = 2,
    add_prefix_space: bool = False, added_tokens: Sequence[str] = (),
) -> Path:
    """Writes an HF BART tokenizer directory. ``add_prefix_space=True`` makes a
    word at the start of a string the same token as inside a sentence: an
    answer span ("Paris") then matches its tokens in the passage (" Paris"),
    which is what a generator trained from scratch must learn to copy.
    ``added_tokens`` (classification label words) are kept whole, with ids
    after the learned vocabulary, wherever they stand as words."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer(add_prefix_space=add_prefix_space, trim_offsets=True)
    tok.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS, show_progress=False
    )
    vocab = tok.get_vocab()
    for i, s in enumerate(SPECIALS):
        if vocab.get(s) != i:
            raise RuntimeError(f"special token {s} got id {vocab.get(s)}, expected {i}")
    tok.save_model(str(out))  # vocab.json + merges.txt
    from rag_jax.data.tokenize import bart_bpe_from_files

    full = bart_bpe_from_files(out / "vocab.json", out / "merges.txt", add_prefix_space)
    if added_tokens:
        from tokenizers import AddedToken

        full.add_tokens([AddedToken(t, single_word=True) for t in added_tokens])
    full.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "BartTokenizer",
                "model_max_length": 1024,
                "add_prefix_space": add_prefix_space,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "sep_token": "</s>",
                "cls_token": "<s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "mask_token": "<mask>",
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
             "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"},
            indent=2,
        )
    )
    return out
