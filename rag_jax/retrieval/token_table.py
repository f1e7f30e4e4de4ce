"""The passages as generator tokens, tokenized once, for retrieval inside the
train step (``retrieval.on_device``).

Each row holds the tokens (no ``<s>``/``</s>``) of
``rag_jax.rag.inputs.passage_string``: ``prefix + title + title_sep + text +
head(doc_sep)`` with HF's ``postprocess_docs`` rules. The step appends the
tokens of ``question_string`` (``tail(doc_sep) + question``, tokenized on the
host) and wraps them in ``<s> ... </s>``; ``split_doc_sep`` says why that
join equals tokenizing the whole context string.

Rows keep at most ``max_combined_length - 2`` tokens: HF truncates the whole
context to that many before adding the two specials, so a longer passage
never contributes more. A table lives in ``INDEX/passage_tokens/<fp>/``,
where ``fp`` is the fingerprint of everything its tokens depend on (corpus
checksum, the tokenizer's full serialization, prefix, separators, width): a
changed tokenizer, corpus or setting gets a new table, never a stale one.

    manifest.json   format, fingerprint, count, width, what went into it; written last
    tokens.npy      int32 [count, width], pad-filled past each row's length (memory-mapped)
    lengths.npy     int32 [count]
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rag_jax.data.tokenize import TextTokenizer
from rag_jax.rag.inputs import context_string, passage_string, question_string, split_doc_sep
from rag_jax.retrieval.corpus import Corpus, _progress, atomic_dir, commit_dir

TABLE_FORMAT = "rag_jax.token_table/1"
TABLE_SUBDIR = "passage_tokens"


@dataclass(frozen=True)
class ContextFormat:
    """What a passage's tokens depend on besides the corpus and the tokenizer."""

    prefix: str | None
    title_sep: str
    doc_sep: str
    max_combined_length: int

    @property
    def width(self) -> int:
        # <s> and </s> take two of the max_combined_length positions.
        return self.max_combined_length - 2


def tokenizer_fingerprint(tokenizer: TextTokenizer) -> str:
    """sha256 of the tokenizer's full serialization (vocab, merges, pre-tokenizer, added tokens)."""
    return hashlib.sha256(tokenizer.tok.to_str().encode("utf-8")).hexdigest()


def table_fingerprint(corpus_checksum: str, tokenizer: TextTokenizer, fmt: ContextFormat) -> str:
    parts = {"format": TABLE_FORMAT, "corpus": corpus_checksum, "tokenizer": tokenizer_fingerprint(tokenizer),
             "prefix": fmt.prefix, "title_sep": fmt.title_sep, "doc_sep": fmt.doc_sep, "width": fmt.width}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def encode_rows(tokenizer: TextTokenizer, strings: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of each string without specials, cut to ``width``: (int32 ``[N, width]`` pad-filled, lengths ``[N]``)."""
    ids = np.full((len(strings), width), tokenizer.pad_token_id, np.int32)
    lengths = np.zeros(len(strings), np.int32)
    for i, enc in enumerate(tokenizer.tok.encode_batch([str(s) for s in strings], add_special_tokens=False)):
        row = enc.ids[:width]
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


@dataclass
class TokenTable:
    """A loaded table: memory-mapped ``tokens`` ``[count, width]`` and ``lengths`` ``[count]``."""

    path: Path
    manifest: dict
    tokens: np.ndarray
    lengths: np.ndarray

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def width(self) -> int:
        return int(self.manifest["width"])


def open_table(path: Path, fingerprint: str) -> TokenTable:
    """Loads a complete table, checking it was made for ``fingerprint``."""
    mf = path / "manifest.json"
    if not mf.is_file():
        raise FileNotFoundError(f"{path}: not a complete token table (no manifest.json)")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != TABLE_FORMAT or manifest.get("fingerprint") != fingerprint:
        raise ValueError(f"{path}: token table was made for other inputs (fingerprint "
                         f"{str(manifest.get('fingerprint'))[:16]}..., wanted {fingerprint[:16]}...); delete it to rebuild")
    tokens = np.load(path / "tokens.npy", mmap_mode="r")
    lengths = np.load(path / "lengths.npy", mmap_mode="r")
    count, width = int(manifest["count"]), int(manifest["width"])
    if tokens.shape != (count, width) or lengths.shape != (count,):
        raise ValueError(f"{path}: arrays {tokens.shape}/{lengths.shape} disagree with the manifest ({count}, {width})")
    return TokenTable(path, manifest, tokens, lengths)


# Questions whose tokens are joined to sample passages before a table is written.
PROBE_QUESTIONS = ("who founded it?", " leading space", "two  spaces", '"quoted"', "Ünïcödé 東京", "?")


def check_join(tokenizer: TextTokenizer, corpus: Corpus, fmt: ContextFormat, rows: int = 64) -> None:
    """ValueError unless passage tokens + question tokens equal the tokens of
    the whole context string on the first ``rows`` passages and the probe
    questions. ``split_doc_sep`` proves it for byte-level BPE; this catches a
    generator tokenizer of another kind (a normalizer, a SentencePiece
    pre-tokenizer) before a table that would silently differ is written."""
    titles, texts = corpus.batch(0, rows)
    for t, x in zip(titles, texts):
        p = passage_string(t, x, fmt.prefix, fmt.title_sep, fmt.doc_sep)
        for q in PROBE_QUESTIONS:
            whole = context_string(t, x, q, fmt.prefix, fmt.title_sep, fmt.doc_sep)
            enc = tokenizer.tok.encode_batch([whole, p, question_string(q, fmt.doc_sep)], add_special_tokens=False)
            if enc[0].ids != enc[1].ids + enc[2].ids:
                raise ValueError(f"generator tokenizer splits {whole[:80]!r} differently at the passage/question "
                                 "boundary: on-device context assembly needs a byte-level BPE tokenizer (as BART's)")


def write_table(corpus: Corpus, tokenizer: TextTokenizer, fmt: ContextFormat, out: Path, fingerprint: str,
                chunk: int = 4096, progress: bool = True) -> Path:
    """Tokenizes every passage of ``corpus`` into a table at ``out``, atomically (temporary dir + rename)."""
    split_doc_sep(fmt.doc_sep)  # refuse a separator the token-space join cannot reproduce, before any work
    check_join(tokenizer, corpus, fmt)
    if fmt.width < 1:
        raise ValueError(f"max_combined_length {fmt.max_combined_length} leaves no room for passage tokens")
    tmp = atomic_dir(out, overwrite=True)
    bar = _progress(progress, "passage tokens", total=len(corpus), unit="psg")
    try:
        # Written straight into .npy memmaps: a 21M-row table never sits in RAM.
        tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.int32,
                                           shape=(len(corpus), fmt.width))
        lengths = np.lib.format.open_memmap(tmp / "lengths.npy", mode="w+", dtype=np.int32, shape=(len(corpus),))
        longest = 0
        for start in range(0, len(corpus), chunk):
            titles, texts = corpus.batch(start, start + chunk)
            strings = [passage_string(t, x, fmt.prefix, fmt.title_sep, fmt.doc_sep) for t, x in zip(titles, texts)]
            ids, lens = encode_rows(tokenizer, strings, fmt.width)
            tokens[start : start + len(ids)] = ids
            lengths[start : start + len(ids)] = lens
            longest = max(longest, int(lens.max(initial=0)))
            if bar is not None:
                bar.update(len(ids))
        tokens.flush()
        lengths.flush()
        del tokens, lengths
        manifest = {"format": TABLE_FORMAT, "fingerprint": fingerprint, "count": len(corpus), "width": fmt.width,
                    "corpus_checksum": corpus.checksum, "tokenizer": tokenizer_fingerprint(tokenizer),
                    "prefix": fmt.prefix, "title_sep": fmt.title_sep, "doc_sep": fmt.doc_sep,
                    "longest_row": longest}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out


def ensure_table(index_dir: str | os.PathLike, corpus: Corpus, tokenizer: TextTokenizer, fmt: ContextFormat,
                 progress: bool = True) -> TokenTable:
    """The table of this (corpus, tokenizer, format) under ``index_dir``, built first if missing.

    With several processes, process 0 builds while the others wait at a
    barrier, then every process memory-maps the same files.
    """
    fingerprint = table_fingerprint(corpus.checksum, tokenizer, fmt)
    out = Path(index_dir) / TABLE_SUBDIR / fingerprint[:16]
    import jax  # only for the process topology; the table itself is numpy

    if jax.process_index() == 0 and not (out / "manifest.json").is_file():
        write_table(corpus, tokenizer, fmt, out, fingerprint, progress=progress)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"rag_jax token table {fingerprint[:16]}")
    return open_table(out, fingerprint)


def ensure_index_table(index_dir: str | os.PathLike, generator_tokenizer: str | os.PathLike, fmt: ContextFormat,
                       progress: bool = True) -> TokenTable:
    """:func:`ensure_table` for the corpus inside an index directory and a
    tokenizer directory (``rag-jax build-index --token-table``): the table a
    ``retrieval.on_device`` run with that generator and format would build
    at start-up, made ahead of it."""
    from rag_jax.data.tokenize import load_tokenizer

    corpus = Corpus(Path(index_dir) / "corpus")
    return ensure_table(index_dir, corpus, load_tokenizer(generator_tokenizer, "bart"), fmt, progress)

