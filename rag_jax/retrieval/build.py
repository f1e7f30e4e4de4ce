"""The resumable index build: passages -> corpus store -> document embeddings
(encoded or imported) -> ScaNN/exact index directory.

    manifest = build_index_dir("wiki/index", passages="psgs_w100.tsv", encoder=ctx_dir)

Intermediate work (corpus store, embedding shards) lives in ``OUT.work``; a
killed build re-run with the same arguments resumes from it, and ``OUT``
appears only when complete (``rag-jax build-index`` is this function).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from rag_jax.encoder import load_encoder
from rag_jax.retrieval.corpus import Corpus, build_corpus
from rag_jax.retrieval.embeddings import EmbeddingStore, import_embeddings
from rag_jax.retrieval.encode import encode_corpus
from rag_jax.retrieval.index import build_index


def _say(msg: str) -> None:
    print(f"[build-index] {msg}")


def build_index_dir(
    out: str | os.PathLike,
    *,
    passages: str | os.PathLike | None = None,
    corpus: str | os.PathLike | None = None,
    split_words: int | None = None,
    encoder: str | os.PathLike | None = None,
    embeddings_pkl: str | None = None,
    embeddings_npy: str | os.PathLike | None = None,
    embeddings_ids: str | os.PathLike | None = None,
    batch_size: int = 64,
    max_length: int = 256,
    length_bucket: int | None = 64,
    shard_rows: int | None = None,
    dtype: str = "float32",
    token_types: str = "zeros",
    index_type: str = "scann",
    scann_params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Builds the index directory ``out`` and returns its manifest.

    The passages come from exactly one of ``passages`` (DPR TSV or JSONL file;
    ``split_words`` treats it as raw documents split into passages of that
    many words) or ``corpus`` (an existing corpus directory). The embeddings
    are encoded with ``encoder`` (a context encoder directory), or imported
    from exactly one of ``embeddings_pkl`` (a glob of DPR pickles) or
    ``embeddings_npy`` (with ``embeddings_ids``); with an import, a given
    ``encoder`` is only recorded (its fingerprint) in the manifest.
    ``scann_params`` overrides ScaNN's defaults (``ScannParams`` fields).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists (use --overwrite)")
    if bool(passages) == bool(corpus):
        raise ValueError("give exactly one of --passages FILE or --corpus DIR")
    imports = bool(embeddings_pkl) + bool(embeddings_npy)
    if imports > 1 or not (imports or encoder):
        raise ValueError("give --encoder (to encode), or one of --embeddings-pkl / --embeddings-npy "
                         "(to import; with --encoder too, its fingerprint is recorded in the manifest)")
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    if corpus:
        store_corpus = Corpus(corpus)
    else:
        cdir = work / "corpus"
        if (cdir / "manifest.json").is_file():
            store_corpus = Corpus(cdir)
            # A work dir left by a build from other passages must not be mixed in.
            if store_corpus.manifest.get("source") != str(Path(passages).resolve()):
                raise ValueError(
                    f"{work} holds a corpus from {store_corpus.manifest.get('source')}; delete it to start over"
                )
            _say(f"reusing corpus store {cdir} ({len(store_corpus)} passages)")
        else:
            store_corpus = build_corpus(passages, cdir, split_words=split_words or None, progress=progress)
            _say(f"corpus: {len(store_corpus)} passages ({time.perf_counter() - t0:.1f}s)")

    edir = work / "embeddings"
    loaded = load_encoder(encoder) if encoder else None
    fingerprint = loaded.fingerprint() if loaded else None
    if not imports:
        t1 = time.perf_counter()
        store = encode_corpus(
            store_corpus, loaded, edir, batch_size=batch_size, shard_rows=shard_rows or None,
            max_length=max_length, dtype=dtype, token_types=token_types,
            length_bucket=length_bucket or None, progress=progress,
        )
        dt = time.perf_counter() - t1
        _say(f"encoded {len(store_corpus)} passages in {dt:.1f}s ({len(store_corpus) / max(dt, 1e-9):.1f} passages/s)")
    elif (edir / "embeddings.json").is_file():
        store = EmbeddingStore(edir)  # imported before the build was interrupted
    else:
        store = import_embeddings(
            store_corpus, edir, dpr_pickles=embeddings_pkl, npy=embeddings_npy, ids=embeddings_ids,
            dtype=dtype, encoder_fingerprint=fingerprint, progress=progress,
        )
        _say(f"imported {store.count} x {store.dim} embeddings")

    t2 = time.perf_counter()
    build_index(
        store, out, kind=index_type, corpus=store_corpus, include_corpus=True, encoder_fingerprint=fingerprint,
        scann_params=dict(scann_params or {}), overwrite=overwrite,
        # The work dir's own corpus and shards move into OUT; a caller's corpus directory is copied.
        move_inputs=True, move_corpus=not corpus,
    )
    shutil.rmtree(work, ignore_errors=True)
    manifest = json.loads((out / "manifest.json").read_text())
    _say(
        f"{index_type} index of {manifest['count']} x {manifest['dim']} in "
        f"{time.perf_counter() - t2:.1f}s -> {out} (search structure "
        f"{manifest['search_bytes'] / max(manifest['count'], 1):.0f} bytes/passage; "
        f"total {time.perf_counter() - t0:.1f}s)"
    )
    return manifest
