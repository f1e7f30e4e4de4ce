"""Passage corpora: streaming readers, a 100-word splitter and an on-disk store.

The store is a directory of flat files, chosen over an ``array_record`` TFDS
dataset because it needs no builder machinery, keeps row order by
construction, and gives O(1) random access through ``np.memmap`` offsets:

    manifest.json         count, checksum, source; written last (marks complete)
    ids.bin / ids.off     utf-8 ids and uint64 offsets [n + 1]
    titles.bin / ...off   utf-8 titles
    texts.bin / ...off    utf-8 texts
    idkey.u64 / idrow.u64 sorted 64-bit hashes of the ids and their rows

Reading row ``r`` touches two offsets and one byte range per field, so the
text of a 21M-passage corpus never has to be in memory at once; looking up an
id is a binary search over the memory-mapped hash array (then a check of the
stored id, which makes hash collisions harmless).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "rag_jax.corpus/1"
_FIELDS = ("ids", "titles", "texts")


class CorpusError(ValueError):
    """A passages file or corpus directory is malformed; the message names where."""


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------


def _raise_csv_field_limit() -> None:
    # Wikipedia passages are short, but raw documents given to the splitter may
    # exceed csv's 128 KiB default field size.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def read_dpr_tsv(path: str | os.PathLike) -> Iterator[Passage]:
    """Streams DPR ``psgs_w100.tsv``: header ``id<TAB>text<TAB>title``, text double-quoted.

    Quoting follows the csv module's excel-tab dialect as DPR itself reads the
    file: ``""`` inside a quoted field is one quote, and tabs or newlines
    inside quotes belong to the field. Column order is taken from the header
    when there is one; without a header the order is ``id, text, title``.
    Raises :class:`CorpusError` naming the file and line of a malformed row.
    """
    _raise_csv_field_limit()
    path = str(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quotechar='"', strict=True)
        cols = None
        start_line = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise CorpusError(f"{path}:{start_line}: malformed quoting ({e})") from e
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{start_line}: not valid UTF-8 ({e})") from e
            line = start_line
            start_line = reader.line_num + 1
            if not row:
                continue  # blank line
            if cols is None:
                names = [c.strip().lower() for c in row]
                if sorted(names) == ["id", "text", "title"]:
                    cols = (names.index("id"), names.index("text"), names.index("title"))
                    continue
                cols = (0, 1, 2)
            if len(row) != 3:
                raise CorpusError(
                    f"{path}:{line}: expected 3 tab-separated fields (id, text, title), got {len(row)}"
                )
            pid, text, title = (row[i] for i in cols)
            if not pid.strip():
                raise CorpusError(f"{path}:{line}: empty id")
            yield Passage(pid.strip(), title, text)


def read_jsonl(path: str | os.PathLike) -> Iterator[Passage]:
    """Streams JSONL ``{"id", "title", "text"}``; ``id`` may be omitted (row number from 1)."""
    path = str(path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{line_no}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise CorpusError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            if "text" not in obj or not isinstance(obj["text"], str):
                raise CorpusError(f"{path}:{line_no}: missing or non-string field 'text'")
            title = obj.get("title", "")
            if not isinstance(title, str):
                raise CorpusError(f"{path}:{line_no}: field 'title' must be a string")
            pid = obj.get("id", line_no)
            if isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
                raise CorpusError(f"{path}:{line_no}: field 'id' must be a non-empty string or integer")
            yield Passage(str(pid).strip(), title, obj["text"])


def read_passages(path: str | os.PathLike) -> Iterator[Passage]:
    """Dispatches on the extension: ``.jsonl``/``.json`` -> JSONL, anything else -> DPR TSV."""
    suffix = Path(path).suffix.lower()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such passages file")
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    return read_dpr_tsv(path)


def split_documents(
    docs: Iterable[Passage], words_per_passage: int = 100, start_id: int = 1
) -> Iterator[Passage]:
    """Splits raw documents into passages of ``words_per_passage`` whitespace words.

    As DPR's Wikipedia split: consecutive, non-overlapping word windows, the
    last one shorter; each passage keeps its document's title; ids are
    consecutive integers from ``start_id``.
    """
    if words_per_passage < 1:
        raise ValueError(f"words_per_passage must be >= 1, got {words_per_passage}")
    next_id = start_id
    for doc in docs:
        words = doc.text.split()
        for i in range(0, len(words), words_per_passage):
            yield Passage(str(next_id), doc.title, " ".join(words[i : i + words_per_passage]))
            next_id += 1


# ---------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------


def _id_key(pid: str) -> int:
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little")


def _id_keys(pids: Sequence[str]) -> np.ndarray:
    return np.fromiter((_id_key(p) for p in pids), dtype=np.uint64, count=len(pids))


class _Blob:
    """Append-only writer of one field: a data file plus uint64 end offsets."""

    def __init__(self, root: Path, name: str) -> None:
        self.data = open(root / f"{name}.bin", "wb")
        self.off = open(root / f"{name}.off", "wb")
        self.off.write(np.zeros(1, np.uint64).tobytes())
        self.pos = 0
        self.pending: list[int] = []

    def add(self, b: bytes) -> None:
        self.data.write(b)
        self.pos += len(b)
        self.pending.append(self.pos)
        if len(self.pending) >= 65536:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.off.write(np.asarray(self.pending, np.uint64).tobytes())
            self.pending = []

    def close(self) -> None:
        self.flush()
        self.data.close()
        self.off.close()


def atomic_dir(out: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of ``out``; :func:`commit_dir` renames it into place."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out: Path) -> None:
    """Renames a finished temporary directory onto ``out`` (replacing an old one)."""
    out = Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_corpus(
    passages: Iterable[Passage],
    out_dir: str | os.PathLike,
    source: str = "",
    overwrite: bool = False,
    progress: bool = True,
) -> "Corpus":
    """Streams ``passages`` into a corpus directory; atomic (temp dir, then rename).

    Memory grows only with the number of passages (8 bytes of id hash each),
    never with the text. Duplicate ids are an error.
    """
    out = Path(out_dir)
    tmp = atomic_dir(out, overwrite)
    try:
        blobs = {name: _Blob(tmp, name) for name in _FIELDS}
        sha = hashlib.sha256()
        keys: list[np.ndarray] = []
        pending_keys: list[int] = []
        n = 0
        bar = _progress(progress, "corpus", unit="psg")
        for p in passages:
            fields = (p.id.encode("utf-8"), p.title.encode("utf-8"), p.text.encode("utf-8"))
            for name, b in zip(_FIELDS, fields):
                blobs[name].add(b)
                # Length-prefixed so that field boundaries are part of the checksum.
                sha.update(len(b).to_bytes(8, "little"))
                sha.update(b)
            pending_keys.append(_id_key(p.id))
            if len(pending_keys) >= 65536:
                keys.append(np.asarray(pending_keys, np.uint64))
                pending_keys = []
            n += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        keys.append(np.asarray(pending_keys, np.uint64))
        for b in blobs.values():
            b.close()
        key_arr = np.concatenate(keys)
        order = np.argsort(key_arr, kind="stable")
        sorted_keys = key_arr[order]
        _check_duplicates(tmp, sorted_keys, order)
        sorted_keys.tofile(tmp / "idkey.u64")
        order.astype(np.uint64).tofile(tmp / "idrow.u64")
        manifest = {
            "format": FORMAT,
            "count": n,
            "checksum": "sha256:" + sha.hexdigest(),
            "source": str(source),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Corpus(out)


def _check_duplicates(root: Path, sorted_keys: np.ndarray, order: np.ndarray) -> None:
    same = np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0]
    if not len(same):
        return
    ids = _Field(root, "ids")
    for i in same[:1000]:
        a, b = int(order[i]), int(order[i + 1])
        if ids[a] == ids[b]:
            raise CorpusError(f"duplicate passage id {ids[a]!r} at rows {min(a, b)} and {max(a, b)}")


def build_corpus(
    passages_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    split_words: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> "Corpus":
    """Reads a DPR TSV / JSONL file (optionally splitting raw documents) into a store."""
    stream = read_passages(passages_file)
    if split_words:
        stream = split_documents(stream, split_words)
    return write_corpus(stream, out_dir, source=os.path.abspath(passages_file), overwrite=overwrite, progress=progress)


class _Field:
    """Read side of one field: memory-mapped offsets and data."""

    def __init__(self, root: Path, name: str) -> None:
        self.off = np.memmap(root / f"{name}.off", dtype=np.uint64, mode="r")
        data_file = root / f"{name}.bin"
        # np.memmap refuses empty files (a corpus of empty titles is legal).
        self.data = np.memmap(data_file, dtype=np.uint8, mode="r") if data_file.stat().st_size else np.zeros(0, np.uint8)

    def __getitem__(self, row: int) -> str:
        a, b = int(self.off[row]), int(self.off[row + 1])
        return bytes(self.data[a:b]).decode("utf-8")


class Corpus:
    """Read-only random access to a corpus directory written by :func:`write_corpus`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise CorpusError(f"{self.path}: not a complete corpus directory (no {MANIFEST})")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise CorpusError(f"{mf}: invalid JSON ({e})") from e
        if self.manifest.get("format") != FORMAT:
            raise CorpusError(f"{mf}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.count = int(self.manifest["count"])
        self.checksum = str(self.manifest["checksum"])
        self._fields = {name: _Field(self.path, name) for name in _FIELDS}
        for name, fld in self._fields.items():
            if len(fld.off) != self.count + 1:
                raise CorpusError(f"{self.path}/{name}.off: {len(fld.off) - 1} rows, manifest says {self.count}")
        self._keys = np.memmap(self.path / "idkey.u64", dtype=np.uint64, mode="r") if self.count else np.zeros(0, np.uint64)
        self._rows = np.memmap(self.path / "idrow.u64", dtype=np.uint64, mode="r") if self.count else np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return self.count

    def _check_row(self, row: int) -> int:
        row = int(row)
        if not 0 <= row < self.count:
            raise IndexError(f"row {row} out of range for corpus {self.path} of {self.count} passages")
        return row

    def id(self, row: int) -> str:
        return self._fields["ids"][self._check_row(row)]

    def title(self, row: int) -> str:
        return self._fields["titles"][self._check_row(row)]

    def text(self, row: int) -> str:
        return self._fields["texts"][self._check_row(row)]

    def __getitem__(self, row: int) -> Passage:
        row = self._check_row(row)
        return Passage(*(self._fields[n][row] for n in _FIELDS))

    def rows_to_ids(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        return np.asarray([self.id(r) for r in rows.reshape(-1)], dtype=object).reshape(rows.shape)

    def row_of(self, pid: str | int) -> int:
        """The row of passage id ``pid``; KeyError if absent."""
        pid = str(pid)
        key = np.uint64(_id_key(pid))
        i = int(np.searchsorted(self._keys, key, side="left"))
        while i < self.count and self._keys[i] == key:
            row = int(self._rows[i])
            if self._fields["ids"][row] == pid:
                return row
            i += 1
        raise KeyError(f"passage id {pid!r} not in corpus {self.path}")

    def rows_of(self, pids: Sequence[str | int]) -> np.ndarray:
        """Vectorised id -> row; raises KeyError naming the first missing id."""
        pids = [str(p) for p in pids]
        keys = _id_keys(pids)
        pos = np.searchsorted(self._keys, keys, side="left")
        pos_c = np.minimum(pos, max(self.count - 1, 0))
        rows = np.asarray(self._rows[pos_c], dtype=np.int64) if self.count else np.zeros(len(pids), np.int64)
        ids_field = self._fields["ids"]
        for j, p in enumerate(pids):
            if self.count == 0 or pos[j] >= self.count or self._keys[pos_c[j]] != keys[j] or ids_field[int(rows[j])] != p:
                rows[j] = self.row_of(p)  # collision walk, or KeyError
        return rows

    def batch(self, start: int, stop: int) -> tuple[list[str], list[str]]:
        """(titles, texts) of rows ``[start, stop)``."""
        t, x = self._fields["titles"], self._fields["texts"]
        rows = range(start, min(stop, self.count))
        return [t[r] for r in rows], [x[r] for r in rows]


def open_corpus(path: str | os.PathLike) -> Corpus:
    return Corpus(path)


def _progress(enabled: bool, desc: str, total: int | None = None, unit: str = "it", initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, smoothing=0.1)


__all__ = [
    "Corpus",
    "CorpusError",
    "Passage",
    "build_corpus",
    "open_corpus",
    "read_dpr_tsv",
    "read_jsonl",
    "read_passages",
    "split_documents",
    "write_corpus",
]
