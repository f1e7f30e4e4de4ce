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
import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from rag_jax.data import task_formats
from rag_jax.data.qa_records import (
    QAFormatError,
    QAPair,
    QARecord,
    check_answers,
    check_question,
    fail,
    json_array_items,
    json_objects,
    lines,
    no_questions,
    parse_answer_list,
    record_error,
)
from rag_jax.data.regex_targets import compile_pattern, regex_target

__all__ = ["FORMATS", "QAFormatError", "QAPair", "QARecord", "parse_answer_list", "read_qa", "detect_format",
           "training_pairs", "eval_pairs", "seq2seq_paths", "read_dpr_csv", "read_jsonl", "read_seq2seq",
           "read_curatedtrec", "read_dpr_biencoder"]

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


def _contexts(item: dict, key: str, path: str | os.PathLike, ln: int) -> list[dict]:
    ctxs = item.get(key, [])
    if not isinstance(ctxs, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in ctxs):
        raise fail(path, ln, f"{key!r} must be a list of {{\"title\", \"text\", ...}} objects")
    return ctxs


def read_dpr_biencoder(path: str | os.PathLike) -> Iterator[QARecord]:
    """DPR's retriever training JSON (``biencoder-*.json``): one array of
    ``{"question", "answers", "positive_ctxs", "negative_ctxs",
    "hard_negative_ctxs"}``, contexts being ``{"title", "text",
    "passage_id", ...}``. Records keep the ``passage_id``s of the positive
    contexts as ``positive_ids`` and, as ``contexts``, the texts of the
    positive and hard-negative contexts (the passages DPR retrieved for the
    question; ``negative_ctxs`` are random passages and are left out)."""
    count = 0
    for ln, item in json_array_items(path):
        if not isinstance(item, dict):
            raise fail(path, ln, f"expected a JSON object, got {type(item).__name__}")
        for key in ("question", "answers"):
            if key not in item:
                raise fail(path, ln, f"missing field {key!r}")
        q = check_question(item["question"], path, ln)
        answers = check_answers(item["answers"], path, ln)
        positives = _contexts(item, "positive_ctxs", path, ln)
        hard = _contexts(item, "hard_negative_ctxs", path, ln)
        ids = tuple(str(c["passage_id"]) for c in positives if "passage_id" in c)
        count += 1
        yield QARecord(q, answers, str(path), ln, ids, contexts=tuple(c["text"] for c in positives + hard))
    if not count:
        raise no_questions(path)


def read_curatedtrec(path: str | os.PathLike) -> Iterator[QARecord]:
    """CuratedTrec, whose answers are regular expressions: DPR's
    ``curatedtrec-*.qa.csv`` (``question<TAB>["regex", ...]``, no header),
    DPR's ``biencoder-curatedtrec-*.json`` (a JSON array, with the passages
    DPR retrieved per question: see ``read_dpr_biencoder``), or JSON lines
    ``{"question", "answers": ["regex", ...]}``. Every pattern must compile as
    DPR compiles it (NFD, case-insensitive); records are marked
    ``answer_patterns``."""
    if str(path).endswith((".jsonl", ".json")):
        reader = read_dpr_biencoder if _starts_with_array(path) else read_jsonl
    else:
        reader = read_dpr_csv
    for rec in reader(path):
        for p in rec.answers:
            try:
                compile_pattern(p)
            except re.error as e:
                raise fail(path, rec.line, f"bad regex {p!r}: {e}") from None
        yield dataclasses.replace(rec, answer_patterns=True)


def _starts_with_array(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


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


def _targets(r: QARecord) -> list[str]:
    if not r.answer_patterns:
        return r.answers
    out = [t for t in (regex_target(p, r.contexts) for p in r.answers) if t is not None]
    if not out:
        raise record_error(r, f"no training target: the answer patterns {r.answers} spell no literal text "
                              f"and match none of the question's {len(r.contexts)} passages")
    return out


def training_pairs(records: Iterable[QARecord]) -> Iterator[QAPair]:
    """One (question, answer) pair per gold answer; duplicates of an answer kept once.

    Regex answers (CuratedTrec) are trained on ``regex_targets.regex_target``
    of each pattern: its most frequent match in the record's ``contexts``
    (the paper retrieves passages per question; DPR's biencoder files ship
    them) or, without contexts or a match, the first string the pattern
    spells. A record without answers (a KILT/FEVER/MS-MARCO test line) fails
    with its ``file:line``: it can be predicted, not trained on.
    """
    for qid, r in enumerate(records):
        if not r.answers:
            raise record_error(r, "no gold answer to train on (a test file without outputs? "
                                  "it can be used for prediction only)")
        seen: set[str] = set()
        for a in _targets(r):
            if a in seen:
                continue
            seen.add(a)
            yield QAPair(r.question, a, tuple(r.answers), qid)


def eval_pairs(records: Iterable[QARecord]) -> Iterator[QAPair]:
    """One pair per question: first answer as target (empty for a record
    without answers), all answers as gold."""
    for qid, r in enumerate(records):
        yield QAPair(r.question, r.answers[0] if r.answers else "", tuple(r.answers), qid)
