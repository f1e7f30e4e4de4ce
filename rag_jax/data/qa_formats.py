"""Readers for QA files, and the one entry point ``read_qa(path, fmt)``.

Open-domain QA: DPR CSV, JSONL, seq2seq line pairs, and CuratedTrec (DPR CSV
or JSONL whose answers are regular expressions). The paper's other tasks
(KILT, FEVER, MS-MARCO NLG, Jeopardy question generation) are read by
``task_formats``; ``FORMATS`` lists every name ``data.format`` accepts besides
``auto``.

Every reader streams ``QARecord``s (one per question, all gold answers kept)
and reports bad input with ``file:line``. ``training_pairs`` expands records
into one (question, answer) pair per gold answer, the recipe the RAG paper
uses for NQ; evaluation keeps the full answer list for max-over-gold metrics.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from rag_jax.data import task_formats
from rag_jax.data.qa_records import (
    QAFormatError,
    QAPair,
    QARecord,
    check_answers,
    check_question,
    fail,
    json_objects,
    lines,
    no_questions,
    parse_answer_list,
)
from rag_jax.data.regex_targets import compile_pattern, regex_target

__all__ = ["FORMATS", "QAFormatError", "QAPair", "QARecord", "parse_answer_list", "read_qa", "detect_format",
           "training_pairs", "eval_pairs", "seq2seq_paths", "read_dpr_csv", "read_jsonl", "read_seq2seq",
           "read_curatedtrec"]

FORMATS = ("dpr_csv", "jsonl", "seq2seq", "curatedtrec") + task_formats.TASK_FORMATS


def read_dpr_csv(path: str | os.PathLike) -> Iterator[QARecord]:
    """``question<TAB>answers-list`` lines (DPR's nq-*.qa.csv); no header."""
    # QUOTE_NONE: questions hold stray quotes that must stay literal (and no
    # field spans lines, so line_num is the file's line).
    reader = csv.reader(lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    count = 0
    for row in reader:
        ln = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 2:
            raise fail(path, ln, f"expected 2 tab-separated fields (question, answers), got {len(row)}")
        q = check_question(row[0], path, ln)
        count += 1
        yield QARecord(q, parse_answer_list(row[1], path, ln), str(path), ln)
    if not count:
        raise no_questions(path)


def read_jsonl(path: str | os.PathLike) -> Iterator[QARecord]:
    """One ``{"question": str, "answers": [str, ...]}`` object per line."""
    count = 0
    for ln, obj in json_objects(path):
        for key in ("question", "answers"):
            if key not in obj:
                hint = ""
                if key == "answers" and "answer" in obj:
                    hint = " (for Jeopardy question generation, answer -> question, set data.format=jeopardy)"
                raise fail(path, ln, f"missing field {key!r}{hint}")
        q = check_question(obj["question"], path, ln)
        pos = obj.get("positive_ids", [])
        if not isinstance(pos, list) or not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in pos):
            raise fail(path, ln, "positive_ids must be a list of passage ids (ints or strings)")
        count += 1
        yield QARecord(q, check_answers(obj["answers"], path, ln), str(path), ln, tuple(str(x) for x in pos))
    if not count:
        raise no_questions(path)


def read_curatedtrec(path: str | os.PathLike) -> Iterator[QARecord]:
    """CuratedTrec, whose answers are regular expressions: DPR's
    ``curatedtrec-*.qa.csv`` (``question<TAB>["regex", ...]``, no header) or,
    for a ``.jsonl``/``.json`` name, ``{"question", "answers": ["regex", ...]}``
    lines. Every pattern must compile as DPR compiles it (NFD,
    case-insensitive); records are marked ``answer_patterns``."""
    reader = read_jsonl if str(path).endswith((".jsonl", ".json")) else read_dpr_csv
    for rec in reader(path):
        for p in rec.answers:
            try:
                compile_pattern(p)
            except re.error as e:
                raise fail(path, rec.line, f"bad regex {p!r}: {e}") from None
        yield QARecord(rec.question, rec.answers, rec.source, rec.line, rec.positive_ids, answer_patterns=True)


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
    sources, targets = lines(src), lines(tgt)
    ln = 0
    while True:
        s, t = next(sources, None), next(targets, None)
        if s is None and t is None:
            break
        ln += 1
        if s is None or t is None:
            short = src if s is None else tgt
            raise fail(short, ln, f"{src.name} and {tgt.name} have different line counts "
                        f"({short.name} ends before line {ln})")
        s, t = s.rstrip("\r\n"), t.rstrip("\r\n")
        q = check_question(s, src, ln)
        t_stripped = t.strip()
        if t_stripped.startswith("["):
            answers = parse_answer_list(t_stripped, tgt, ln)
        else:
            answers = check_answers(t.split("\t") if t_stripped else [], tgt, ln)
        yield QARecord(q, answers, str(src), ln)
    if not ln:
        raise no_questions(src)


def detect_format(path: str | os.PathLike) -> str:
    """The format of a QA file from its name and, for JSON(L), its first line.

    ``X.source``/``X.target`` (or a stem with both) -> ``seq2seq``; a name
    containing ``curatedtrec`` -> ``curatedtrec``; ``.csv``/``.tsv`` ->
    ``dpr_csv``; ``.jsonl``/``.json`` -> by the first line's fields: ``id`` +
    ``input`` -> ``kilt`` (``fever`` when the name says fever or the answers
    are FEVER labels), ``claim`` -> ``fever``, ``query`` (or MS-MARCO's column
    JSON) -> ``msmarco``, ``answer`` + ``question`` with ``jeopardy`` /
    ``searchqa`` in the name or a SearchQA field -> ``jeopardy``, else
    ``jsonl``.
    """
    name = str(path)
    base = Path(name).name.lower()
    if name.endswith((".source", ".target")) or (
        Path(name + ".source").exists() and Path(name + ".target").exists()
    ):
        return "seq2seq"
    if "curatedtrec" in base and name.endswith((".csv", ".tsv", ".jsonl", ".json")):
        return "curatedtrec"
    if name.endswith((".csv", ".tsv")):
        return "dpr_csv"
    if name.endswith((".jsonl", ".json")):
        # A missing file is the caller's to report (it names the config field).
        return (task_formats.sniff_format(path) if Path(name).is_file() else None) or "jsonl"
    if not Path(name).exists():
        raise FileNotFoundError(f"{path}: no such file (nor {Path(name).name}.source + .target)")
    raise ValueError(f"{path}: cannot tell the QA format from the name (.jsonl, .csv/.tsv, or X.source + "
                     f"X.target); set it with --config.data.format (fmt= in Python), one of {FORMATS}")


_READERS: dict[str, Callable[[str | os.PathLike], Iterator[QARecord]]] = {
    "dpr_csv": read_dpr_csv,
    "jsonl": read_jsonl,
    "seq2seq": read_seq2seq,
    "curatedtrec": read_curatedtrec,
    "kilt": task_formats.read_kilt,
    "fever": task_formats.read_fever,
    "msmarco": task_formats.read_msmarco,
    "jeopardy": task_formats.read_jeopardy,
}


def read_qa(path: str | os.PathLike, fmt: str = "auto") -> Iterator[QARecord]:
    """Streams records of a QA file in ``fmt`` (``auto``: ``detect_format``)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown QA format {fmt!r}; expected one of {FORMATS} or 'auto'")
    return _READERS[fmt](path)


def _targets(r: QARecord, passages: Callable[[QARecord], Sequence[str]] | None) -> list[str]:
    if not r.answer_patterns:
        return r.answers
    texts = list(passages(r)) if passages is not None else []
    out = [t for t in (regex_target(p, texts) for p in r.answers) if t is not None]
    if not out:
        raise fail(r.source, r.line, f"no training target: the answer patterns {r.answers} spell no literal text "
                                     "and match none of the passages")
    return out


def training_pairs(records: Iterable[QARecord],
                   passages: Callable[[QARecord], Sequence[str]] | None = None) -> Iterator[QAPair]:
    """One (question, answer) pair per gold answer; duplicates of an answer kept once.

    Regex answers (CuratedTrec) are trained on ``regex_targets.regex_target``
    of each pattern: its most frequent match in ``passages(record)`` (the
    paper retrieves them) or, without passages or a match, the first string
    the pattern spells. A record without answers (a KILT/FEVER/MS-MARCO test
    line) fails with its ``file:line``: it can be predicted, not trained on.
    """
    for qid, r in enumerate(records):
        if not r.answers:
            raise fail(r.source, r.line, "no gold answer to train on (a test file without outputs? "
                                         "it can be used for prediction only)")
        seen: set[str] = set()
        for a in _targets(r, passages):
            if a in seen:
                continue
            seen.add(a)
            yield QAPair(r.question, a, tuple(r.answers), qid)


def eval_pairs(records: Iterable[QARecord]) -> Iterator[QAPair]:
    """One pair per question: first answer as target (empty for a record
    without answers), all answers as gold."""
    for qid, r in enumerate(records):
        yield QAPair(r.question, r.answers[0] if r.answers else "", tuple(r.answers), qid)
