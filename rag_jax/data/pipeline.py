"""grain input pipeline over the TFDS QA dataset: one global stream, read in
slices by the processes, shuffled and resumable.

Order of operations and why:
  row indices -> shuffle(seed) -> repeat -> batch(global batch) -> this process's rows -> read
* The stream of global batches is a pure function of (seed, position): the
  examples of step s are the same set whatever the number of processes and
  devices. Each process reads only the rows of each global batch that its
  devices hold (``rows``), so a run reproduces across topologies and a
  checkpoint resumes on another process count.
* grain's shuffle folds the epoch into the seed, so every epoch differs.
* Batches have a fixed size (drop remainder) so the jitted step never recompiles.
The iterator's state is grain's (``{"next_index": n}``-like, JSON-safe) and the
same on every process; it is saved next to the model checkpoint and restoring
it yields the same batches. Rows stay raw strings: tokenization belongs to the trainer.
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
    """TFDS row (bytes) -> python strings. ``answer`` is the training target;
    ``answer_patterns`` says whether ``answers`` are regexes (CuratedTrec).
    The provenance fields are optional in a plain list of rows (``make_loader``
    takes one) and default to empty."""
    return {
        "question": _text(row["question"]),
        "answer": _text(row["answer"]),
        "answers": [_text(a) for a in row["answers"]],
        "qid": int(row["qid"]),
        "record_id": _text(row.get("record_id", b"")),
        "positive_ids": [_text(a) for a in row.get("positive_ids", ())],
        "titles": [_text(a) for a in row.get("titles", ())],
        "answer_patterns": bool(row.get("answer_patterns", False)),
    }


def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows -> one batch: lists of strings, numpy arrays for numbers."""
    return {
        "question": [r["question"] for r in rows],
        "answer": [r["answer"] for r in rows],
        "answers": [list(r["answers"]) for r in rows],
        "qid": np.asarray([r["qid"] for r in rows], np.int64),
        "record_id": [r["record_id"] for r in rows],
        "positive_ids": [list(r["positive_ids"]) for r in rows],
        "titles": [list(r["titles"]) for r in rows],
        "answer_patterns": np.asarray([r["answer_patterns"] for r in rows], bool),
    }


def process_shard() -> tuple[int, int]:
    """(index, count) of this process among all JAX processes."""
    import jax

    return jax.process_index(), jax.process_count()


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
        if saved is not None and _canonical(saved) != self.description:
            raise ValueError(f"data state was saved by a different pipeline: saved {saved}, now {self.description}")
        self._it = iter(self._iter_ds)
        self._it.set_state(dict(state["grain"]))


def _canonical(desc: Mapping[str, Any]) -> dict[str, Any]:
    """A saved description in today's form. States written before the global
    stream (one process, per-process ``batch_size``, ``shard`` [0, 1]) describe
    the same stream as a global batch of that size."""
    desc = json.loads(json.dumps(dict(desc)))
    if "batch_size" in desc and desc.get("shard") == [0, 1] and desc.get("drop_remainder", True):
        desc = {"rows": desc["rows"], "global_batch": desc["batch_size"], "seed": desc["seed"],
                "shuffle": desc["shuffle"], "num_epochs": desc["num_epochs"]}
    return desc


def make_loader(
    source: Any,
    global_batch: int,
    *,
    rows: Sequence[int] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    num_threads: int = 2,
) -> QALoader:
    """Global batches of QA rows from a random-access ``source`` (TFDS data
    source or list), of which this process reads positions ``rows`` (default:
    all, the single-process case). ``num_epochs=None`` repeats forever."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    take = np.arange(global_batch) if rows is None else np.asarray(rows, np.int64)
    if take.size == 0 or take.min() < 0 or take.max() >= global_batch:
        raise ValueError(f"rows {take.tolist()} are not positions in a global batch of {global_batch}")
    n_rows = len(source)
    if n_rows < global_batch:
        raise ValueError(f"{n_rows} rows cannot fill one global batch of {global_batch}")
    # The pipeline runs over row *indices*; rows are fetched one batch at a
    # time with the source's batched read (``__getitems__``), about 3x faster
    # than row-by-row reads of a TFDS array_record source.
    ds = grain.MapDataset.range(n_rows)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs is None:
        ds = ds.repeat(None)
    elif num_epochs > 1:
        ds = ds.repeat(num_epochs)
    ds = ds.batch(global_batch, drop_remainder=True, batch_fn=_index_batch)
    ds = ds.map(lambda idx: _read_batch(source, idx[take]))
    desc = {"rows": n_rows, "global_batch": global_batch, "seed": seed, "shuffle": shuffle,
            "num_epochs": num_epochs}
    return QALoader(ds, num_threads, desc)


def _index_batch(items: Sequence[int]) -> np.ndarray:
    return np.asarray(items, np.int64)


def _read_batch(source: Any, idx: np.ndarray) -> dict[str, Any]:
    idx = [int(i) for i in idx]
    getitems = getattr(source, "__getitems__", None)
    raw = list(getitems(idx)) if getitems is not None else [source[i] for i in idx]
    return collate([decode_row(r) for r in raw])


def qa_loader_from_dir(
    dataset_dir: str | os.PathLike, split: str, global_batch: int, **kw: Any
) -> QALoader:
    """``make_loader`` over a split of a dataset built by ``build_qa_dataset``."""
    return make_loader(tfds_builders.open_split(dataset_dir, split), global_batch, **kw)


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
        return tfds_builders.build_qa_dataset(files, out, fmt=d.format, pair_splits=("train",),
                                              drop_labels=tuple(cfg.task.ignore_labels) if "task" in cfg else ())

    index, count = process_shard()
    if count == 1:
        return build()
    from jax.experimental import multihost_utils

    path = build() if index == 0 else None
    multihost_utils.sync_global_devices("rag_jax_qa_dataset_built")
    return path if path is not None else build()


def train_loader_from_config(cfg: Any, dataset_dir: str | os.PathLike, global_batch: int,
                             rows: Sequence[int] | None = None) -> QALoader:
    """Endless shuffled training batches: positions ``rows`` of each global
    batch (default: this process's contiguous share of it)."""
    if rows is None:
        index, count = process_shard()
        if global_batch % count:
            raise ValueError(f"global batch {global_batch} not divisible by {count} processes")
        per = global_batch // count
        rows = range(index * per, (index + 1) * per)
    return qa_loader_from_dir(dataset_dir, "train", global_batch, rows=rows, seed=cfg.train.seed, shuffle=True,
                              num_epochs=None, num_threads=cfg.data.num_threads)
