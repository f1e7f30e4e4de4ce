"""Maximum-inner-product search: exact (jitted, optionally corpus-sharded) and ScaNN.

Both implement ``search(queries [Q, D] float32, k) -> (rows [Q, k] int64,
scores [Q, k] float32)``; ``rows`` are corpus rows, which are also the rows
of the stored embeddings (``index.embeddings.get(rows)``) and of the corpus
(``corpus.title(row)``). Best first.

An index directory:

    manifest.json   kind, dim, count, dtype, encoder fingerprint, corpus
                    checksum, search parameters; written last
    embeddings/     the float32 (or f16/bf16) document embeddings, memory-mapped
                    (kinds "scann" and "exact")
    scann/          the serialized ScaNN searcher (kind "scann")
    bm25/           the bm25s index and its tokenizer (kind "bm25": searched
                    with question strings, no embeddings, ``dim`` null)
    corpus/         the passages (optional; may live elsewhere)

Directories are built under a temporary name and renamed into place, so an
interrupted build never leaves something that loads as complete.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rag_jax.retrieval.bm25 import Bm25Index, Bm25Params
from rag_jax.retrieval.corpus import Corpus, atomic_dir, commit_dir
from rag_jax.retrieval.embeddings import EmbeddingStore, write_store

INDEX_MANIFEST = "manifest.json"
INDEX_FORMAT = "rag_jax.index/1"
INDEX_KINDS = ("scann", "exact", "bm25")
BRUTE_FORCE_BELOW = 20_000
REORDER_DTYPES = ("memmap", "int8", "bfloat16", "float32", "none")


class IndexMismatchError(ValueError):
    """An index does not belong to the given corpus or encoder."""


# ---------------------------------------------------------------------------
# Exact search
# ---------------------------------------------------------------------------


def _bucket(q: int) -> int:
    # Powers of two keep the number of compiled query shapes small.
    return max(8, 1 << (q - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("k",))
def exact_topk(queries: jax.Array, docs: jax.Array, n_valid: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Unsharded exact top-k: rows at or past ``n_valid`` are padding."""
    s = jnp.dot(queries, docs.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    valid = jnp.arange(docs.shape[0]) < n_valid
    s = jnp.where(valid[None, :], s, -jnp.inf)
    v, i = jax.lax.top_k(s, k)
    return i, v


def make_sharded_topk(mesh: Mesh, axis: str | tuple[str, ...], k: int):  # noqa: ANN201 - returns a jitted function
    """Exact top-k with the corpus rows sharded over ``axis``: local top-k, all-gather, merge.

    Only ``k`` candidates per shard cross the interconnect instead of the
    full ``[Q, N]`` score matrix. Shards are gathered in row order, so ties
    resolve to the lowest row exactly as the unsharded ``lax.top_k`` does.
    """
    axes = axis if isinstance(axis, tuple) else (axis,)

    def local(q: jax.Array, e: jax.Array, n_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        rows_per_shard = e.shape[0]
        shard = jax.lax.axis_index(axes)
        first = shard * rows_per_shard
        s = jnp.dot(q, e.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        valid = (first + jnp.arange(rows_per_shard)) < n_valid
        s = jnp.where(valid[None, :], s, -jnp.inf)
        v, i = jax.lax.top_k(s, k)
        v_all = jax.lax.all_gather(v, axes, axis=1, tiled=True)
        i_all = jax.lax.all_gather(i + first, axes, axis=1, tiled=True)
        v2, j = jax.lax.top_k(v_all, k)
        return jnp.take_along_axis(i_all, j, axis=1), v2

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P()), out_specs=(P(), P()), check_vma=False)
    return jax.jit(fn)


class ExactIndex:
    """Brute-force MIPS on device: the reference every approximate index is measured against.

    With a ``mesh``, the corpus rows are sharded over ``axis`` (padded to a
    multiple of the shard count); the query batch is replicated.
    """

    kind = "exact"

    def __init__(
        self,
        embeddings: np.ndarray,
        mesh: Mesh | None = None,
        axis: str | tuple[str, ...] = "data",
        query_chunk: int = 256,
    ) -> None:
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be [N, D], got {emb.shape}")
        self.count, self.dim = emb.shape
        self.mesh = mesh
        self.axis = axis
        self.query_chunk = query_chunk
        if mesh is not None:
            axes = axis if isinstance(axis, tuple) else (axis,)
            self._shards = math.prod(mesh.shape[a] for a in axes)
            per = max(math.ceil(self.count / self._shards), 1)
            pad = per * self._shards - self.count
            emb = np.concatenate([emb, np.zeros((pad, self.dim), np.float32)]) if pad else emb
            self._docs = jax.device_put(emb, NamedSharding(mesh, P(axes)))
            self._rows_per_shard = per
            self._fns: dict[int, Any] = {}
        else:
            self._shards = 1
            self._rows_per_shard = self.count
            self._docs = jnp.asarray(emb)
        self._n_valid = jnp.asarray(self.count, jnp.int32)

    def _run(self, q: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        if self.mesh is None:
            return exact_topk(q, self._docs, self._n_valid, k)
        if k not in self._fns:
            self._fns[k] = make_sharded_topk(self.mesh, self.axis, k)
        return self._fns[k](q, self._docs, self._n_valid)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.dim)
        k = _check_k(k, self.count, self._rows_per_shard)
        rows_out, scores_out = [], []
        for start in range(0, len(queries), self.query_chunk):
            chunk = queries[start : start + self.query_chunk]
            b = min(_bucket(len(chunk)), max(self.query_chunk, 8))
            padded = np.zeros((b, self.dim), np.float32)
            padded[: len(chunk)] = chunk
            i, v = self._run(jnp.asarray(padded), k)
            rows_out.append(np.asarray(i)[: len(chunk)])
            scores_out.append(np.asarray(v)[: len(chunk)])
        if not rows_out:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.concatenate(rows_out).astype(np.int64), np.concatenate(scores_out).astype(np.float32)


def _check_queries(queries: Any, dim: int) -> np.ndarray:
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be [Q, {dim}], got shape {q.shape}")
    return q


def _check_k(k: int, count: int, per_shard: int | None = None) -> int:
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > count:
        raise ValueError(f"k={k} exceeds the {count} passages in the index")
    if per_shard is not None and k > per_shard:
        raise ValueError(f"k={k} exceeds the {per_shard} rows per shard; use fewer shards")
    return k


# ---------------------------------------------------------------------------
# ScaNN
# ---------------------------------------------------------------------------


@dataclass
class ScannParams:
    """ScaNN configuration; :meth:`for_size` picks defaults from the corpus size."""

    brute_force: bool = False
    num_leaves: int = 0
    num_leaves_to_search: int = 0
    training_sample_size: int = 100_000
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder_k: int = 200
    # Where the exact re-ordering reads vectors: the memory-mapped float32
    # store ("memmap", default: only the hashed codes and partitions stay
    # resident, ~13% of float32 at 768-d, and re-ordering is exact; recall is higher than
    # int8 at equal speed while the store is in the page cache), ScaNN's own
    # copy ("int8" ~38% of float32 resident, "bfloat16", "float32"), or
    # nowhere ("none": hashed scores only).
    reorder_dtype: str = "memmap"
    num_neighbors: int = 10
    # k-means centre initialization of the tree. ScaNN's random initialization
    # ignores every seed: two builds from the same embeddings give different
    # partitions, codebooks and search results (measured: every run differed,
    # with 1 or 2 training threads, idle or loaded). k-means++ is seeded, so the
    # same embeddings give a byte-identical index whatever the thread count
    # or load, at a slower partitioner training (3.7 s -> 26-30 s for 316
    # leaves on 100k x 128 rows, 2 loaded cores). True restores ScaNN's default.
    random_init: bool = False

    @classmethod
    def for_size(cls, n: int, **overrides: Any) -> "ScannParams":
        """Defaults for ``n`` rows (brute force below ``BRUTE_FORCE_BELOW``), then ``overrides``.

        The result records only what the searcher uses: with brute force the
        tree and re-ordering fields are zeroed (an override of them is then
        not applied; :func:`unapplied_scann_overrides` lists such overrides)
        and the re-ordering dtype is the one brute force scores with.
        """
        p = cls()
        for key, value in overrides.items():
            if value is None:
                continue
            if not hasattr(p, key):
                raise ValueError(f"unknown ScaNN parameter {key!r}; known: {sorted(asdict(p))}")
            setattr(p, key, type(getattr(p, key))(value))
        if overrides.get("brute_force") is None:
            p.brute_force = n < BRUTE_FORCE_BELOW
        if p.reorder_dtype not in REORDER_DTYPES:
            raise ValueError(f"reorder_dtype must be one of {REORDER_DTYPES}, got {p.reorder_dtype!r}")
        if p.brute_force:
            p.num_leaves = p.num_leaves_to_search = p.training_sample_size = p.dims_per_block = p.reorder_k = 0
            p.anisotropic_quantization_threshold = 0.0
            p.random_init = False
            if p.reorder_dtype not in _SCANN_REORDER:
                p.reorder_dtype = "float32"  # brute force scores exactly in float32 without a quantized copy
            return p
        if not overrides.get("num_leaves"):
            p.num_leaves = max(2, int(round(math.sqrt(n))))
        if not overrides.get("num_leaves_to_search"):
            # ~5% of the leaves: recall@10 >= 0.95 on clustered embeddings in our tests/benchmarks.
            p.num_leaves_to_search = min(p.num_leaves, max(8, int(math.ceil(p.num_leaves * 0.05))))
        if not overrides.get("training_sample_size"):
            p.training_sample_size = min(n, 250_000)
        if not 1 <= p.num_leaves <= n:
            raise ValueError(f"num_leaves={p.num_leaves} must be between 1 and the {n} passages")
        if not 1 <= p.num_leaves_to_search <= p.num_leaves:
            raise ValueError(f"num_leaves_to_search={p.num_leaves_to_search} must be between 1 and "
                             f"num_leaves={p.num_leaves}")
        return p


_SCANN_REORDER = ("float32", "int8", "bfloat16")


def unapplied_scann_overrides(params: ScannParams, overrides: dict[str, Any]) -> list[str]:
    """The ``overrides`` given to :meth:`ScannParams.for_size` that ``params`` does not apply."""
    return [k for k, v in overrides.items()
            if v is not None and getattr(params, k) != type(getattr(params, k))(v)]


def _scann():  # noqa: ANN202
    import scann  # heavy native import: only when a ScaNN index is used

    return scann


def build_scann_searcher(embeddings: np.ndarray, params: ScannParams):  # noqa: ANN201
    scann = _scann()
    from scann.scann_ops.py.scann_builder import ReorderType

    db = np.ascontiguousarray(embeddings, np.float32)
    b = scann.scann_ops_pybind.builder(db, params.num_neighbors, "dot_product")
    rtype = dict(zip(_SCANN_REORDER, (ReorderType.FLOAT32, ReorderType.INT8, ReorderType.BFLOAT16)))
    if params.brute_force:
        b = b.score_brute_force(rtype.get(params.reorder_dtype, ReorderType.FLOAT32))
    else:
        b = b.tree(
            num_leaves=params.num_leaves,
            num_leaves_to_search=params.num_leaves_to_search,
            training_sample_size=min(params.training_sample_size, len(db)),
            random_init=params.random_init,
        )
        b = b.score_ah(params.dims_per_block, anisotropic_quantization_threshold=params.anisotropic_quantization_threshold)
        if params.reorder_dtype in rtype:
            b = b.reorder(params.reorder_k, quantize=rtype[params.reorder_dtype])
    return b.build()


class ScannIndex:
    """ScaNN searcher: tree partitioning + anisotropic hashing + exact re-ordering."""

    kind = "scann"

    def __init__(self, searcher: Any, count: int, dim: int, params: ScannParams, rerank_source: Any = None) -> None:
        self.searcher = searcher
        self.count = count
        self.dim = dim
        self.params = params
        # Anything with ``get(rows) -> float32 [..., D]`` (an EmbeddingStore) for reorder_dtype="memmap".
        self.rerank_source = rerank_source

    @classmethod
    def build(cls, embeddings: np.ndarray, params: ScannParams | None = None) -> "ScannIndex":
        emb = np.asarray(embeddings, np.float32)
        params = params or ScannParams.for_size(len(emb))
        return cls(build_scann_searcher(emb, params), emb.shape[0], emb.shape[1], params, _ArrayRows(emb))

    def search(
        self, queries: np.ndarray, k: int, leaves_to_search: int | None = None, reorder_k: int | None = None,
        parallel: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        q = _check_queries(queries, self.dim)
        k = _check_k(k, self.count)
        if not len(q):
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        p = self.params
        reorder_k = max(reorder_k if reorder_k is not None else p.reorder_k, k)
        leaves = leaves_to_search if not p.brute_force else None
        fn = self.searcher.search_batched_parallel if parallel else self.searcher.search_batched
        if p.reorder_dtype == "memmap" and not p.brute_force:
            if self.rerank_source is None:
                raise ValueError("reorder_dtype='memmap' needs the stored embeddings (load through load_index)")
            cand, _ = fn(q, final_num_neighbors=min(reorder_k, self.count), leaves_to_search=leaves)
            return rerank_exact(q, np.asarray(cand, np.int64), self.rerank_source, k)
        pre = reorder_k if p.reorder_dtype != "none" and not p.brute_force else None
        rows, scores = fn(q, final_num_neighbors=k, pre_reorder_num_neighbors=pre, leaves_to_search=leaves)
        return np.asarray(rows, np.int64), np.asarray(scores, np.float32)

    def serialize(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        # Relative paths keep the artifacts valid after the directory is renamed.
        self.searcher.serialize(str(path), relative_path=True)

    @classmethod
    def load(cls, path: Path, count: int, dim: int, params: ScannParams, rerank_source: Any = None) -> "ScannIndex":
        scann = _scann()
        return cls(scann.scann_ops_pybind.load_searcher(str(path)), count, dim, params, rerank_source)


class _ArrayRows:
    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr

    def get(self, rows: np.ndarray) -> np.ndarray:
        return self.arr[rows]


def rerank_exact(queries: np.ndarray, candidates: np.ndarray, source: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 scores for ``[Q, R]`` candidate rows (read from ``source``), best ``k`` kept."""
    vecs = source.get(candidates)  # [Q, R, D]: only the candidates' rows are read
    scores = np.einsum("qd,qrd->qr", queries, vecs)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(scores, order, 1).astype(np.float32)


# ---------------------------------------------------------------------------
# Index directories
# ---------------------------------------------------------------------------


@dataclass
class LoadedIndex:
    """A loaded index directory: searcher, memory-mapped embeddings (None for BM25), manifest, corpus."""

    path: Path
    manifest: dict
    searcher: Any
    embeddings: EmbeddingStore | None
    corpus: Corpus | None = None
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def dim(self) -> int | None:
        """The vectors' dimension; None for a BM25 index (it has none)."""
        return None if self.manifest.get("dim") is None else int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def search(self, queries: Any, k: int, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (rows, scores); ``queries`` are ``[Q, D]`` vectors, or question strings for BM25."""
        return self.searcher.search(queries, k, **kw)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_index(
    embeddings: EmbeddingStore | np.ndarray | str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str = "scann",
    corpus: Corpus | str | os.PathLike | None = None,
    include_corpus: bool = False,
    encoder_fingerprint: str | None = None,
    corpus_checksum: str | None = None,
    scann_params: ScannParams | dict | None = None,
    overwrite: bool = False,
    prebuilt: "ScannIndex | None" = None,
) -> Path:
    """Builds an index directory atomically and returns its path.

    ``embeddings`` is a store (or its path) or an array; a store's encoder
    fingerprint and corpus checksum carry over unless given here. The store
    is copied into ``out/embeddings``; with ``include_corpus`` the corpus
    directory is copied into ``out/corpus``.
    ``prebuilt`` saves an already built :class:`ScannIndex` over the same rows.
    """
    if kind not in ("scann", "exact"):
        raise ValueError(f"index kind must be 'scann' or 'exact', got {kind!r}")
    if isinstance(embeddings, (str, os.PathLike)):
        embeddings = EmbeddingStore(embeddings)
    if isinstance(corpus, (str, os.PathLike)):
        corpus = Corpus(corpus)
    if isinstance(embeddings, EmbeddingStore):
        encoder_fingerprint = encoder_fingerprint or embeddings.encoder_fingerprint
        corpus_checksum = corpus_checksum or embeddings.corpus_checksum
    if corpus is not None:
        n_emb = embeddings.count if isinstance(embeddings, EmbeddingStore) else len(embeddings)
        check_pairing(n_emb, corpus_checksum, corpus)
        corpus_checksum = corpus.checksum
    out = Path(out_dir)
    tmp = atomic_dir(out, overwrite)
    try:
        if isinstance(embeddings, EmbeddingStore):
            shutil.copytree(embeddings.path, tmp / "embeddings")
        else:
            write_store(np.asarray(embeddings, np.float32), tmp / "embeddings",
                        encoder_fingerprint=encoder_fingerprint, corpus_checksum=corpus_checksum)
        if include_corpus and corpus is not None:
            shutil.copytree(corpus.path, tmp / "corpus")
        write_index_files(tmp, kind, encoder_fingerprint, corpus_checksum, scann_params, prebuilt)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_pairing(n_embeddings: int, embeddings_corpus_checksum: str | None, corpus: Corpus) -> None:
    """IndexMismatchError unless the embeddings were computed for ``corpus``."""
    if embeddings_corpus_checksum is not None and embeddings_corpus_checksum != corpus.checksum:
        raise IndexMismatchError(
            f"embeddings were computed for corpus {embeddings_corpus_checksum}, but corpus {corpus.path} "
            f"is {corpus.checksum}"
        )
    if n_embeddings != len(corpus):
        raise IndexMismatchError(f"{n_embeddings} embeddings but corpus {corpus.path} has {len(corpus)} passages")


def write_index_files(
    root: Path,
    kind: str,
    encoder_fingerprint: str | None,
    corpus_checksum: str | None,
    scann_params: ScannParams | dict | None = None,
    prebuilt: "ScannIndex | None" = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Turns ``root`` (holding ``embeddings/``, optionally ``corpus/``) into an index directory.

    Builds the searcher into ``root/scann`` (kind "scann") and writes the
    manifest last, through a rename: the manifest is what marks the
    directory complete. ``extra`` items go into the manifest. Returns it.
    """
    if kind not in ("scann", "exact"):
        raise ValueError(f"index kind must be 'scann' or 'exact', got {kind!r}")
    t0 = time.perf_counter()
    store = EmbeddingStore(root / "embeddings")
    manifest: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "kind": kind,
        "dim": store.dim,
        "count": store.count,
        "dtype": store.dtype,
        "encoder_fingerprint": encoder_fingerprint,
        "corpus_checksum": corpus_checksum,
    }
    if kind == "scann":
        if prebuilt is not None:
            if (prebuilt.count, prebuilt.dim) != store.shape:
                raise ValueError(f"prebuilt ScaNN index is {prebuilt.count}x{prebuilt.dim}, embeddings {store.shape}")
            scann_params = prebuilt.params
            prebuilt.serialize(root / "scann")
        else:
            if isinstance(scann_params, dict) or scann_params is None:
                scann_params = ScannParams.for_size(store.count, **(scann_params or {}))
            data = store.to_array()
            ScannIndex.build(data, scann_params).serialize(root / "scann")
            del data
        manifest["scann"] = asdict(scann_params)
    manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
    # What must stay in RAM to search (the float32 store is memory-mapped and read per hit).
    manifest["search_bytes"] = _dir_bytes(root / "scann") if kind == "scann" else store.count * store.dim * 4
    manifest.update(extra or {})
    partial = root / (INDEX_MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, root / INDEX_MANIFEST)
    return manifest


def write_bm25_index_files(root: Path, corpus: Corpus, params: Bm25Params, progress: bool = True,
                           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Builds the BM25 index of ``corpus`` into ``root/bm25`` and writes the manifest last
    (through a rename: the manifest marks the directory complete). Returns it."""
    t0 = time.perf_counter()
    Bm25Index.build(corpus, params, progress=progress).save(root / "bm25")
    manifest: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "kind": "bm25",
        "dim": None,
        "count": len(corpus),
        "dtype": None,
        "encoder_fingerprint": None,
        "corpus_checksum": corpus.checksum,
        "bm25": asdict(params),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "search_bytes": _dir_bytes(root / "bm25"),
    }
    manifest.update(extra or {})
    partial = root / (INDEX_MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, root / INDEX_MANIFEST)
    return manifest


def index_kind(path: str | os.PathLike) -> str:
    """The kind (``INDEX_KINDS``) recorded in an index directory's manifest."""
    mf = Path(path) / INDEX_MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"{path}: not a complete index directory (no {INDEX_MANIFEST}; an interrupted build?)")
    try:
        return str(json.loads(mf.read_text())["kind"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{mf}: no readable index kind ({e})") from e


def load_index(
    path: str | os.PathLike,
    corpus: Corpus | str | os.PathLike | None = None,
    encoder_fingerprint: str | None = None,
    mesh: Mesh | None = None,
    axis: str | tuple[str, ...] = "data",
) -> LoadedIndex:
    """Loads an index directory, checking it against ``corpus`` and ``encoder_fingerprint``.

    Without ``corpus`` the index's own ``corpus/`` (if any) is opened. A
    different corpus checksum or encoder fingerprint raises
    :class:`IndexMismatchError`; an unfinished directory raises FileNotFoundError.
    """
    root = Path(path)
    mf = root / INDEX_MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"{root}: not a complete index directory (no {INDEX_MANIFEST}; an interrupted build?)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mf}: invalid JSON ({e})") from e
    if manifest.get("format") != INDEX_FORMAT:
        raise ValueError(f"{mf}: format {manifest.get('format')!r}, expected {INDEX_FORMAT!r}")
    if isinstance(corpus, (str, os.PathLike)):
        corpus = Corpus(corpus)
    if corpus is None and (root / "corpus" / "manifest.json").is_file():
        corpus = Corpus(root / "corpus")
    if corpus is not None:
        want = manifest.get("corpus_checksum")
        if want is not None and want != corpus.checksum:
            raise IndexMismatchError(
                f"{root}: index was built for corpus {want}, but {corpus.path} has checksum {corpus.checksum} "
                "(a different or modified passages file)"
            )
        if len(corpus) != int(manifest["count"]):
            raise IndexMismatchError(f"{root}: index has {manifest['count']} rows, corpus {corpus.path} has {len(corpus)}")
    if encoder_fingerprint is not None:
        have = manifest.get("encoder_fingerprint")
        if have is not None and have != encoder_fingerprint:
            raise IndexMismatchError(
                f"{root}: index was encoded with encoder {have[:16]}..., the given encoder is "
                f"{encoder_fingerprint[:16]}... (re-encode the corpus or pass the matching encoder)"
            )
    if manifest["kind"] == "bm25":
        bm25 = Bm25Index.load(root / "bm25", Bm25Params(**manifest["bm25"]), int(manifest["count"]))
        return LoadedIndex(root, manifest, bm25, None, corpus)
    store = EmbeddingStore(root / "embeddings")
    if store.count != int(manifest["count"]) or store.dim != int(manifest["dim"]):
        raise ValueError(f"{root}: embeddings {store.shape} disagree with manifest ({manifest['count']}, {manifest['dim']})")
    if manifest["kind"] == "scann":
        params = ScannParams(**manifest["scann"])
        searcher: Any = ScannIndex.load(root / "scann", store.count, store.dim, params, rerank_source=store)
    elif manifest["kind"] == "exact":
        searcher = ExactIndex(store.to_array(), mesh=mesh, axis=axis)
    else:
        raise ValueError(f"{mf}: unknown index kind {manifest['kind']!r}")
    return LoadedIndex(root, manifest, searcher, store, corpus)


def neighbor_recall(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_rows, exact_rows)]
    return float(np.sum(hits) / exact_rows.size)
