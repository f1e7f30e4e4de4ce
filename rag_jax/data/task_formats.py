"""Readers for the RAG paper's other tasks: KILT, FEVER, MS-MARCO NLG and
Jeopardy question generation (CuratedTrec, a QA format whose answers are
regular expressions, is read in ``qa_formats``).

Each streams ``QARecord``s and reports a bad line as ``file:line: reason``
(``QAFormatError``), as the QA readers of ``qa_formats`` do; ``read_qa`` there
is the one entry point (``data.format`` = ``kilt`` | ``fever`` | ``msmarco`` |
``jeopardy``, or ``auto``, which ``sniff_format`` serves).

What a record holds per task (``question`` is always the generator's input):

* ``kilt``: question = ``input``; answers = the non-empty ``output[].answer``
  strings; ``positive_ids`` / ``titles`` = the ``provenance`` pages'
  ``wikipedia_id`` / ``title``, and per output (KILT's evidence sets)
  ``provenance`` / ``provenance_titles``; ``qid`` = ``id``. A KILT test file has no
  ``output``: its records have no answers, fine for prediction, refused for
  training (``qa_formats.training_pairs``).
* ``fever``: answers = [the label] verbatim (SUPPORTS / REFUTES /
  NOT ENOUGH INFO; mapping labels to generator tokens is the task's job),
  from KILT's FEVER (``output[].answer``) or the original
  ``{"id", "claim", "label", "evidence"}`` whose ``wiki_url``s become titles.
* ``msmarco``: answers = ``wellFormedAnswers`` when there are any, else
  ``answers`` (the NLG target).
* ``jeopardy``: question = the answer entity, answers = [the Jeopardy question].
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from rag_jax.data.qa_records import (
    QARecord,
    QAFormatError,
    check_question,
    decode_line,
    fail,
    json_objects,
    no_questions,
    read_json_text,
)

TASK_FORMATS = ("kilt", "fever", "msmarco", "jeopardy")
FEVER_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
MSMARCO_NO_ANSWER = "No Answer Present."


def _check_id(value: object, path: str | os.PathLike, ln: int, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise fail(path, ln, f"{key!r} must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _flat(sets: list[tuple[str, ...]]) -> tuple[str, ...]:
    return _unique([x for s in sets for x in s])


# -------------------------------------------------------------------- KILT
def _kilt_record(obj: Mapping[str, Any], path: str | os.PathLike, ln: int) -> QARecord:
    for key in ("id", "input"):
        if key not in obj:
            raise fail(path, ln, f"missing field {key!r} (a KILT line is {{\"id\", \"input\", \"output\"}})")
    qid = _check_id(obj["id"], path, ln, "id")
    question = check_question(obj["input"], path, ln, "input")
    output = obj.get("output", [])
    if not isinstance(output, list):
        raise fail(path, ln, f"'output' must be a list, got {type(output).__name__}")
    answers, id_sets, title_sets = [], [], []
    for i, out in enumerate(output):
        if not isinstance(out, dict):
            raise fail(path, ln, f"output {i} must be an object, got {type(out).__name__}")
        answer = out.get("answer")
        if answer is not None:
            if not isinstance(answer, str):
                raise fail(path, ln, f"output {i}: 'answer' must be a string, got {type(answer).__name__}")
            if answer.strip():
                answers.append(answer.strip())
        provenance = out.get("provenance", [])
        if not isinstance(provenance, list):
            raise fail(path, ln, f"output {i}: 'provenance' must be a list, got {type(provenance).__name__}")
        ids, titles = [], []
        for j, prov in enumerate(provenance):
            if not isinstance(prov, dict) or "wikipedia_id" not in prov:
                raise fail(path, ln, f"output {i}: provenance {j} must be an object with a 'wikipedia_id'")
            ids.append(_check_id(prov["wikipedia_id"], path, ln, "wikipedia_id"))
            title = prov.get("title")
            if title is not None:
                if not isinstance(title, str):
                    raise fail(path, ln, f"output {i}: provenance {j}: 'title' must be a string")
                if title.strip():
                    titles.append(title.strip())
        if ids:
            id_sets.append(_unique(ids))
            title_sets.append(_unique(titles))
    if output and not answers:
        # An output without answers is provenance-only: a record with gold
        # pages and nothing to generate is a broken line, not a test question.
        raise fail(path, ln, "'output' holds no non-empty 'answer'")
    return QARecord(question, list(_unique(answers)), str(path), ln, _flat(id_sets), _flat(title_sets), qid,
                    provenance=tuple(id_sets), provenance_titles=tuple(title_sets))


def read_kilt(path: str | os.PathLike) -> Iterator[QARecord]:
    """KILT JSONL: ``{"id", "input", "output": [{"answer", "provenance":
    [{"wikipedia_id", "title", ...}]}, ...]}`` per line (NQ, TriviaQA, FEVER,
    ELI5, zsRE, T-REx, Wizard of Wikipedia... as KILT distributes them).
    ``output`` may be absent (test files): the record then has no answers."""
    count = 0
    for ln, obj in json_objects(path):
        count += 1
        yield _kilt_record(obj, path, ln)
    if not count:
        raise no_questions(path)


# ------------------------------------------------------------------- FEVER
def _fever_title(wiki_url: str) -> str:
    """A FEVER ``wiki_url`` (``Nikolaj_Coster-Waldau``, ``Savages_-LRB-2012_film-RRB-``)
    as a page title (``Savages (2012 film)``): FEVER's dump escapes brackets
    and colons as PTB tokens and spaces as underscores."""
    for token, char in (("-LRB-", "("), ("-RRB-", ")"), ("-LSB-", "["), ("-RSB-", "]"),
                        ("-LCB-", "{"), ("-RCB-", "}"), ("-COLON-", ":")):
        wiki_url = wiki_url.replace(token, char)
    return wiki_url.replace("_", " ").strip()


def _fever_label(label: object, path: str | os.PathLike, ln: int) -> str:
    if not isinstance(label, str) or label not in FEVER_LABELS:
        raise fail(path, ln, f"label {label!r} is not one of {FEVER_LABELS}")
    return label


def _fever_original(obj: Mapping[str, Any], path: str | os.PathLike, ln: int) -> QARecord:
    if "id" not in obj:
        raise fail(path, ln, "missing field 'id'")
    qid = _check_id(obj["id"], path, ln, "id")
    claim = check_question(obj["claim"], path, ln, "claim")
    # The shared task's test file has neither label nor evidence: eval-only.
    answers = [_fever_label(obj["label"], path, ln)] if "label" in obj else []
    evidence = obj.get("evidence", [])
    title_sets = []
    if not isinstance(evidence, list):
        raise fail(path, ln, f"'evidence' must be a list of evidence sets, got {type(evidence).__name__}")
    for i, group in enumerate(evidence):
        if not isinstance(group, list):
            raise fail(path, ln, f"evidence set {i} must be a list, got {type(group).__name__}")
        titles = []
        for item in group:
            if not isinstance(item, list) or len(item) != 4:
                raise fail(path, ln, f"evidence set {i}: expected [annotation_id, evidence_id, wiki_url, "
                                     f"sentence_id], got {json.dumps(item)[:80]}")
            url = item[2]
            if url is None:  # NOT ENOUGH INFO claims cite no page
                continue
            if not isinstance(url, str):
                raise fail(path, ln, f"evidence set {i}: wiki_url must be a string or null, got {url!r}")
            titles.append(_fever_title(url))
        if titles:
            title_sets.append(_unique(titles))
    return QARecord(claim, answers, str(path), ln, (), _flat(title_sets), qid, provenance_titles=tuple(title_sets))


def read_fever(path: str | os.PathLike) -> Iterator[QARecord]:
    """FEVER claims, either form per line: KILT's (``{"id", "input", "output":
    [{"answer": "SUPPORTS" | "REFUTES", "provenance": [...]}]}``) or the
    original (``{"id", "claim", "label", "evidence": [[[annotation_id,
    evidence_id, wiki_url, sentence_id], ...], ...]}``). answers = [label],
    one label per claim, checked against SUPPORTS / REFUTES / NOT ENOUGH INFO.
    A line without label (a test claim) gets no answers: eval-only."""
    count = 0
    for ln, obj in json_objects(path):
        if "input" in obj:
            rec = _kilt_record(obj, path, ln)
            for a in rec.answers:
                _fever_label(a, path, ln)
            if len(rec.answers) > 1:
                raise fail(path, ln, f"one label per claim expected, got {rec.answers}")
        elif "claim" in obj:
            rec = _fever_original(obj, path, ln)
        else:
            raise fail(path, ln, "neither 'claim' (FEVER) nor 'input' (KILT FEVER) in the line")
        count += 1
        yield rec
    if not count:
        raise no_questions(path)


# ----------------------------------------------------------------- MS-MARCO
_reported_drops: set[tuple[str, int, int]] = set()


def _report_dropped(path: str | os.PathLike, dropped: int, total: int) -> None:
    """One stderr line per file version and process: the reader runs several
    times per command (input checks, dataset build, evaluation)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if dropped and key not in _reported_drops:
        _reported_drops.add(key)
        print(f"[msmarco] {path}: dropped {dropped} of {total} queries with no answer "
              f"(only {MSMARCO_NO_ANSWER!r})", file=sys.stderr, flush=True)


def _string_list(value: object, where: str) -> list[str]:
    # v2.1's column JSON writes "no well-formed answer" as the string "[]".
    if value is None or value == "[]":
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"{where} must be a list of strings, got {json.dumps(value)[:80]}")
    return [x.strip() for x in value if x.strip()]


def _msmarco_record(query: object, answers: object, well_formed: object, has_answers: bool, qid: str,
                    path: str | os.PathLike, ln: int, where: str) -> QARecord | None:
    """None for a query whose answers are only "No Answer Present."."""
    if not isinstance(query, str) or not query.strip():
        raise QAFormatError(f"{where}: query must be a non-empty string, got {json.dumps(query)[:80]}")
    try:
        wf = _string_list(well_formed, "wellFormedAnswers")
        plain = [a for a in _string_list(answers, "answers") if a != MSMARCO_NO_ANSWER]
    except ValueError as e:
        raise QAFormatError(f"{where}: {e}") from None
    target = wf or plain
    if has_answers and not target:
        return None
    return QARecord(query.strip(), target, str(path), ln, qid=qid)


def _first_content_line(path: str | os.PathLike, limit: int = 1 << 20) -> tuple[str, bool]:
    """The first non-blank line (at most ``limit`` bytes of it) and whether it
    was read whole."""
    with open(path, "rb") as f:
        ln = 0
        while True:
            raw = f.readline(limit)
            ln += 1
            if not raw:
                return "", True
            whole = raw.endswith(b"\n") or len(raw) < limit
            if ln == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if raw.strip() or not whole:
                if not whole:
                    return raw.decode("utf-8", errors="replace"), False
                return decode_line(raw, path, ln), True


def _msmarco_rows(path: str | os.PathLike) -> Iterator[tuple[QARecord | None, int]]:
    for ln, obj in json_objects(path):
        if "query" not in obj:
            raise fail(path, ln, "missing field 'query'")
        qid = _check_id(obj.get("query_id", ""), path, ln, "query_id")
        yield _msmarco_record(obj["query"], obj.get("answers"), obj.get("wellFormedAnswers"), "answers" in obj,
                              qid, path, ln, f"{path}:{ln}"), ln


def _msmarco_columns(path: str | os.PathLike) -> Iterator[tuple[QARecord | None, int]]:
    text = read_json_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise fail(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("query"), dict):
        raise fail(path, 1, "expected MS-MARCO v2.1 JSON ({\"query\": {key: text}, \"answers\": {...}, ...}) "
                            "or JSON lines with a 'query' each")
    columns = {}
    for name in ("answers", "wellFormedAnswers", "query_id"):
        col = data.get(name, {})
        if not isinstance(col, dict):
            raise fail(path, 1, f"column {name!r} must be an object keyed like 'query'")
        columns[name] = col
    # The column form is one JSON value: its entries have no line of their
    # own, so errors name the entry's key instead (and records carry line 0).
    for key, query in data["query"].items():
        where = f"{path}: query {key!r}"
        qid = columns["query_id"].get(key, key)
        if isinstance(qid, bool) or not isinstance(qid, (str, int)):
            raise QAFormatError(f"{where}: query_id must be a string or an integer")
        yield _msmarco_record(query, columns["answers"].get(key), columns["wellFormedAnswers"].get(key),
                              key in columns["answers"], str(qid), path, 0, where), 0


def read_msmarco(path: str | os.PathLike) -> Iterator[QARecord]:
    """MS-MARCO (v2.1 NLG) queries: the released column-oriented JSON
    (``{"query": {key: text}, "answers": {key: [...]}, "wellFormedAnswers":
    {key: [...] or "[]"}, "query_id": {...}, ...}``) or JSON lines of the same
    fields per query (``{"query", "answers", "wellFormedAnswers", ...}``, as
    HF ``datasets`` exports it).

    The NLG target is ``wellFormedAnswers`` when the query has any (the
    column form writes none as the string ``"[]"``), else ``answers``.
    Queries whose only answer is ``"No Answer Present."`` are dropped: there
    is nothing to generate. The count of dropped queries is printed once to
    stderr. A query without an ``answers`` field at all (the test file) is
    kept with no answers: eval-only.
    """
    head, whole = _first_content_line(path)
    rows = False
    if whole and head.strip():
        try:
            first = json.loads(head)
            rows = isinstance(first, dict) and not isinstance(first.get("query"), dict)
        except json.JSONDecodeError:
            rows = False  # a column JSON spread over several lines
    total = dropped = 0
    for rec, _ in (_msmarco_rows(path) if rows else _msmarco_columns(path)):
        total += 1
        if rec is None:
            dropped += 1
            continue
        yield rec
    _report_dropped(path, dropped, total)
    if total == dropped:
        if total:
            raise QAFormatError(f"{path}: all {total} queries have no answer ({MSMARCO_NO_ANSWER!r})")
        raise no_questions(path)


# ---------------------------------------------------------------- Jeopardy
def read_jeopardy(path: str | os.PathLike) -> Iterator[QARecord]:
    """Jeopardy question generation, SearchQA's Jeopardy! pairs: one
    ``{"answer": str, "question": str}`` per line (SearchQA's own field names;
    its other fields, e.g. ``category``, ``air_date``, ``search_results``, are
    ignored). The generator's input is the answer entity, its target the
    Jeopardy question: question = ``answer``, answers = [``question``]."""
    count = 0
    for ln, obj in json_objects(path):
        for key in ("answer", "question"):
            if key not in obj:
                raise fail(path, ln, f"missing field {key!r} (a Jeopardy line is {{\"answer\", \"question\"}})")
        entity = check_question(obj["answer"], path, ln, "answer")
        jeopardy = check_question(obj["question"], path, ln, "question")
        qid = _check_id(obj["id"], path, ln, "id") if "id" in obj else ""
        count += 1
        yield QARecord(entity, [jeopardy], str(path), ln, qid=qid)
    if not count:
        raise no_questions(path)


# ----------------------------------------------------------------- sniffing
_MSMARCO_COLUMN = re.compile(r'^\s*\{\s*"(answers|passages|query|query_id|query_type|wellFormedAnswers)"\s*:\s*\{')
_SEARCHQA_KEYS = ("category", "air_date", "show_number", "search_results")


def sniff_format(path: str | os.PathLike) -> str | None:
    """The task format of a JSON(L) file from its first line (and name), or
    None for plain QA JSONL / an unreadable first line (the JSONL reader then
    reports it). Jeopardy needs "jeopardy" or "searchqa" in the file name or
    a SearchQA field, because ``{"question", "answer"}`` lines could as well
    be QA pairs, and reading those the wrong way round would train silently
    backwards."""
    name = Path(path).name.lower()
    with open(path, "rb") as f:  # the column JSON may be one huge line, or pretty-printed
        start = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")
    if _MSMARCO_COLUMN.match(start):
        return "msmarco"
    head, whole = _first_content_line(path)
    if not whole:
        return None
    try:
        obj = json.loads(head)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if "input" in obj and "id" in obj:
        out = obj.get("output")
        answers = [o.get("answer") for o in out if isinstance(o, dict)] if isinstance(out, list) else []
        if "fever" in name or (answers and all(a in FEVER_LABELS for a in answers)):
            return "fever"
        return "kilt"
    if "claim" in obj:
        return "fever"
    if "query" in obj:
        return "msmarco"
    if "answer" in obj and "question" in obj and "answers" not in obj:
        if "jeopardy" in name or "searchqa" in name or any(k in obj for k in _SEARCHQA_KEYS):
            return "jeopardy"
    return None
