"""A tiny, fully real training setup: a generated demo world, a tiny random
BERT (with a WordPiece vocab trained on the world) as both DPR towers, an
exact index built through the CLI, and the tiny config pointed at them."""
from __future__ import annotations

from pathlib import Path

import torch

from rag_jax.demo.world import generate_world


def make_world(root: Path) -> dict[str, Path]:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel

    from rag_jax.cli import main as cli

    world = generate_world(root / "world", seed=3, num_people=40, num_orgs=16, num_cities=16, num_countries=4,
                           num_rivers=6)
    passages = Path(world.passages)
    enc_dir = root / "encoder"
    enc_dir.mkdir()
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train([str(passages)], vocab_size=300, min_frequency=1, show_progress=False,
              special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save_model(str(enc_dir))
    vocab = sum(1 for _ in open(enc_dir / "vocab.txt", encoding="utf-8"))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128, initializer_range=0.2),
                     add_pooling_layer=False)
    bert.save_pretrained(enc_dir)
    index = root / "index"
    assert cli(["build-index", "--passages", str(passages), "--encoder", str(enc_dir), "--out", str(index),
                "--index-type", "exact", "--max-length", "64", "--no-progress"]) == 0
    return {"world": Path(world.out_dir), "train": Path(world.qa_jsonl["train"]),
            "dev": Path(world.qa_jsonl["dev"]), "test": Path(world.qa_jsonl["test"]),
            "encoder": enc_dir, "index": index}


def tiny_config(paths: dict[str, Path], **train):
    from rag_jax.config import load_config_module

    c = load_config_module(Path(__file__).resolve().parents[1] / "configs" / "tiny.py").get_config()
    c.data.train_file = str(paths["train"])
    c.data.format = "jsonl"
    c.retrieval.index_dir = str(paths["index"])
    c.model.question_encoder = str(paths["encoder"])
    c.eval.every = 1000  # no dev file here: evaluation is tested separately
    c.checkpoint.async_save = False
    for k, v in train.items():
        setattr(c.train, k, v)
    return c
