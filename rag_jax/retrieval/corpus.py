"""Passage corpora: streaming readers, a 100-word splitter and an on-disk store.

The store is a directory of flat files, chosen over an ``array_record`` TFDS
dataset because it needs no builder machinery, keeps row order by
construction, and gives O(1) random access through ``np.memmap`` offsets:

    manifest.json         count, checksum, source and its fingerprint (size,
                          mtime, sha256), input warnings; written last (marks complete)
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
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

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
    # Where it starts in its file (1-based; 0: not from a file), for error messages only.
    line: int = field(default=0, compare=False)


class DuplicateIdError(CorpusError):
    """Two passages share an id; ``rows`` are their 0-based corpus rows (first, second)."""

    def __init__(self, pid: str, rows: tuple[int, int]) -> None:
        super().__init__(f"duplicate passage id {pid!r} at rows {rows[0]} and {rows[1]}")
        self.pid = pid
        self.rows = rows


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
            except UnicodeDecodeError:
                # Decoding runs a buffer ahead of the csv reader: find the real line.
                raise CorpusError(_utf8_error(path)) from None
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
            yield Passage(pid.strip(), title, text, line)


def _utf8_error(path: str) -> str:
    """``FILE:LINE: not valid UTF-8 (...)`` for the first undecodable line of ``path``."""
    with open(path, "rb") as f:
        # A newline byte never occurs inside a UTF-8 sequence, so lines decode independently.
        for line_no, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    return f"{path}: not valid UTF-8"


def read_jsonl(path: str | os.PathLike) -> Iterator[Passage]:
    """Streams JSONL ``{"id", "title", "text"}``; ``id`` may be omitted (row number from 1)."""
    path = str(path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
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
            yield Passage(str(pid).strip(), title, obj["text"], line_no)


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
            yield Passage(str(next_id), doc.title, " ".join(words[i : i + words_per_passage]), doc.line)
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
    manifest_extra: Callable[[], dict[str, Any]] | None = None,
) -> "Corpus":
    """Streams ``passages`` into a corpus directory; atomic (temp dir, then rename).

    Memory grows only with the number of passages (8 bytes of id hash each),
    never with the text. Duplicate ids (:class:`DuplicateIdError`) and an
    empty stream are errors. ``manifest_extra()``, called once the stream is
    consumed (it may report on it), adds items to the manifest.
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
        for b in blobs.values():
            b.close()
        if n == 0:
            raise CorpusError(f"{source or out}: no passages")
        keys.append(np.asarray(pending_keys, np.uint64))
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
            **(manifest_extra() if manifest_extra else {}),
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
    found = None
    for i in same[:1000]:
        a, b = sorted(int(x) for x in order[i : i + 2])
        if ids[a] == ids[b] and (found is None or b < found[1]):
            found = (a, b)  # the duplicate met first when reading the file
    if found is not None:
        raise DuplicateIdError(ids[found[0]], found)


# ---------------------------------------------------------------------------
# Passages files: fingerprints and content checks
# ---------------------------------------------------------------------------

# A file modified within this long of the moment it was hashed may have kept
# its size and (coarse) mtime: such a fingerprint is re-hashed, never trusted.
_RACY_NS = 2_000_000_000


def file_fingerprint(path: str | os.PathLike, known: dict | None = None, progress: bool = False) -> dict:
    """``{"path", "size", "mtime_ns", "sha256", "checked_ns"}`` of a file.

    ``known`` is an earlier fingerprint of the same file: when size and mtime
    are unchanged (and were not racy when it was taken) its hash is reused
    instead of reading the file again, as make and git trust an unchanged
    stat. Compare fingerprints with :func:`same_content` (size and hash).
    """
    checked = time.time_ns()
    st = os.stat(path)
    if (
        known is not None
        and known.get("size") == st.st_size
        and known.get("mtime_ns") == st.st_mtime_ns
        and int(known.get("checked_ns", 0)) - st.st_mtime_ns > _RACY_NS
    ):
        return {**known, "path": os.path.abspath(path)}
    h = hashlib.sha256()
    # Only files big enough to take a while get a bar (rate and ETA).
    bar = _progress(progress and st.st_size >= 1 << 26, f"hash {Path(path).name}", total=st.st_size, unit="B",
                    unit_scale=True)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise CorpusError(f"{path}: changed while being read; run again once it is complete")
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": h.hexdigest(), "checked_ns": checked}


def same_content(a: dict | None, b: dict | None) -> bool:
    return bool(a and b) and (a["size"], a["sha256"]) == (b["size"], b["sha256"])


def content_change(old: dict, new: dict) -> str:
    """Why two fingerprints of a file differ, for the build log."""
    if old["size"] != new["size"]:
        return f"{new['path']} changed ({old['size']} -> {new['size']} bytes)"
    return f"{new['path']} changed (same size, different content)"


class _InputChecks:
    """Counts passages with an empty text and (for DPR TSV) non-integer ids.

    ``strict`` raises at the first; otherwise :meth:`summary` lists counts and
    the first lines, kept in the corpus manifest (``input_warnings``).
    """

    KEEP = 5

    def __init__(self, path: str, integer_ids: bool, strict: bool) -> None:
        self.path = path
        self.integer_ids = integer_ids
        self.strict = strict
        self.found: dict[str, dict] = {}

    def _note(self, kind: str, line: int, detail: str) -> None:
        if self.strict:
            raise CorpusError(f"{self.path}:{line}: {detail} (--strict)")
        entry = self.found.setdefault(kind, {"kind": kind, "count": 0, "lines": [], "first": detail})
        entry["count"] += 1
        if len(entry["lines"]) < self.KEEP:
            entry["lines"].append(line)

    def __call__(self, stream: Iterable[Passage]) -> Iterator[Passage]:
        for p in stream:
            if not p.text.strip():
                self._note("empty_text", p.line, "empty passage text")
            if self.integer_ids and not (p.id.isascii() and p.id.isdigit()):
                self._note("non_integer_id", p.line, f"id {p.id!r} is not an integer (DPR TSV ids are integers)")
            yield p

    def summary(self) -> list[dict]:
        return list(self.found.values())


_WARNING_NOUNS = {"empty_text": "passages with an empty text", "non_integer_id": "ids that are not integers"}


def input_warnings(corpus: "Corpus", name: str, strict: bool = False) -> list[str]:
    """One line per kind of suspicious passage recorded when ``corpus`` was built from file ``name``.

    With ``strict`` the first such passage is a :class:`CorpusError` instead
    (a store built without ``strict`` and reused by a strict build).
    """
    out = []
    for w in corpus.manifest.get("input_warnings", []):
        if strict:
            raise CorpusError(f"{name}:{w['lines'][0]}: {w['first']} (--strict)")
        more = ", ..." if w["count"] > len(w["lines"]) else ""
        out.append(
            f"{name}: {w['count']} {_WARNING_NOUNS.get(w['kind'], w['kind'])} (line {', '.join(map(str, w['lines']))}"
            f"{more}; first: {w['first']}); --strict makes this an error"
        )
    return out


def build_corpus(
    passages_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    split_words: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    strict: bool = False,
    fingerprint: dict | None = None,
) -> "Corpus":
    """Reads a DPR TSV / JSONL file (optionally splitting raw documents) into a store.

    Errors name ``FILE:LINE``: malformed rows, invalid UTF-8, an empty file
    (``FILE: no passages``), duplicate ids (with the line of the first).
    Empty texts and, in DPR TSV (whose ids are integers), non-integer ids are
    counted into the manifest's ``input_warnings`` (see
    :func:`input_warnings`), or fail at the first with ``strict``. The
    manifest records the file's ``fingerprint`` (computed if not given): a
    store is reused only for the same content.
    """
    name = str(passages_file)
    fingerprint = fingerprint or file_fingerprint(passages_file, progress=progress)
    checks = _InputChecks(name, integer_ids=Path(name).suffix.lower() not in (".jsonl", ".json") and not split_words,
                          strict=strict)
    stream = checks(read_passages(passages_file))
    if split_words:
        stream = split_documents(stream, split_words)
    try:
        corpus = write_corpus(
            stream, out_dir, source=name, overwrite=overwrite, progress=progress,
            manifest_extra=lambda: {"source_fingerprint": fingerprint, "split_words": split_words or None,
                                    "input_warnings": checks.summary()},
        )
    except DuplicateIdError as e:
        lines = _lines_of_rows(passages_file, split_words, e.rows)
        raise CorpusError(f"{name}:{lines[1]}: duplicate id {e.pid!r} (first on line {lines[0]})") from None
    now = os.stat(passages_file)
    if (now.st_size, now.st_mtime_ns) != (fingerprint["size"], fingerprint["mtime_ns"]):
        shutil.rmtree(out_dir, ignore_errors=True)
        raise CorpusError(f"{name}: changed while the corpus was being built; run again once it is complete")
    return corpus


def _lines_of_rows(path: str | os.PathLike, split_words: int | None, rows: Sequence[int]) -> list[int]:
    """File lines of corpus ``rows`` (an error path: reads the file again rather than
    keep a line number per passage in memory)."""
    stream: Iterable[Passage] = read_passages(path)
    if split_words:
        stream = split_documents(stream, split_words)
    want = {r: 0 for r in rows}
    for row, p in enumerate(stream):
        if row in want:
            want[row] = p.line
            if row == max(rows):
                break
    return [want[r] for r in rows]


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


def _progress(enabled: bool, desc: str, total: int | None = None, unit: str = "it", initial: int = 0,
              unit_scale: bool = False):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, smoothing=0.1,
                unit_scale=unit_scale)


__all__ = [
    "Corpus",
    "CorpusError",
    "DuplicateIdError",
    "Passage",
    "build_corpus",
    "file_fingerprint",
    "input_warnings",
    "open_corpus",
    "read_dpr_tsv",
    "read_jsonl",
    "read_passages",
    "same_content",
    "split_documents",
    "write_corpus",
]
