"""What every QA reader produces (``QARecord``) and the checks they share:
line-by-line UTF-8 decoding, ``file:line`` errors, question / answer checks.

The readers live in ``qa_formats`` (DPR CSV, JSONL, seq2seq: the entry point
``read_qa``) and ``task_formats`` (KILT, FEVER, MS-MARCO, Jeopardy,
CuratedTrec); both build on this module, which imports only the standard
library.
"""
from __future__ import annotations

import ast
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class QAFormatError(ValueError):
    """Bad QA input; the message starts with ``file:line`` (or ``file:`` when
    the fault has no line, as in a column-oriented JSON file)."""


@dataclass(frozen=True)
class QARecord:
    question: str
    # Gold answers. Empty only for eval-only test files (KILT / FEVER / MS-MARCO
    # test sets carry no output): such records can be predicted, not trained on.
    answers: list[str] = field(default_factory=list)
    # Where the record came from, so later stages can point back at the input.
    source: str = ""
    line: int = 0
    # Passages (JSONL) or Wikipedia pages (KILT: ``wikipedia_id``) that hold
    # the answer, when given.
    positive_ids: tuple[str, ...] = ()
    # Titles of the gold provenance pages (KILT, FEVER evidence), when given.
    titles: tuple[str, ...] = ()
    # The dataset's own id of the question (KILT / FEVER ``id``, MS-MARCO
    # ``query_id``), kept so predictions can be written back keyed by it.
    qid: str = ""
    # The answers are regular expressions (CuratedTrec), matched case-blind as
    # DPR does; training targets come from ``regex_targets.regex_target``.
    answer_patterns: bool = False
    # Gold evidence sets, one per gold output that cites pages (KILT scores
    # them set by set: R-precision is the max over sets): the pages'
    # ``wikipedia_id``s (KILT) and titles (KILT, FEVER evidence groups).
    # ``positive_ids`` / ``titles`` above are their flattened union.
    provenance: tuple[tuple[str, ...], ...] = ()
    provenance_titles: tuple[tuple[str, ...], ...] = ()
    # Passage texts shipped with the question (DPR's biencoder JSON: its
    # retrieved positive and hard-negative contexts); regex answers take their
    # training target from them.
    contexts: tuple[str, ...] = ()


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    # Every gold answer of the question, kept for evaluation on training data.
    answers: tuple[str, ...]
    qid: int  # position of the record in its file's record stream


def fail(path: str | os.PathLike, line: int, msg: str) -> QAFormatError:
    return QAFormatError(f"{path}:{line}: {msg}")


def record_error(r: QARecord, msg: str) -> QAFormatError:
    """An error about a parsed record, at its line, or (a record of a
    column-oriented file, which has no line) at its id."""
    where = f"{r.source}:{r.line}" if r.line else f"{r.source}: query {r.qid!r}"
    return QAFormatError(f"{where}: {msg}")


def no_questions(path: str | os.PathLike) -> QAFormatError:
    return QAFormatError(f"{path}: no questions (the file is empty or holds only blank lines)")


def decode_line(raw: bytes, path: str | os.PathLike, ln: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(path, ln, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                             "line); QA files must be UTF-8 text") from None


def lines(path: str | os.PathLike) -> Iterator[str]:
    """The file's lines (line ends kept), decoded one by one so that invalid
    UTF-8 is reported on its own line; a UTF-8 byte-order mark is dropped.

    Text-mode reading decodes in blocks, and its error names neither the line
    nor, through csv, the right one.
    """
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            if ln == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            yield decode_line(raw, path, ln)


def read_json_text(path: str | os.PathLike) -> str:
    """A whole JSON file as text (UTF-8, byte-order mark dropped); invalid
    UTF-8 fails naming its line."""
    raw = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        ln = raw.count(b"\n", 0, e.start) + 1
        raise fail(path, ln, f"invalid UTF-8 (byte 0x{raw[e.start]:02x}); QA files must be UTF-8 text") from None


def json_array_items(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line, item)`` for every item of a file holding one JSON array,
    decoded item by item so each keeps the line it starts on (a whole-file
    parse would lose it) and a syntax error names its line."""
    text = read_json_text(path)
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise fail(path, text.count("\n", 0, pos) + 1, "expected a JSON array")
    pos, line, counted = ws.match(text, pos + 1).end(), 1, 0
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
        yield line, item
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            rest = ws.match(text, pos + 1).end()
            if rest != len(text):
                raise fail(path, text.count("\n", 0, rest) + 1, "extra data after the JSON array")
            return
        else:
            raise fail(path, text.count("\n", 0, pos) + 1, "expected ',' or ']' after an array item")


def json_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, object)`` for every non-blank line of a JSONL file; a line that
    is not a JSON object fails naming the file and line."""
    for ln, text in enumerate(lines(path), 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise fail(path, ln, f"malformed JSON: {e}") from None
        if not isinstance(obj, dict):
            raise fail(path, ln, f"expected a JSON object, got {type(obj).__name__}")
        yield ln, obj


def check_question(q: object, path: str | os.PathLike, line: int, what: str = "question") -> str:
    if not isinstance(q, str):
        raise fail(path, line, f"{what} must be a string, got {type(q).__name__}")
    q = q.strip()
    if not q:
        raise fail(path, line, f"empty {what}")
    return q


def check_answers(a: object, path: str | os.PathLike, line: int) -> list[str]:
    if isinstance(a, str):
        raise fail(path, line, "answers must be a list of strings, got a single string")
    if not isinstance(a, (list, tuple)):
        raise fail(path, line, f"answers must be a list of strings, got {type(a).__name__}")
    out = []
    for i, x in enumerate(a):
        if not isinstance(x, str):
            raise fail(path, line, f"answer {i} is {type(x).__name__}, expected a string")
        x = x.strip()
        if x:
            out.append(x)
    if not out:
        raise fail(path, line, "empty answers list")
    return out


def parse_answer_list(text: str, path: str | os.PathLike = "<string>", line: int = 0) -> list[str]:
    """Parses a DPR answers cell: a JSON list, or a Python list literal.

    DPR's released CSVs hold Python reprs (single quotes, escaped apostrophes),
    which JSON rejects, hence the ``ast.literal_eval`` fallback.
    """
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            # A regex answer written by hand ("\d+") is an invalid escape to
            # Python, which keeps it as written but warns: the warning is noise.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)
                value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise fail(path, line, f"cannot parse answers list {text[:80]!r}: {e}") from None
    return check_answers(value, path, line)
