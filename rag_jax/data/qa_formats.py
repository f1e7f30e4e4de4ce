"""Readers for open-domain QA files: DPR CSV, JSONL and seq2seq line pairs.

Every reader streams ``QARecord``s (one per question, all gold answers kept)
and reports bad input with ``file:line``. ``training_pairs`` expands records
into one (question, answer) pair per gold answer, the recipe the RAG paper
uses for NQ; evaluation keeps the full answer list for max-over-gold metrics.
"""
from __future__ import annotations

import ast
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

FORMATS = ("dpr_csv", "jsonl", "seq2seq")


class QAFormatError(ValueError):
    """Bad QA input; the message starts with ``file:line``."""


@dataclass(frozen=True)
class QARecord:
    question: str
    answers: list[str] = field(default_factory=list)
    # Where the record came from, so later stages can point back at the input.
    source: str = ""
    line: int = 0
    # JSONL ``positive_ids`` (passages that state the answer), when given.
    positive_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    # Every gold answer of the question, kept for evaluation on training data.
    answers: tuple[str, ...]
    qid: int


def _fail(path: str | os.PathLike, line: int, msg: str) -> QAFormatError:
    return QAFormatError(f"{path}:{line}: {msg}")


def _no_questions(path: str | os.PathLike) -> QAFormatError:
    return QAFormatError(f"{path}: no questions (the file is empty or holds only blank lines)")


def _lines(path: str | os.PathLike) -> Iterator[str]:
    """The file's lines (line ends kept), decoded one by one so that invalid
    UTF-8 is reported on its own line; a UTF-8 byte-order mark is dropped.

    Text-mode reading decodes in blocks, and its error names neither the line
    nor, through csv, the right one.
    """
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            if ln == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _fail(path, ln, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                                      "line); QA files must be UTF-8 text") from None
            yield text


def _check_question(q: object, path: str | os.PathLike, line: int) -> str:
    if not isinstance(q, str):
        raise _fail(path, line, f"question must be a string, got {type(q).__name__}")
    q = q.strip()
    if not q:
        raise _fail(path, line, "empty question")
    return q


def _check_answers(a: object, path: str | os.PathLike, line: int) -> list[str]:
    if isinstance(a, str):
        raise _fail(path, line, "answers must be a list of strings, got a single string")
    if not isinstance(a, (list, tuple)):
        raise _fail(path, line, f"answers must be a list of strings, got {type(a).__name__}")
    out = []
    for i, x in enumerate(a):
        if not isinstance(x, str):
            raise _fail(path, line, f"answer {i} is {type(x).__name__}, expected a string")
        x = x.strip()
        if x:
            out.append(x)
    if not out:
        raise _fail(path, line, "empty answers list")
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
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise _fail(path, line, f"cannot parse answers list {text[:80]!r}: {e}") from None
    return _check_answers(value, path, line)


def read_dpr_csv(path: str | os.PathLike) -> Iterator[QARecord]:
    """``question<TAB>answers-list`` lines (DPR's nq-*.qa.csv); no header."""
    # QUOTE_NONE: questions hold stray quotes that must stay literal (and no
    # field spans lines, so line_num is the file's line).
    reader = csv.reader(_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    count = 0
    for row in reader:
        ln = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 2:
            raise _fail(path, ln, f"expected 2 tab-separated fields (question, answers), got {len(row)}")
        q = _check_question(row[0], path, ln)
        count += 1
        yield QARecord(q, parse_answer_list(row[1], path, ln), str(path), ln)
    if not count:
        raise _no_questions(path)


def read_jsonl(path: str | os.PathLike) -> Iterator[QARecord]:
    """One ``{"question": str, "answers": [str, ...]}`` object per line."""
    count = 0
    for ln, text in enumerate(_lines(path), 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise _fail(path, ln, f"malformed JSON: {e}") from None
        if not isinstance(obj, dict):
            raise _fail(path, ln, f"expected a JSON object, got {type(obj).__name__}")
        for key in ("question", "answers"):
            if key not in obj:
                raise _fail(path, ln, f"missing field {key!r}")
        q = _check_question(obj["question"], path, ln)
        pos = obj.get("positive_ids", [])
        if not isinstance(pos, list) or not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in pos):
            raise _fail(path, ln, "positive_ids must be a list of passage ids (ints or strings)")
        count += 1
        yield QARecord(q, _check_answers(obj["answers"], path, ln), str(path), ln, tuple(str(x) for x in pos))
    if not count:
        raise _no_questions(path)


def seq2seq_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".source", ".target"):
        p = p.with_suffix("")
    return Path(str(p) + ".source"), Path(str(p) + ".target")


def read_seq2seq(path: str | os.PathLike) -> Iterator[QARecord]:
    """``X.source`` questions and ``X.target`` answers, line by line (HF finetune_rag).

    ``path`` may be ``X``, ``X.source`` or ``X.target``. A target line holds
    one answer, or several separated by ``<tab>`` or as a list literal.
    """
    src, tgt = seq2seq_paths(path)
    for p in (src, tgt):
        if not p.exists():
            raise FileNotFoundError(f"{p}: seq2seq file missing")
    sources, targets = _lines(src), _lines(tgt)
    ln = 0
    while True:
        s, t = next(sources, None), next(targets, None)
        if s is None and t is None:
            break
        ln += 1
        if s is None or t is None:
            short = src if s is None else tgt
            raise _fail(short, ln, f"{src.name} and {tgt.name} have different line counts "
                        f"({short.name} ends before line {ln})")
        s, t = s.rstrip("\r\n"), t.rstrip("\r\n")
        q = _check_question(s, src, ln)
        t_stripped = t.strip()
        if t_stripped.startswith("["):
            answers = parse_answer_list(t_stripped, tgt, ln)
        else:
            answers = _check_answers(t.split("\t") if t_stripped else [], tgt, ln)
        yield QARecord(q, answers, str(src), ln)
    if not ln:
        raise _no_questions(src)


def detect_format(path: str | os.PathLike) -> str:
    name = str(path)
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith((".source", ".target")) or (
        Path(name + ".source").exists() and Path(name + ".target").exists()
    ):
        return "seq2seq"
    if name.endswith((".csv", ".tsv")):
        return "dpr_csv"
    if not Path(name).exists():
        raise FileNotFoundError(f"{path}: no such file (nor {Path(name).name}.source + .target)")
    raise ValueError(f"{path}: cannot tell the QA format from the name (.jsonl, .csv/.tsv, or X.source + "
                     f"X.target); set it with --config.data.format (fmt= in Python), one of {FORMATS}")


def read_qa(path: str | os.PathLike, fmt: str = "auto") -> Iterator[QARecord]:
    """Streams records of a QA file in ``fmt`` (``auto`` guesses from the name)."""
    if fmt == "auto":
        fmt = detect_format(path)
    readers = {"dpr_csv": read_dpr_csv, "jsonl": read_jsonl, "seq2seq": read_seq2seq}
    if fmt not in readers:
        raise ValueError(f"unknown QA format {fmt!r}; expected one of {FORMATS} or 'auto'")
    return readers[fmt](path)


def training_pairs(records: Iterable[QARecord]) -> Iterator[QAPair]:
    """One (question, answer) pair per gold answer; duplicates of an answer kept once."""
    for qid, r in enumerate(records):
        seen: set[str] = set()
        for a in r.answers:
            if a in seen:
                continue
            seen.add(a)
            yield QAPair(r.question, a, tuple(r.answers), qid)


def eval_pairs(records: Iterable[QARecord]) -> Iterator[QAPair]:
    """One pair per question: first answer as target, all answers as gold."""
    for qid, r in enumerate(records):
        yield QAPair(r.question, r.answers[0], tuple(r.answers), qid)
