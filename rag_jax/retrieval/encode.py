"""The document-encoding job: corpus -> sharded embedding store, data-parallel and resumable.

Batches have one fixed shape (the last is padded), so the encoder compiles
once; each global batch is split over the mesh's ``data`` axis with a
``NamedSharding`` and XLA runs the replicas in parallel. Output shards hold
``shard_rows`` rows (a multiple of the batch size) and are written through a
temporary file and a rename; ``job.json`` pins the job's settings. Killed and
restarted on the same output directory, the job skips the complete shards and
recomputes the rest with exactly the batches an uninterrupted run would use,
so the shards are identical. A directory holding another job (other corpus,
encoder or settings) is refused, or restarted when the caller says so.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rag_jax.retrieval.corpus import Corpus, _progress
from rag_jax.retrieval.faults import fault_point
from rag_jax.retrieval.embeddings import (
    STORE_MANIFEST,
    EmbeddingStore,
    np_dtype,
    save_npy_atomic,
    shard_name,
    to_storage,
    write_store_manifest,
)

JOB_FILE = "job.json"


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------


def make_context_tokenize(
    tokenizer: Any, max_length: int = 256, token_types: str = "zeros"
) -> Callable[[Sequence[str], Sequence[str]], dict[str, np.ndarray]]:
    """``(titles, texts) -> {input_ids, attention_mask, token_type_ids}`` int32 ``[N, max_length]``.

    As HF ``DPRContextEncoderTokenizer`` on ``(title, text)`` pairs:
    ``[CLS] title [SEP] text [SEP]``, longest-first truncation, padded to
    ``max_length``. ``token_types="zeros"`` feeds all-zero segment ids, as
    DPR's own embedding script and HF's RAG knowledge-base example do;
    ``"pair"`` keeps the tokenizer's 0/1 segments.
    Accepts rag_jax's ``TextTokenizer``, a ``tokenizers.Tokenizer`` or an HF
    fast tokenizer.
    """
    if token_types not in ("zeros", "pair"):
        raise ValueError(f"token_types must be 'zeros' or 'pair', got {token_types!r}")

    def finish(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v, np.int32) for k, v in out.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if token_types == "zeros" or "token_type_ids" not in out:
            out["token_type_ids"] = np.zeros_like(out["input_ids"])
        return out

    from tokenizers import Tokenizer as RawTokenizer

    if hasattr(tokenizer, "tok") and isinstance(getattr(tokenizer, "tok"), RawTokenizer):
        return lambda titles, texts: finish(tokenizer(list(titles), list(texts), max_length=max_length))
    if isinstance(tokenizer, RawTokenizer):
        pad_id = tokenizer.token_to_id("[PAD]") or 0

        def raw(titles: Sequence[str], texts: Sequence[str]) -> dict[str, np.ndarray]:
            tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
            tokenizer.enable_padding(pad_id=pad_id, length=max_length)
            try:
                encs = tokenizer.encode_batch(list(zip(titles, texts)))
            finally:
                tokenizer.no_padding()
                tokenizer.no_truncation()
            return finish({
                "input_ids": [e.ids for e in encs],
                "attention_mask": [e.attention_mask for e in encs],
                "token_type_ids": [e.type_ids for e in encs],
            })

        return raw
    if callable(tokenizer):  # an HF tokenizer
        return lambda titles, texts: finish(
            dict(tokenizer(list(titles), list(texts), max_length=max_length, truncation="longest_first",
                           padding="max_length", return_tensors="np"))
        )
    raise TypeError(f"unsupported tokenizer type {type(tokenizer).__name__}")


# ---------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ``('data',)`` over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), ("data",))


def _batch_encoder(encoder: Any, mesh: Mesh, batch_axis: str) -> Callable[[dict[str, np.ndarray]], jax.Array]:
    """Places a host batch on the mesh (batch axis sharded) and runs the encoder on it."""
    batch_sharding = NamedSharding(mesh, P(batch_axis))
    if hasattr(encoder, "apply_fn") and hasattr(encoder, "params"):
        replicated = NamedSharding(mesh, P())
        params = jax.device_put(encoder.params, replicated)
        # Pure function of params: the same compiled program for every batch.
        fn = jax.jit(
            encoder.apply_fn,
            in_shardings=(replicated, batch_sharding, batch_sharding, batch_sharding),
            out_shardings=batch_sharding,
        )
        return lambda b: fn(params, *(jax.device_put(b[k], batch_sharding) for k in ("input_ids", "attention_mask", "token_type_ids")))
    if callable(encoder):
        return lambda b: encoder(
            jax.device_put(b["input_ids"], batch_sharding), jax.device_put(b["attention_mask"], batch_sharding)
        )
    raise TypeError("encoder must have .apply_fn and .params (rag_jax.load_encoder) or be encode_fn(input_ids, attention_mask)")


def _fingerprint(encoder: Any) -> str | None:
    fp = getattr(encoder, "fingerprint", None)
    return fp() if callable(fp) else None


def encode_corpus(
    corpus: Corpus,
    encoder: Any,
    out_dir: str | os.PathLike,
    *,
    tokenize: Callable[[Sequence[str], Sequence[str]], dict[str, np.ndarray]] | None = None,
    tokenizer: Any = None,
    batch_size: int = 64,
    shard_rows: int | None = None,
    max_length: int = 256,
    dtype: str = "float32",
    token_types: str = "zeros",
    mesh: Mesh | None = None,
    batch_axis: str = "data",
    encoder_fingerprint: str | None = None,
    length_bucket: int | None = 64,
    progress: bool = True,
    on_other_job: Callable[[str], None] | None = None,
) -> EmbeddingStore:
    """Encodes every corpus passage into an embedding store at ``out_dir`` (resumable).

    ``encoder`` is an object from ``rag_jax.load_encoder`` (its pure
    ``apply_fn``/``params`` are jitted with batch-sharded inputs) or a
    function ``encode_fn(input_ids [N, L], attention_mask [N, L]) -> [N, D]``
    called with batch-sharded jax arrays. ``batch_size`` is the global batch,
    rounded up to a multiple of the data-axis size. ``length_bucket`` trims
    each batch's padding to the next multiple of it above the batch's longest
    passage (at most ``max_length / length_bucket`` compiled shapes; DPR's
    100-word passages mostly need 192 of 256 tokens); ``None`` always pads
    to ``max_length``. Trimming only removes masked padding, so the
    embeddings do not change beyond float rounding.

    ``out_dir`` may hold an unfinished (or finished) run of the same job,
    which is resumed (or returned). If it holds a different job, ValueError
    names what differs; with ``on_other_job`` that function is called with
    the difference instead and the directory is emptied and started over.
    """
    mesh = mesh or data_mesh()
    n_data = mesh.shape[batch_axis]
    batch_size = int(math.ceil(batch_size / n_data) * n_data)
    shard_rows = int(shard_rows or batch_size * 64)
    if shard_rows % batch_size:
        shard_rows = int(math.ceil(shard_rows / batch_size) * batch_size)
    np_dtype(dtype)  # validates the name
    if tokenize is None:
        tokenizer = tokenizer if tokenizer is not None else getattr(encoder, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenize= or tokenizer=, or an encoder with .tokenizer")
        tokenize = make_context_tokenize(tokenizer, max_length, token_types)
    fingerprint = encoder_fingerprint or _fingerprint(encoder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = {
        "corpus_checksum": corpus.checksum,
        "count": len(corpus),
        "encoder_fingerprint": fingerprint,
        "batch_size": batch_size,
        "shard_rows": shard_rows,
        "max_length": max_length,
        "dtype": dtype,
        "token_types": token_types,
        "length_bucket": length_bucket,
    }
    other = _other_job(out, job)
    if other is not None:
        if on_other_job is None:
            raise ValueError(f"{out}: holds a different encoding job ({other}); use another directory or delete it")
        on_other_job(other)
        shutil.rmtree(out)
        out.mkdir(parents=True)
    _write_job(out, job)
    num_shards = max(1, math.ceil(len(corpus) / shard_rows))
    names = [shard_name(i) for i in range(num_shards)]
    if (out / STORE_MANIFEST).is_file():
        return EmbeddingStore(out)
    done = [i for i in range(num_shards) if _shard_complete(out / names[i], _rows_in(i, shard_rows, len(corpus)))]
    done_rows = sum(_rows_in(i, shard_rows, len(corpus)) for i in done)
    run = _batch_encoder(encoder, mesh, batch_axis)
    bar = _progress(progress, "encode", total=len(corpus), unit="psg", initial=done_rows)
    dim = None
    try:
        for s in range(num_shards):
            if s in done:
                continue
            start, rows = s * shard_rows, _rows_in(s, shard_rows, len(corpus))
            pieces = []
            pending = None  # one batch in flight: tokenize the next while the device works
            for b0 in range(start, start + rows, batch_size):
                n = min(batch_size, start + rows - b0)
                titles, texts = corpus.batch(b0, b0 + n)
                if n < batch_size:  # fixed shapes: pad with empty passages, drop their outputs
                    titles += [""] * (batch_size - n)
                    texts += [""] * (batch_size - n)
                batch = _trim(tokenize(titles, texts), length_bucket)
                result = run(batch)
                if pending is not None:
                    pieces.append(_fetch(*pending, bar))
                pending = (result, n)
            if pending is not None:
                pieces.append(_fetch(*pending, bar))
            block = to_storage(np.concatenate(pieces), dtype)
            dim = block.shape[1]
            save_npy_atomic(out / names[s], block)
            fault_point(f"shard-{s}")
        if dim is None:
            dim = int(np.load(out / names[0], mmap_mode="r").shape[1])
        write_store_manifest(out, dim, len(corpus), dtype, shard_rows, names, fingerprint, corpus.checksum,
                             job=job)
    finally:
        if bar is not None:
            bar.close()
    return EmbeddingStore(out)


def _trim(batch: dict[str, np.ndarray], bucket: int | None) -> dict[str, np.ndarray]:
    if not bucket:
        return batch
    full = batch["input_ids"].shape[1]
    longest = int(batch["attention_mask"].sum(1).max(initial=1))
    keep = min(full, int(math.ceil(longest / bucket) * bucket))
    return {k: v[:, :keep] for k, v in batch.items()}


def _fetch(result: Any, n: int, bar: Any) -> np.ndarray:
    arr = np.asarray(jax.device_get(result), np.float32)[:n]
    if bar is not None:
        bar.update(n)
    return arr


def _rows_in(shard: int, shard_rows: int, count: int) -> int:
    return max(0, min(shard_rows, count - shard * shard_rows))


def _shard_complete(path: Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False  # a foreign or damaged file: recompute it
    return arr.ndim == 2 and arr.shape[0] == rows


def _other_job(out: Path, job: dict) -> str | None:
    """What differs between ``job`` and the one ``out`` was started for (None: same, or none yet)."""
    f = out / JOB_FILE
    if not f.is_file():
        # Files without a job.json (an imported store, say) are no run of this job to resume.
        return "files that no encoding job wrote (no job.json)" if any(out.iterdir()) else None
    old = json.loads(f.read_text())
    diff = {k: (old.get(k), v) for k, v in job.items() if old.get(k) != v}
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()) or None


def _write_job(out: Path, job: dict) -> None:
    f = out / JOB_FILE
    if not f.is_file():
        tmp = out / (JOB_FILE + ".partial")
        tmp.write_text(json.dumps(job, indent=2))
        os.replace(tmp, f)
