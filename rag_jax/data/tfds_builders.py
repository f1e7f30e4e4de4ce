"""QA files -> a tensorflow-datasets dataset in ``array_record`` format.

No TensorFlow is involved: TFDS writes array_record shards from a Python
generator and reads them back as a random-access data source, which grain
consumes. Rows keep file order (``disable_shuffling=True``); shuffling is the
input pipeline's job, seeded and resumable.

The builder config's name is a fingerprint of the input files, their
resolved formats and the row rules, so a changed file (or a change in how
rows are made) produces a new dataset directory instead of silently reusing
stale rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from rag_jax.data import qa_formats as F

DATASET_NAME = "rag_qa"


@dataclasses.dataclass
class QABuilderConfig(tfds.core.BuilderConfig):
    # split name -> QA file (or seq2seq stem)
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fmt: str = "auto"
    # Splits written as one row per (question, answer) pair; others one row per question.
    pair_splits: Sequence[str] = ("train",)
    # Records whose first answer (a classification label) is one of these are left out.
    drop_labels: Sequence[str] = ()


class RagQA(tfds.core.GeneratorBasedBuilder):
    """Questions with gold answers; rows of ``pair_splits`` are (question, answer) pairs."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "question, answer, answers, qid, line",
        "1.1.0": "+ record_id, positive_ids, titles, answer_patterns (KILT, FEVER, MS-MARCO, Jeopardy, CuratedTrec)",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo built directly: ``dataset_info_from_configs`` looks for
        # metadata files next to the module, which a library builder lacks.
        return tfds.core.DatasetInfo(
            builder=self,
            description="QA / generation pairs for RAG training (rag_jax).",
            features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(),
                # The training target: a gold answer, or for regex answers the
                # concrete string of regex_targets.regex_target.
                "answer": tfds.features.Text(),
                "answers": tfds.features.Sequence(tfds.features.Text()),
                "qid": np.int64,
                "line": np.int64,
                "record_id": tfds.features.Text(),  # the dataset's own id (KILT/FEVER id, MS-MARCO query_id)
                "positive_ids": tfds.features.Sequence(tfds.features.Text()),
                "titles": tfds.features.Sequence(tfds.features.Text()),
                "answer_patterns": np.bool_,
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        cfg = self.builder_config
        return {
            split: self._generate_examples(path, cfg.fmt, split in cfg.pair_splits, tuple(cfg.drop_labels))
            for split, path in cfg.files.items()
        }

    def _generate_examples(self, path: str, fmt: str, pairs: bool, drop_labels: tuple[str, ...] = ()):
        records = list(F.read_qa(path, fmt))  # parse fully first: fail before writing
        if drop_labels:
            records = [r for r in records if not (r.answers and r.answers[0] in drop_labels)]
        expand = F.training_pairs if pairs else F.eval_pairs
        for key, p in enumerate(expand(records)):
            r = records[p.qid]
            yield key, {
                "question": p.question,
                "answer": p.answer,
                "answers": list(p.answers),
                "qid": p.qid,
                "line": r.line,
                "record_id": r.qid,
                "positive_ids": list(r.positive_ids),
                "titles": list(r.titles),
                "answer_patterns": r.answer_patterns,
            }


# How rows are derived from records beyond what the files and formats say;
# bump when a rule changes (e.g. how a regex answer becomes a training target)
# so that a dataset built under the old rule is not reused.
ROW_RULES = "rows 2: regex target = most frequent match in the record's contexts, else the first spelled string"


def _fingerprint(files: Mapping[str, str], fmt: str, pair_splits: Sequence[str],
                 drop_labels: Sequence[str] = ()) -> str:
    h = hashlib.sha256()
    # The resolved format of each split: "auto" may read a file differently
    # as detection learns new formats.
    resolved = {s: F.detect_format(p) if fmt == "auto" else fmt for s, p in files.items()}
    h.update(repr((sorted(files.items()), fmt, sorted(resolved.items()), sorted(pair_splits),
                   RagQA.VERSION, ROW_RULES)).encode())
    if drop_labels:  # absent when empty: datasets built before the option keep their names
        h.update(repr(sorted(drop_labels)).encode())
    for split in sorted(files):
        path = files[split]
        fmt_i = resolved[split]
        parts = F.seq2seq_paths(path) if fmt_i == "seq2seq" else (Path(path),)
        for p in parts:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def build_qa_dataset(
    files: Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    fmt: str = "auto",
    pair_splits: Sequence[str] = ("train",),
    drop_labels: Sequence[str] = (),
) -> Path:
    """Builds (or reuses) the array_record dataset; returns its directory.

    ``files`` maps split names (``train``, ``validation``, ``test``...) to QA
    files. Raises ``QAFormatError`` naming file and line on bad input or an
    empty file, before anything is written; a build that fails later leaves no
    dataset directory behind (TFDS writes to ``incomplete.*`` and renames at
    the end). ``drop_labels``: records whose first answer is one of these
    are left out (2-way FEVER without its NOT ENOUGH INFO claims).
    """
    files = {str(k): str(v) for k, v in files.items()}
    if not files:
        raise ValueError("build_qa_dataset: no files given")
    for split, path in files.items():
        fmt_i = F.detect_format(path) if fmt == "auto" else fmt
        for p in (F.seq2seq_paths(path) if fmt_i == "seq2seq" else (Path(path),)):
            if not Path(p).exists():
                raise FileNotFoundError(f"{p}: no such file (split {split!r})")
        # Parsed in full before TFDS makes any directory: a bad line, or an empty
        # file (an empty split, which TFDS rejects with a traceback), fails here
        # in one line with nothing written; so does a pair split that yields
        # no training target (a test file without answers).
        records = F.read_qa(path, fmt)
        for _ in F.training_pairs(records) if split in pair_splits else records:
            pass
    name = "qa_" + _fingerprint(files, fmt, pair_splits, drop_labels)
    config = QABuilderConfig(name=name, files=files, fmt=fmt, pair_splits=tuple(pair_splits),
                             drop_labels=tuple(drop_labels))
    builder = RagQA(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)


def open_split(dataset_dir: str | os.PathLike, split: str) -> Any:
    """Random-access source of a built split (rows are dicts of bytes / ints)."""
    builder = tfds.builder_from_directory(str(dataset_dir))
    if split not in builder.info.splits:
        raise KeyError(f"{dataset_dir}: no split {split!r}; have {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)
