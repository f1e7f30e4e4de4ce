"""Tokenizers loaded from checkpoint directories, without hub access.

BERT WordPiece (``tokenizer.json`` or ``vocab.txt``) for the DPR towers and
byte-level BPE (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``) for
BART, both through the ``tokenizers`` library, wrapped so that every caller
gets fixed-shape int32 numpy batches.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)


class TextTokenizer:
    """Fixed-length batch encoding/decoding over a ``tokenizers.Tokenizer``."""

    def __init__(self, tok: HFTokenizer, kind: str, source_dir: str | None = None) -> None:
        self.tok = tok
        self.kind = kind
        self.source_dir = source_dir
        self.tok.no_padding()
        self.tok.no_truncation()
        vocab = tok.get_vocab()
        specials = ("[PAD]", "[CLS]", "[SEP]", "[UNK]") if kind == "bert" else ("<pad>", "<s>", "</s>", "<unk>")
        missing = [s for s in specials if s not in vocab]
        if missing:
            raise ValueError(f"{source_dir}: {kind} tokenizer lacks special tokens {missing}")
        self.pad_token_id = vocab[specials[0]]
        self.bos_token_id = vocab[specials[1]]
        self.eos_token_id = vocab[specials[2]]
        self.unk_token_id = vocab[specials[3]]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __call__(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        max_length: int = 128,
        pad_to_max: bool = True,
    ) -> dict[str, np.ndarray]:
        """-> ``input_ids``, ``attention_mask`` (and ``token_type_ids``) ``[N, max_length]``."""
        texts = [str(t) for t in texts]
        self.tok.enable_truncation(max_length=max_length, strategy="longest_first")
        if pad_to_max:
            self.tok.enable_padding(pad_id=self.pad_token_id, length=max_length)
        else:
            self.tok.enable_padding(pad_id=self.pad_token_id)
        try:
            if pairs is None:
                encs = self.tok.encode_batch(texts)
            else:
                if len(pairs) != len(texts):
                    raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
                encs = self.tok.encode_batch(list(zip(texts, [str(p) for p in pairs])))
        finally:
            self.tok.no_padding()
            self.tok.no_truncation()
        out = {
            "input_ids": np.asarray([e.ids for e in encs], np.int32).reshape(len(texts), -1),
            "attention_mask": np.asarray([e.attention_mask for e in encs], np.int32).reshape(len(texts), -1),
        }
        if self.kind == "bert":
            out["token_type_ids"] = np.asarray([e.type_ids for e in encs], np.int32).reshape(len(texts), -1)
        return out

    def decode(self, ids: np.ndarray | Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [
            self.tok.decode([int(i) for i in row], skip_special_tokens=skip_special_tokens).strip()
            for row in np.asarray(ids)
        ]

    def save(self, out_dir: str | os.PathLike) -> None:
        """Copies the source files (or writes ``tokenizer.json``) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        copied = False
        if self.source_dir:
            for name in TOKENIZER_FILES:
                src = Path(self.source_dir) / name
                if src.is_file():
                    shutil.copyfile(src, out / name)
                    copied = True
        if not copied:
            self.tok.save(str(out / "tokenizer.json"))
            (out / "tokenizer_config.json").write_text(json.dumps(_default_config(self.kind), indent=2))


def stage_tokenizer_files(
    tokenizer: "TextTokenizer | None", staging_dir: str | os.PathLike, subdir: str = ""
) -> dict[str, str]:
    """Saves ``tokenizer`` under ``staging_dir/subdir`` and returns
    ``{"subdir/name": path}`` for ``hf_io.write_hf_dir``'s extra files, so the
    tokenizer lands inside the atomically written checkpoint directory."""
    if tokenizer is None:
        return {}
    out = Path(staging_dir) / subdir
    tokenizer.save(out)
    return {
        (f"{subdir}/{name}" if subdir else name): str(out / name)
        for name in TOKENIZER_FILES
        if (out / name).is_file()
    }


def _default_config(kind: str) -> dict:
    if kind == "bert":
        return {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    return {"tokenizer_class": "BartTokenizer", "model_max_length": 1024}


def _tokenizer_config(path: Path) -> dict:
    f = path / "tokenizer_config.json"
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: invalid JSON ({e})") from e
    return {}


def bert_wordpiece_from_vocab(vocab_file: str | os.PathLike, lowercase: bool = True) -> HFTokenizer:
    """A BERT WordPiece tokenizer from ``vocab.txt``, as HF BertTokenizer splits."""
    vocab: dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            token = line.rstrip("\n")
            if token in vocab:
                continue  # HF keeps the first id of a duplicated line
            vocab[token] = i
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
    return tok


def bart_bpe_from_files(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike,
                        add_prefix_space: bool = False) -> HFTokenizer:
    """Byte-level BPE as HF BartTokenizer: ``<s> A </s>`` / ``<s> A </s></s> B </s>``
    (``add_prefix_space`` as the tokenizer_config option of that name)."""
    tok = HFTokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    vocab = tok.get_vocab()
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), trim_offsets=True, add_prefix_space=add_prefix_space
    )
    # Registered as special so they are never split and decode can skip them.
    tok.add_special_tokens([t for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>") if t in vocab])
    return tok


def check_tokenizer_dir(path: str | os.PathLike, kind: str) -> None:
    """Raises FileNotFoundError, naming the directory and the files it lacks,
    unless ``path`` holds a ``kind`` (``"bert"`` / ``"bart"``) tokenizer."""
    path = Path(path)
    what = "BERT/DPR encoder" if kind == "bert" else "BART generator"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (expected a {what} checkpoint or tokenizer directory)")
    if (path / "tokenizer.json").is_file():
        return
    if kind == "bert":
        if (path / "vocab.txt").is_file():
            return
        wanted = "vocab.txt or tokenizer.json"
    elif (path / "vocab.json").is_file():
        if (path / "merges.txt").is_file():
            return
        wanted = "merges.txt next to vocab.json, or tokenizer.json"
    else:
        wanted = "vocab.json + merges.txt, or tokenizer.json"
    raise FileNotFoundError(
        f"{path}: no tokenizer files ({wanted}); a {what} directory must hold its tokenizer files "
        "as HF save_pretrained writes them: copy them from the checkpoint the weights came from"
    )


def load_tokenizer(path: str | os.PathLike, kind: str) -> TextTokenizer:
    """``kind`` is ``"bert"`` or ``"bart"``; raises FileNotFoundError if absent
    (``check_tokenizer_dir``)."""
    check_tokenizer_dir(path, kind)
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return TextTokenizer(HFTokenizer.from_file(str(path / "tokenizer.json")), kind, str(path))
    if kind == "bert":
        lower = _tokenizer_config(path).get("do_lower_case", True)
        return TextTokenizer(bert_wordpiece_from_vocab(path / "vocab.txt", lowercase=lower), kind, str(path))
    prefix = bool(_tokenizer_config(path).get("add_prefix_space", False))
    return TextTokenizer(bart_bpe_from_files(path / "vocab.json", path / "merges.txt", prefix), kind, str(path))


def maybe_load_tokenizer(path: str | os.PathLike, kind: str) -> TextTokenizer | None:
    try:
        return load_tokenizer(path, kind)
    except FileNotFoundError:
        return None
