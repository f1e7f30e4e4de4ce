"""Document-embedding stores: sharded ``.npy`` files in corpus row order.

A store directory holds ``shard-00000.npy`` ... (each ``shard_rows`` rows but
the last) and ``embeddings.json``, written last, which marks it complete.
Shards are memory-mapped, so gathering the top-k rows for ``doc_scores``
reads k rows from disk, not the whole matrix.

Also here: importing embeddings users already have (DPR's released
``wikipedia_passages_*`` pickles, or a ``.npy`` array with an id list),
re-ordered into corpus row order and checked against the corpus ids.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from rag_jax.retrieval.corpus import Corpus, CorpusError, _progress, atomic_dir, commit_dir

STORE_MANIFEST = "embeddings.json"
STORE_FORMAT = "rag_jax.embeddings/1"
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}
# import_embeddings' float32 scratch matrix: OUT_DIR + this suffix, deleted when done
# (index builds also delete one a killed import left behind).
IMPORT_SCRATCH_SUFFIX = ".import.f32"


def np_dtype(name: str) -> Any:
    """numpy dtype for a store dtype name (bfloat16 through ml_dtypes, which jax ships)."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in STORAGE_DTYPES:
        raise ValueError(f"embedding dtype {name!r} not supported; choose one of {sorted(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def to_storage(block: np.ndarray, dtype: str) -> np.ndarray:
    """Casts float32 rows to the store dtype; bfloat16 is saved as its uint16 bits
    (``.npy`` has no bfloat16 type) and viewed back on load."""
    out = np.asarray(block, np.float32).astype(np_dtype(dtype))
    return out.view(np.uint16) if dtype == "bfloat16" else out


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """Writes ``path`` through a temporary file and a rename: a killed job never leaves half a shard."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EmbeddingStore:
    """Read-only view of a complete store: ``get(rows) -> float32 [len(rows), D]``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        mf = self.path / STORE_MANIFEST
        if not mf.is_file():
            raise FileNotFoundError(f"{self.path}: not a complete embedding store (no {STORE_MANIFEST})")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mf}: invalid JSON ({e})") from e
        if self.manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"{mf}: format {self.manifest.get('format')!r}, expected {STORE_FORMAT!r}")
        self.dim = int(self.manifest["dim"])
        self.count = int(self.manifest["count"])
        self.dtype = str(self.manifest["dtype"])
        self.shard_rows = int(self.manifest["shard_rows"])
        self.encoder_fingerprint = self.manifest.get("encoder_fingerprint")
        self.corpus_checksum = self.manifest.get("corpus_checksum")
        self._shards = []
        total = 0
        for name in self.manifest["shards"]:
            arr = np.load(self.path / name, mmap_mode="r")
            if self.dtype == "bfloat16":
                arr = arr.view(np_dtype("bfloat16"))
            if arr.ndim != 2 or arr.shape[1] != self.dim:
                raise ValueError(f"{self.path / name}: shape {arr.shape}, expected [*, {self.dim}]")
            self._shards.append(arr)
            total += arr.shape[0]
        if total != self.count:
            raise ValueError(f"{self.path}: shards hold {total} rows, manifest says {self.count}")

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.dim)

    def get(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """float32 rows in the given order and shape ``rows.shape + (D,)``."""
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.count):
            raise IndexError(f"row out of range [0, {self.count}) in embedding store {self.path}")
        out = np.empty((flat.size, self.dim), np.float32)
        shard = flat // self.shard_rows
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = flat[sel] - s * self.shard_rows
            order = np.argsort(local)  # sorted reads keep page faults sequential
            out[sel[order]] = np.asarray(self._shards[int(s)][local[order]], np.float32)
        return out.reshape(rows.shape + (self.dim,))

    def iter_blocks(self) -> Iterator[np.ndarray]:
        for arr in self._shards:
            yield np.asarray(arr, np.float32)

    def to_array(self) -> np.ndarray:
        """All rows as one float32 array (for building an index)."""
        out = np.empty((self.count, self.dim), np.float32)
        pos = 0
        for block in self.iter_blocks():
            out[pos : pos + len(block)] = block
            pos += len(block)
        return out

    def nbytes(self) -> int:
        return sum((self.path / n).stat().st_size for n in self.manifest["shards"])


def write_store_manifest(
    root: Path,
    dim: int,
    count: int,
    dtype: str,
    shard_rows: int,
    shards: Sequence[str],
    encoder_fingerprint: str | None,
    corpus_checksum: str | None,
    **extra: Any,
) -> None:
    manifest = {
        "format": STORE_FORMAT,
        "dim": int(dim),
        "count": int(count),
        "dtype": dtype,
        "shard_rows": int(shard_rows),
        "shards": list(shards),
        "encoder_fingerprint": encoder_fingerprint,
        "corpus_checksum": corpus_checksum,
        **extra,
    }
    tmp = root / (STORE_MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, root / STORE_MANIFEST)


def write_store(
    array: np.ndarray,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    shard_rows: int = 1 << 20,
    encoder_fingerprint: str | None = None,
    corpus_checksum: str | None = None,
    overwrite: bool = False,
    **extra: Any,
) -> EmbeddingStore:
    """Writes an in-memory (or memory-mapped) ``[N, D]`` array as a store, atomically."""
    array = np.asarray(array) if not isinstance(array, np.memmap) else array
    if array.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {array.shape}")
    out = Path(out_dir)
    tmp = atomic_dir(out, overwrite)
    try:
        names = []
        for i, start in enumerate(range(0, max(len(array), 1), shard_rows)):
            block = to_storage(array[start : start + shard_rows], dtype)
            save_npy_atomic(tmp / shard_name(i), block)
            names.append(shard_name(i))
        write_store_manifest(tmp, array.shape[1], len(array), dtype, shard_rows, names, encoder_fingerprint, corpus_checksum, **extra)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EmbeddingStore(out)


# ---------------------------------------------------------------------------
# Importing precomputed embeddings
# ---------------------------------------------------------------------------


def normalize_dpr_id(pid: Any) -> str:
    """DPR writes ids as ``"wiki:123"`` (newer) or ``123``/``"123"`` (older); the corpus holds ``"123"``."""
    s = str(pid.decode() if isinstance(pid, bytes) else pid).strip()
    if ":" in s:
        s = s.rsplit(":", 1)[1]
    return s


def _fill_rows(
    pairs: Iterable[tuple[Sequence[str], np.ndarray, str]],
    corpus: Corpus,
    out: np.ndarray,
    seen: np.ndarray,
    bar: Any,
) -> None:
    for ids, vecs, where in pairs:
        if vecs.ndim != 2 or vecs.shape[1] != out.shape[1]:
            raise ValueError(f"{where}: vectors of shape {vecs.shape}, expected [*, {out.shape[1]}]")
        try:
            rows = corpus.rows_of([normalize_dpr_id(p) for p in ids])
        except KeyError as e:
            raise CorpusError(f"{where}: {e.args[0]}") from None
        dup = seen[rows]
        if dup.any():
            j = int(np.nonzero(dup)[0][0])
            raise CorpusError(f"{where}: passage id {ids[j]!r} has more than one embedding")
        if len(np.unique(rows)) != len(rows):
            raise CorpusError(f"{where}: a passage id appears twice in the same file")
        seen[rows] = True
        out[rows] = vecs
        if bar is not None:
            bar.update(len(rows))


def _pickle_pairs(files: Sequence[str]) -> Iterator[tuple[list[str], np.ndarray, str]]:
    for f in files:
        # Pickles can run code when loaded: only import files you produced or trust.
        with open(f, "rb") as fh:
            data = pickle.load(fh)
        if not isinstance(data, (list, tuple)) or not data:
            raise ValueError(f"{f}: expected a non-empty list of (id, vector) pairs")
        try:
            ids = [p[0] for p in data]
            vecs = np.stack([np.asarray(p[1], np.float32).reshape(-1) for p in data])
        except (TypeError, IndexError, ValueError) as e:
            raise ValueError(f"{f}: expected a list of (id, vector) pairs ({e})") from e
        yield ids, vecs, f


def import_embeddings(
    corpus: Corpus,
    out_dir: str | os.PathLike,
    *,
    dpr_pickles: str | Sequence[str] | None = None,
    npy: str | None = None,
    ids: str | Sequence[str] | None = None,
    dtype: str = "float32",
    encoder_fingerprint: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    inputs: dict | None = None,
) -> EmbeddingStore:
    """Imports precomputed embeddings into a store in ``corpus`` row order.

    Either ``dpr_pickles`` (a glob such as ``wikipedia_passages_*.pkl`` or a
    list of files, each a pickled list of ``(id, vector)``), or ``npy`` (an
    ``[N, D]`` array) with ``ids`` (a text file with one id per line, a
    ``.npy``/``.json`` list, or a sequence). Every corpus passage must get
    exactly one vector; unknown ids, duplicates and gaps are errors.
    ``inputs`` (fingerprints of the imported files) is kept in the manifest,
    so that a resumed build reuses the store only for the same files.
    """
    if (dpr_pickles is None) == (npy is None):
        raise ValueError("give exactly one of dpr_pickles= or npy= (with ids=)")
    if npy is not None:
        arr = np.load(npy, mmap_mode="r")
        if arr.ndim != 2:
            raise ValueError(f"{npy}: expected a [N, D] array, got shape {arr.shape}")
        id_list = _read_ids(ids, npy)
        if len(id_list) != arr.shape[0]:
            raise ValueError(f"{npy}: {arr.shape[0]} vectors but {len(id_list)} ids")
        dim = arr.shape[1]
        chunk = 1 << 16
        pairs = (
            (id_list[s : s + chunk], np.asarray(arr[s : s + chunk], np.float32), f"{npy} rows {s}..{min(s + chunk, len(id_list)) - 1}")
            for s in range(0, len(id_list), chunk)
        )
    else:
        files = sorted(glob.glob(dpr_pickles)) if isinstance(dpr_pickles, str) else list(dpr_pickles)
        if not files:
            raise FileNotFoundError(f"no files match {dpr_pickles!r}")
        first = _pickle_pairs(files[:1])
        ids0, vecs0, f0 = next(first)
        dim = vecs0.shape[1]
        pairs = _chain([(ids0, vecs0, f0)], _pickle_pairs(files[1:]))
    work = Path(str(out_dir) + IMPORT_SCRATCH_SUFFIX)
    out = np.lib.format.open_memmap(work, mode="w+", dtype=np.float32, shape=(len(corpus), dim))
    seen = np.zeros(len(corpus), bool)
    bar = _progress(progress, "import", total=len(corpus), unit="psg")
    try:
        _fill_rows(pairs, corpus, out, seen, bar)
        if not seen.all():
            missing = np.nonzero(~seen)[0]
            raise CorpusError(
                f"{npy if npy is not None else dpr_pickles}: {len(missing)} of {len(corpus)} corpus passages "
                "have no embedding "
                f"(first: id {corpus.id(int(missing[0]))!r} at row {int(missing[0])})"
            )
        out.flush()
        return write_store(
            out, out_dir, dtype=dtype, encoder_fingerprint=encoder_fingerprint,
            corpus_checksum=corpus.checksum, overwrite=overwrite, imported=True, inputs=inputs,
        )
    finally:
        if bar is not None:
            bar.close()
        del out
        work.unlink(missing_ok=True)


def _chain(*its: Iterable) -> Iterator:
    for it in its:
        yield from it


def _read_ids(ids: str | Sequence[str] | None, npy: str) -> list[str]:
    if ids is None:
        raise ValueError(f"{npy}: an id list (ids=) is required to import a .npy array")
    if not isinstance(ids, (str, os.PathLike)):
        return [str(i) for i in ids]
    p = str(ids)
    if p.endswith(".npy"):
        return [str(i) for i in np.load(p, allow_pickle=False).tolist()]
    if p.endswith(".json"):
        return [str(i) for i in json.loads(Path(p).read_text())]
    with open(p, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
