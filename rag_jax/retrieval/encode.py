"""The document-encoding job: corpus -> sharded embedding store, data-parallel and resumable.

Batches have one fixed shape (the last is padded), so the encoder compiles
once per length bucket; each batch is split over the mesh's ``data`` axis
with a ``NamedSharding`` and XLA runs the replicas in parallel. Output shards
hold ``shard_rows`` rows (a multiple of the batch size) and are written
through a temporary file and a rename; ``job.json`` pins the job's settings
(an ``EncodingJob``). Killed and restarted on the same output directory, the
job skips the complete shards and recomputes the rest with exactly the
batches an uninterrupted run would use, so the shards are identical. A
directory holding another job (other corpus, encoder or settings) is
refused, or restarted when the caller says so.

The steps, ``start_job`` -> ``encode_shards`` -> ``finish_job``, let several
processes fill one directory (``rag_jax.retrieval.build``): each encodes its
own shards on its own devices. A shard's bytes depend on the job and on the
number of devices one batch is split over (XLA's float rounding follows the
rows per device), not on which process encodes it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
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
    """A 1-D mesh ``('data',)`` over this process's devices (or the given ones).

    Local devices only: in a multi-process run each process encodes its own
    shards, with no collective that could make it wait for another process.
    """
    devices = list(jax.local_devices() if devices is None else devices)
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


@dataclass(frozen=True)
class EncodingJob:
    """What an embedding directory is being filled with; saved as its ``job.json``.

    Only settings that change the stored bytes are fields: never the number
    of processes or devices, so a run killed under one topology is resumed
    under another. ``batch_size`` rows (consecutive, from the start of each
    shard) form one encoder call whatever the topology; a process whose
    device count does not divide it pads the call with empty passages.
    """

    corpus_checksum: str
    count: int
    encoder_fingerprint: str | None
    batch_size: int
    shard_rows: int
    max_length: int
    dtype: str
    token_types: str
    length_bucket: int | None
    # Batches of passages sorted by token length within each shard. False in
    # the job.json of runs that predate the field (corpus order).
    sort_by_length: bool = False

    @classmethod
    def for_corpus(cls, corpus: Corpus, *, encoder_fingerprint: str | None, batch_size: int = 64,
                   shard_rows: int | None = None, max_length: int = 256, dtype: str = "float32",
                   token_types: str = "zeros", length_bucket: int | None = 16,
                   sort_by_length: bool = True) -> EncodingJob:
        """The job for ``corpus``; ``shard_rows`` (default 64 batches) is rounded up to whole batches."""
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        np_dtype(dtype)  # validates the name
        if token_types not in ("zeros", "pair"):
            raise ValueError(f"token_types must be 'zeros' or 'pair', got {token_types!r}")
        rows = int(math.ceil((shard_rows or batch_size * 64) / batch_size) * batch_size)
        return cls(corpus.checksum, len(corpus), encoder_fingerprint, int(batch_size), rows, int(max_length),
                   dtype, token_types, length_bucket or None, bool(sort_by_length))

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> EncodingJob:
        """The job a directory was started for (written by ``start_job``)."""
        return cls(**json.loads((Path(out_dir) / JOB_FILE).read_text()))

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.count / self.shard_rows))

    def rows_in(self, shard: int) -> int:
        return max(0, min(self.shard_rows, self.count - shard * self.shard_rows))

    def missing(self, out_dir: str | os.PathLike) -> list[int]:
        """The shards not yet complete in ``out_dir``, in order."""
        out = Path(out_dir)
        return [s for s in range(self.num_shards) if not _shard_complete(out / shard_name(s), self.rows_in(s))]


def start_job(out_dir: str | os.PathLike, job: EncodingJob,
              on_other_job: Callable[[str], None] | None = None) -> list[int]:
    """Prepares ``out_dir`` for ``job`` and returns the shards still to encode.

    A directory holding a run of the same job keeps its complete shards (a
    complete store: nothing to encode). One holding another job raises
    ValueError naming what differs, or, with ``on_other_job``, calls it with
    the difference and starts over in an emptied directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = asdict(job)
    other = _other_job(out, settings)
    if other is not None:
        if on_other_job is None:
            raise ValueError(f"{out}: holds a different encoding job ({other}); use another directory or delete it")
        on_other_job(other)
        shutil.rmtree(out)
        out.mkdir(parents=True)
    _write_job(out, settings)
    return [] if (out / STORE_MANIFEST).is_file() else job.missing(out)


def encode_shards(
    corpus: Corpus,
    encoder: Any,
    out_dir: str | os.PathLike,
    job: EncodingJob,
    shards: Sequence[int],
    *,
    tokenize: Callable[[Sequence[str], Sequence[str]], dict[str, np.ndarray]] | None = None,
    tokenizer: Any = None,
    mesh: Mesh | None = None,
    batch_axis: str = "data",
    progress: bool = True,
    progress_desc: str = "encode",
    progress_done: int = 0,
) -> None:
    """Encodes the given shards of ``job`` into ``out_dir`` (each saved atomically).

    Runs on ``mesh`` (default: this process's devices) and nothing else, so
    processes encoding different shards of one directory never wait for each
    other. The progress bar counts ``progress_done`` rows as already done.
    """
    if (corpus.checksum, len(corpus)) != (job.corpus_checksum, job.count):
        raise ValueError(f"{out_dir}: its encoding job is for another corpus than {corpus.path}")
    mesh = mesh or data_mesh()
    n_data = mesh.shape[batch_axis]
    # Every call has this fixed shape (the encoder compiles once per length bucket).
    call_rows = int(math.ceil(job.batch_size / n_data) * n_data)
    if tokenize is None:
        tokenizer = tokenizer if tokenizer is not None else getattr(encoder, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenize= or tokenizer=, or an encoder with .tokenizer")
        tokenize = make_context_tokenize(tokenizer, job.max_length, job.token_types)
    out = Path(out_dir)
    run = _batch_encoder(encoder, mesh, batch_axis)
    total = progress_done + sum(job.rows_in(s) for s in shards)
    bar = _progress(progress, progress_desc, total=total, unit="psg", initial=progress_done)
    try:
        for s in shards:
            start, rows = s * job.shard_rows, job.rows_in(s)
            tokens, order = _shard_tokens(corpus, tokenize, start, rows, job)
            pad_row = tokenize([""], [""])  # fixed shapes: calls are filled with empty passages
            pieces = []
            pending = None  # one batch in flight: gather the next while the device works
            for b0 in range(0, rows, job.batch_size):
                picked = order[b0 : b0 + job.batch_size]
                n = len(picked)
                # Empty passages (3 tokens) do not change the batch's length bucket (its longest passage).
                batch = {k: np.concatenate([v[picked], np.repeat(pad_row[k], call_rows - n, axis=0)])
                         for k, v in tokens.items()}
                result = run(_trim(batch, job.length_bucket))
                if pending is not None:
                    pieces.append(_fetch(*pending, bar))
                pending = (result, picked)
            if pending is not None:
                pieces.append(_fetch(*pending, bar))
            save_npy_atomic(out / shard_name(s), to_storage(_in_corpus_order(pieces, rows), job.dtype))
            fault_point(f"shard-{s}")
    finally:
        if bar is not None:
            bar.close()


def finish_job(out_dir: str | os.PathLike, job: EncodingJob) -> EmbeddingStore:
    """Writes the store manifest once every shard of ``job`` is complete (then the store is usable)."""
    out = Path(out_dir)
    if not (out / STORE_MANIFEST).is_file():
        missing = job.missing(out)
        if missing:
            shown = ", ".join(shard_name(s) for s in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise ValueError(f"{out}: {len(missing)} of {job.num_shards} embedding shards are missing or "
                             f"incomplete ({shown})")
        dim = int(np.load(out / shard_name(0), mmap_mode="r").shape[1])
        write_store_manifest(out, dim, job.count, job.dtype, job.shard_rows,
                             [shard_name(s) for s in range(job.num_shards)], job.encoder_fingerprint,
                             job.corpus_checksum, job=asdict(job))
    return EmbeddingStore(out)


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
    length_bucket: int | None = 16,
    sort_by_length: bool = True,
    progress: bool = True,
    on_other_job: Callable[[str], None] | None = None,
) -> EmbeddingStore:
    """Encodes every corpus passage into an embedding store at ``out_dir`` (resumable).

    ``encoder`` is an object from ``rag_jax.load_encoder`` (its pure
    ``apply_fn``/``params`` are jitted with batch-sharded inputs) or a
    function ``encode_fn(input_ids [N, L], attention_mask [N, L]) -> [N, D]``
    called with batch-sharded jax arrays. ``batch_size`` rows are encoded at
    once, split over the mesh's ``data`` axis (padded to a multiple of its
    size). ``sort_by_length`` batches each shard's passages in order of
    token length (the embeddings are written in corpus order), so that a
    batch holds passages of nearly one length; ``length_bucket`` then trims
    each batch's padding to the next multiple of it above the batch's longest
    passage (at most ``max_length / length_bucket`` compiled shapes, each
    compiled once per process); ``None`` always pads to ``max_length``.
    Sorting and trimming only change which passages share a call and how
    much masked padding it carries, so the embeddings do not change beyond
    float rounding.

    ``out_dir`` may hold an unfinished (or finished) run of the same job,
    which is resumed (or returned). If it holds a different job, ValueError
    names what differs; with ``on_other_job`` that function is called with
    the difference and the directory is emptied and started over.
    (``start_job`` / ``encode_shards`` / ``finish_job`` are the steps, for a
    job split over processes.)
    """
    job = EncodingJob.for_corpus(
        corpus, encoder_fingerprint=encoder_fingerprint or _fingerprint(encoder), batch_size=batch_size,
        shard_rows=shard_rows, max_length=max_length, dtype=dtype, token_types=token_types,
        length_bucket=length_bucket, sort_by_length=sort_by_length,
    )
    missing = start_job(out_dir, job, on_other_job)
    if missing:
        done = job.count - sum(job.rows_in(s) for s in missing)
        encode_shards(corpus, encoder, out_dir, job, missing, tokenize=tokenize, tokenizer=tokenizer, mesh=mesh,
                      batch_axis=batch_axis, progress=progress, progress_done=done)
    return finish_job(out_dir, job)


def _trim(batch: dict[str, np.ndarray], bucket: int | None) -> dict[str, np.ndarray]:
    if not bucket:
        return batch
    full = batch["input_ids"].shape[1]
    longest = int(batch["attention_mask"].sum(1).max(initial=1))
    keep = min(full, int(math.ceil(longest / bucket) * bucket))
    return {k: v[:, :keep] for k, v in batch.items()}


def _shard_tokens(corpus: Corpus, tokenize: Callable[..., dict[str, np.ndarray]], start: int, rows: int,
                  job: EncodingJob) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The shard's rows tokenized (to ``max_length``), and the order in which
    they are batched: by token length when ``job.sort_by_length`` (each batch
    then holds passages of nearly one length, so trimming to the bucket leaves
    little padding), else corpus order. Ties keep corpus order (stable), so
    the batches, and hence the shard's bytes, are the same on every run."""
    parts = [tokenize(*corpus.batch(b0, min(b0 + job.batch_size, start + rows)))
             for b0 in range(start, start + rows, job.batch_size)]
    tokens = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not job.sort_by_length:
        return tokens, np.arange(rows)
    return tokens, np.argsort(tokens["attention_mask"].sum(1), kind="stable")


def _fetch(result: Any, picked: np.ndarray, bar: Any) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(jax.device_get(result), np.float32)[: len(picked)]
    if bar is not None:
        bar.update(len(picked))
    return picked, arr


def _in_corpus_order(pieces: Sequence[tuple[np.ndarray, np.ndarray]], rows: int) -> np.ndarray:
    """The batches' embeddings put back at their shard rows."""
    out = np.empty((rows, pieces[0][1].shape[1]), np.float32)
    for picked, arr in pieces:
        out[picked] = arr
    return out


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
