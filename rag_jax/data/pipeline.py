"""grain input pipeline over the TFDS QA dataset: shuffled, sharded, resumable.

Order of operations and why:
  source -> shard (static, equal sizes) -> shuffle(seed) -> repeat -> batch
* Sharding first, by stride, gives every process a disjoint slice; truncating
  to equal sizes keeps all processes stepping in lock-step (a multi-host jit
  step hangs if one host runs out of batches first).
* grain's shuffle folds the epoch into the seed, so every epoch differs yet
  the whole stream is a pure function of (seed, shard, position).
* Batches have a fixed size (drop remainder) so the jitted step never
  recompiles. Evaluation instead pads the final batch and marks the padding.
The iterator's state is grain's (``{"next_index": n}``-like, JSON-safe); it is
saved next to the model checkpoint and restoring it yields the same batches.
Rows stay raw strings: tokenization belongs to the trainer.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from rag_jax.data import tfds_builders


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def decode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """TFDS row (bytes) -> python strings."""
    return {
        "question": _text(row["question"]),
        "answer": _text(row["answer"]),
        "answers": [_text(a) for a in row["answers"]],
        "qid": int(row["qid"]),
    }


def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows -> one batch: lists of strings, numpy arrays for numbers."""
    return {
        "question": [r["question"] for r in rows],
        "answer": [r["answer"] for r in rows],
        "answers": [list(r["answers"]) for r in rows],
        "qid": np.asarray([r["qid"] for r in rows], np.int64),
        "mask": np.asarray([r.get("valid", True) for r in rows], bool),
    }


def process_shard() -> tuple[int, int]:
    """(index, count) of this process among all JAX processes."""
    import jax

    return jax.process_index(), jax.process_count()


def shard_dataset(ds: grain.MapDataset, index: int, count: int, equal: bool = True) -> grain.MapDataset:
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} outside [0, {count})")
    n = len(ds)
    if equal:
        per = n // count
        if per == 0:
            raise ValueError(f"{n} rows cannot feed {count} processes (need at least one row each)")
        return ds[index : per * count : count]
    return ds[index::count]


class QALoader:
    """Iterator of fixed-size batches with a saveable position.

    ``get_state()`` returns a JSON-safe dict; ``set_state`` on a loader built
    with the same arguments continues with exactly the batches the saved one
    would have produced next.
    """

    def __init__(self, ds: grain.MapDataset, num_threads: int, description: dict[str, Any]):
        self._ds = ds
        opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 1))
        self._iter_ds = ds.to_iter_dataset(opts)
        self._it = iter(self._iter_ds)
        self.description = description

    def __iter__(self) -> "QALoader":
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._it)

    def __len__(self) -> int:
        return len(self._ds)

    def get_state(self) -> dict[str, Any]:
        state = dict(self._it.get_state())
        # The description travels with the state so a restore into a pipeline
        # built differently (other seed, batch, shard) is caught, not silently wrong.
        return {"grain": state, "pipeline": self.description}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if "grain" not in state:
            raise ValueError(f"not a QALoader state: keys {sorted(state)}")
        saved = state.get("pipeline")
        if saved is not None and json.loads(json.dumps(saved)) != json.loads(json.dumps(self.description)):
            raise ValueError(f"data state was saved by a different pipeline: saved {saved}, now {self.description}")
        self._it = iter(self._iter_ds)
        self._it.set_state(dict(state["grain"]))


def make_loader(
    source: Any,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    num_threads: int = 2,
) -> QALoader:
    """Batches of QA rows from a random-access ``source`` (TFDS data source or list).

    ``batch_size`` is per process. ``num_epochs=None`` repeats forever
    (training); evaluation passes ``num_epochs=1, shuffle=False,
    drop_remainder=False``, which pads the last batch (``mask`` False on pads).
    Shard defaults come from ``jax.process_index()/process_count()``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not drop_remainder and num_epochs != 1:
        raise ValueError("padded batches (drop_remainder=False) are for one evaluation pass: set num_epochs=1")
    if shard_index is None or shard_count is None:
        shard_index, shard_count = process_shard()
    # The pipeline runs over row *indices*; rows are fetched one batch at a
    # time with the source's batched read (``__getitems__``), about 3x faster
    # than row-by-row reads of a TFDS array_record source.
    ds = shard_dataset(grain.MapDataset.range(len(source)), shard_index, shard_count, equal=drop_remainder)
    n_rows = len(ds)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs is None:
        ds = ds.repeat(None)
    elif num_epochs > 1:
        ds = ds.repeat(num_epochs)
    if drop_remainder:
        if n_rows < batch_size and num_epochs is not None:
            raise ValueError(f"{n_rows} rows per process cannot fill one batch of {batch_size}")
        ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_index_batch)
    else:
        # Every process gets as many batches as the largest shard needs, so
        # sharded eval programs stay in lock-step across hosts.
        longest = -(-len(source) // shard_count)
        ds = _padded_index_batches(ds, batch_size, -(-longest // batch_size))
    ds = ds.map(lambda idx: _read_batch(source, idx))
    desc = {
        "rows": n_rows, "batch_size": batch_size, "seed": seed, "shuffle": shuffle,
        "num_epochs": num_epochs, "shard": [shard_index, shard_count],
        "drop_remainder": drop_remainder,
    }
    return QALoader(ds, num_threads, desc)


def _index_batch(items: Sequence[int]) -> np.ndarray:
    return np.asarray(items, np.int64)


def _padded_index_batches(ds: grain.MapDataset, batch_size: int, n_batches: int) -> grain.MapDataset:
    n = len(ds)

    def get(i: int) -> np.ndarray:
        # -1 marks a padding slot.
        return np.asarray([ds[j] if j < n else -1 for j in range(i * batch_size, (i + 1) * batch_size)], np.int64)

    return grain.MapDataset.range(n_batches).map(get)


_PAD_ROW = {"question": "", "answer": "", "answers": [], "qid": -1, "valid": False}


def _read_batch(source: Any, idx: np.ndarray) -> dict[str, Any]:
    real = [int(i) for i in idx if i >= 0]
    getitems = getattr(source, "__getitems__", None)
    raw = list(getitems(real)) if getitems is not None and real else [source[i] for i in real]
    rows = iter(decode_row(r) for r in raw)
    return collate([next(rows) if i >= 0 else _PAD_ROW for i in idx])


def qa_loader_from_dir(
    dataset_dir: str | os.PathLike, split: str, batch_size: int, **kw: Any
) -> QALoader:
    """``make_loader`` over a split of a dataset built by ``build_qa_dataset``."""
    return make_loader(tfds_builders.open_split(dataset_dir, split), batch_size, **kw)


# ------------------------------------------------------------- from config
def dataset_from_config(cfg: Any, workdir: str | os.PathLike) -> "os.PathLike":
    """Builds (or reuses) the TFDS dataset of ``cfg.data``'s files.

    Splits: ``train`` (one row per answer), ``validation`` and ``test`` (one
    row per question); empty file fields are skipped. ``cfg.data.dataset_dir``
    defaults to ``workdir/data``. With several processes, process 0 builds
    first and the others wait at a barrier, then build or reuse: reuse on a
    shared filesystem, their own copy on a host-local disk (two writers racing
    on one directory is what the barrier prevents).
    """
    from pathlib import Path

    d = cfg.data
    files = {s: f for s, f in (("train", d.train_file), ("validation", d.dev_file), ("test", d.test_file)) if f}
    if not files:
        raise ValueError("config.data: no train_file, dev_file or test_file set")
    out = d.dataset_dir or str(Path(workdir) / "data")

    def build() -> "os.PathLike":
        return tfds_builders.build_qa_dataset(files, out, fmt=d.format, pair_splits=("train",))

    index, count = process_shard()
    if count == 1:
        return build()
    from jax.experimental import multihost_utils

    path = build() if index == 0 else None
    multihost_utils.sync_global_devices("rag_jax_qa_dataset_built")
    return path if path is not None else build()


def train_loader_from_config(cfg: Any, dataset_dir: str | os.PathLike, global_batch: int) -> QALoader:
    """Endless shuffled training batches of ``global_batch / process_count`` rows."""
    index, count = process_shard()
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} not divisible by {count} processes")
    return qa_loader_from_dir(
        dataset_dir, "train", global_batch // count, seed=cfg.train.seed, shuffle=True,
        num_epochs=None, shard_index=index, shard_count=count, num_threads=cfg.data.num_threads,
    )
