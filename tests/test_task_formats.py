"""Readers of the paper's other tasks (KILT, FEVER, MS-MARCO, Jeopardy,
CuratedTrec), format detection and CuratedTrec's regex training targets."""
import dataclasses
import json
import re

import pytest

from rag_jax.data import qa_formats as F
from rag_jax.data import regex_targets as R


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path, *objs):
    return _write(path, "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))


def _bad_line(tmp_path, name, fmt, good, bad, needle):
    """A file whose line 2 is ``bad`` fails naming file:2 and ``needle``."""
    f = _jsonl(tmp_path / name, good, bad)
    with pytest.raises(F.QAFormatError) as e:
        list(F.read_qa(f, fmt))
    assert str(e.value).startswith(f"{f}:2: "), str(e.value)
    assert needle in str(e.value), str(e.value)


# -------------------------------------------------------------------- KILT
KILT_NQ = {
    "id": "-143054837169120955", "input": "where are the fa cup semi finals played",
    "output": [
        {"answer": "Wembley Stadium", "provenance": [
            {"wikipedia_id": "1025669", "title": "FA Cup", "start_paragraph_id": 30, "bleu_score": 1.0}]},
        {"answer": " the new Wembley Stadium ", "provenance": [{"wikipedia_id": 1025669, "title": "FA Cup"},
                                                                {"wikipedia_id": "45309", "title": "Wembley"}]},
        {"answer": "Wembley Stadium", "meta": {"score": 3}},
        {"provenance": [{"wikipedia_id": "7777", "title": "Semi-final"}]},
    ],
}


def test_kilt_answers_provenance_ids_and_titles(tmp_path):
    f = _jsonl(tmp_path / "nq-dev-kilt.jsonl", KILT_NQ, "",
               {"id": 7, "input": "test question", "meta": {}})
    recs = list(F.read_qa(f))  # auto: id + input -> kilt
    assert F.detect_format(f) == "kilt"
    r = recs[0]
    assert r.question == "where are the fa cup semi finals played"
    assert r.answers == ["Wembley Stadium", "the new Wembley Stadium"]  # non-empty, duplicates once
    assert r.positive_ids == ("1025669", "45309", "7777")  # int ids as strings, each page once, in order
    assert r.titles == ("FA Cup", "Wembley", "Semi-final")
    # KILT's evidence sets: one per output that cites pages.
    assert r.provenance == (("1025669",), ("1025669", "45309"), ("7777",))
    assert r.provenance_titles == (("FA Cup",), ("FA Cup", "Wembley"), ("Semi-final",))
    assert (r.qid, r.line, r.source, r.answer_patterns) == ("-143054837169120955", 1, str(f), False)
    # A test line (no output) is read, with no answers: predictions only.
    assert (recs[1].question, recs[1].answers, recs[1].qid, recs[1].line) == ("test question", [], "7", 3)
    assert [p.answer for p in F.eval_pairs(recs)] == ["Wembley Stadium", ""]
    with pytest.raises(F.QAFormatError, match=rf"^{f}:3: no gold answer to train on"):
        list(F.training_pairs(recs))


@pytest.mark.parametrize("bad,needle", [
    ('{"id": "1", "input": "q", "output": [', "malformed JSON"),
    ({"input": "q", "output": []}, "missing field 'id'"),
    ({"id": "1", "output": [{"answer": "a"}]}, "missing field 'input'"),
    ({"id": "1", "input": "  ", "output": [{"answer": "a"}]}, "empty input"),
    ({"id": True, "input": "q"}, "'id' must be a string or an integer"),
    ({"id": "1", "input": "q", "output": {"answer": "a"}}, "'output' must be a list"),
    ({"id": "1", "input": "q", "output": ["a"]}, "output 0 must be an object"),
    ({"id": "1", "input": "q", "output": [{"answer": 3}]}, "output 0: 'answer' must be a string"),
    ({"id": "1", "input": "q", "output": [{"answer": "a", "provenance": [{"title": "T"}]}]}, "'wikipedia_id'"),
    ({"id": "1", "input": "q", "output": [{"answer": "a", "provenance": {"wikipedia_id": "1"}}]},
     "'provenance' must be a list"),
    ({"id": "1", "input": "q", "output": [{"answer": " "}, {"provenance": []}]}, "holds no non-empty 'answer'"),
])
def test_kilt_bad_lines_name_file_and_line(tmp_path, bad, needle):
    _bad_line(tmp_path, "bad.jsonl", "kilt", KILT_NQ, bad, needle)


# ------------------------------------------------------------------- FEVER
FEVER_SUPPORTS = {"id": 75397, "verifiable": "VERIFIABLE", "label": "SUPPORTS",
                  "claim": "Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
                  "evidence": [[[92206, 104971, "Nikolaj_Coster-Waldau", 7],
                                [92206, 104971, "Fox_Broadcasting_Company", 0]],
                               [[92207, 104972, "Savages_-LRB-2012_film-RRB-", 3]],
                               [[92208, 104973, "Nikolaj_Coster-Waldau", 7]]]}
FEVER_NEI = {"id": 225709, "verifiable": "NOT VERIFIABLE", "label": "NOT ENOUGH INFO",
             "claim": "Tilda Swinton is a vegan.", "evidence": [[[264040, None, None, None]]]}
FEVER_KILT = {"id": "3", "input": "Roman Atwood is a content creator.",
              "output": [{"answer": "SUPPORTS", "provenance": [{"wikipedia_id": "40", "title": "Roman Atwood"}]},
                         {"answer": "SUPPORTS", "provenance": [{"wikipedia_id": "40", "title": "Roman Atwood"}]}]}


def test_fever_original_and_kilt_lines(tmp_path):
    f = _jsonl(tmp_path / "claims.jsonl", FEVER_SUPPORTS, FEVER_NEI, FEVER_KILT, {"id": 9, "claim": "A test claim."})
    assert F.detect_format(f) == "fever"  # "claim" on the first line
    recs = list(F.read_qa(f))
    assert [r.answers for r in recs] == [["SUPPORTS"], ["NOT ENOUGH INFO"], ["SUPPORTS"], []]
    assert recs[0].question == FEVER_SUPPORTS["claim"] and recs[0].qid == "75397"
    # wiki_url -> title: underscores are spaces, -LRB-/-RRB- brackets; each page once.
    assert recs[0].titles == ("Nikolaj Coster-Waldau", "Fox Broadcasting Company", "Savages (2012 film)")
    assert recs[0].positive_ids == ()
    assert recs[0].provenance_titles == (("Nikolaj Coster-Waldau", "Fox Broadcasting Company"),
                                         ("Savages (2012 film)",), ("Nikolaj Coster-Waldau",))
    assert recs[1].titles == recs[1].provenance_titles == ()  # NOT ENOUGH INFO cites no page
    assert (recs[2].titles, recs[2].positive_ids, recs[2].qid) == (("Roman Atwood",), ("40",), "3")
    assert recs[2].provenance == (("40",), ("40",))
    assert (recs[3].qid, recs[3].line) == ("9", 4)
    with pytest.raises(F.QAFormatError, match=rf"^{f}:4: no gold answer"):
        list(F.training_pairs(recs))


@pytest.mark.parametrize("bad,needle", [
    (dict(FEVER_NEI, label="MAYBE"), "label 'MAYBE' is not one of"),
    (dict(FEVER_NEI, label="supports"), "label 'supports' is not one of"),
    (dict(FEVER_KILT, output=[{"answer": "TRUE"}]), "label 'TRUE' is not one of"),
    (dict(FEVER_KILT, output=[{"answer": "SUPPORTS"}, {"answer": "REFUTES"}]), "one label per claim"),
    (dict(FEVER_NEI, evidence=[[[1, 2, "Page"]]]), "expected [annotation_id, evidence_id, wiki_url, sentence_id]"),
    (dict(FEVER_NEI, evidence=[[[1, 2, 5, 0]]]), "wiki_url must be a string or null"),
    (dict(FEVER_NEI, evidence="Page"), "'evidence' must be a list"),
    (dict(FEVER_NEI, claim=""), "empty claim"),
    ({"id": 1, "label": "SUPPORTS"}, "neither 'claim'"),
    ({"claim": "c", "label": "SUPPORTS"}, "missing field 'id'"),
])
def test_fever_bad_lines_name_file_and_line(tmp_path, bad, needle):
    _bad_line(tmp_path, "fever.jsonl", "fever", FEVER_SUPPORTS, bad, needle)


# ----------------------------------------------------------------- MS-MARCO
MARCO_ROWS = [
    {"query": "what is a corporation?", "query_id": 1102432, "query_type": "DESCRIPTION",
     "answers": ["A company is incorporated in a specific nation."],
     "wellFormedAnswers": ["A corporation is a company incorporated in a specific nation."]},
    {"query": "why did rachel carson write", "query_id": 1102431,
     "answers": ["No Answer Present."], "wellFormedAnswers": []},
    {"query": "define bona fides", "query_id": 1102430,
     "answers": ["No Answer Present.", "Good faith."], "wellFormedAnswers": "[]"},
]


def _columns(rows):
    cols = {}
    for i, row in enumerate(rows):
        for k, v in row.items():
            cols.setdefault(k, {})[str(i)] = v
    return cols


def test_msmarco_column_json_and_rows_agree(tmp_path, capsys):
    col = _write(tmp_path / "dev_v2.1.json", json.dumps(_columns(MARCO_ROWS)))  # one line, as released
    rows = _jsonl(tmp_path / "msmarco_dev.jsonl", *MARCO_ROWS)
    pretty = _write(tmp_path / "pretty.json", json.dumps(_columns(MARCO_ROWS), indent=1))
    for f, lines in ((col, [0, 0]), (rows, [1, 3]), (pretty, [0, 0])):
        assert F.detect_format(f) == "msmarco", f
        recs = list(F.read_qa(f))
        # wellFormedAnswers when present, else answers; "No Answer Present." dropped
        # (and the query with nothing else dropped whole).
        assert [(r.question, r.answers, r.qid) for r in recs] == [
            ("what is a corporation?", ["A corporation is a company incorporated in a specific nation."], "1102432"),
            ("define bona fides", ["Good faith."], "1102430"),
        ]
        assert [r.line for r in recs] == lines
        assert f"{f}: dropped 1 of 3 queries with no answer" in capsys.readouterr().err
    list(F.read_qa(col))
    assert capsys.readouterr().err == ""  # reported once per file version


def test_msmarco_test_file_without_answers_is_eval_only(tmp_path):
    f = _write(tmp_path / "eval_v2.1_public.json", json.dumps({"query": {"0": "a query"}, "query_id": {"0": 5}}))
    recs = list(F.read_qa(f, "msmarco"))
    assert [(r.question, r.answers, r.qid) for r in recs] == [("a query", [], "5")]
    # Column-form records have no line: errors about them name the query.
    with pytest.raises(F.QAFormatError, match=rf"^{f}: query '5': no gold answer to train on"):
        list(F.training_pairs(recs))


def test_msmarco_bad_input(tmp_path):
    _bad_line(tmp_path, "m.jsonl", "msmarco", MARCO_ROWS[0], {"answers": ["x"]}, "missing field 'query'")
    _bad_line(tmp_path, "m.jsonl", "msmarco", MARCO_ROWS[0], dict(MARCO_ROWS[0], answers="x"),
              "answers must be a list of strings")
    _bad_line(tmp_path, "m.jsonl", "msmarco", MARCO_ROWS[0], dict(MARCO_ROWS[0], query=" "), "query must be")
    bad = _write(tmp_path / "bad.json", '{"query": {"0": "q"},\n "answers": {"0": ["a"]\n')
    with pytest.raises(F.QAFormatError, match=rf"^{bad}:3: malformed JSON"):
        list(F.read_qa(bad, "msmarco"))
    cols = _columns(MARCO_ROWS)
    cols["query"]["2"] = 17
    bad = _write(tmp_path / "bad2.json", json.dumps(cols))
    with pytest.raises(F.QAFormatError, match=rf"^{bad}: query '2': query must be a non-empty string"):
        list(F.read_qa(bad, "msmarco"))
    none = _write(tmp_path / "none.json", json.dumps(_columns(MARCO_ROWS[1:2])))
    with pytest.raises(F.QAFormatError, match="all 1 queries have no answer"):
        list(F.read_qa(none, "msmarco"))


# ---------------------------------------------------------------- Jeopardy
def test_jeopardy_pairs_swap_direction(tmp_path):
    line = {"category": "HISTORY", "air_date": "2004-12-31", "answer": "Copernicus",
            "question": "'For the last 8 years of his life, Galileo was under house arrest for espousing this man's "
                        "theory'"}
    f = _jsonl(tmp_path / "train.jsonl", line, {"answer": "Jim Thorpe", "question": "No. 2: 1912 Olympian"})
    assert F.detect_format(f) == "jeopardy"  # a SearchQA field on the first line
    recs = list(F.read_qa(f))
    assert [(r.question, r.answers) for r in recs] == [("Copernicus", [line["question"]]),
                                                       ("Jim Thorpe", ["No. 2: 1912 Olympian"])]
    # Bare {"answer", "question"} lines are Jeopardy only when the name says so;
    # otherwise the QA reader refuses them with a hint, instead of training backwards.
    plain = _jsonl(tmp_path / "pairs.jsonl", {"answer": "a", "question": "q"})
    assert F.detect_format(plain) == "jsonl"
    with pytest.raises(F.QAFormatError, match=r"pairs\.jsonl:1: missing field 'answers' .*data.format=jeopardy"):
        list(F.read_qa(plain))
    named = _jsonl(tmp_path / "searchqa_dev.jsonl", {"answer": "a", "question": "q"})
    assert F.detect_format(named) == "jeopardy"


@pytest.mark.parametrize("bad,needle", [
    ({"answer": "a"}, "missing field 'question'"),
    ({"question": "q"}, "missing field 'answer'"),
    ({"answer": "", "question": "q"}, "empty answer"),
    ({"answer": "a", "question": ["q"]}, "question must be a string"),
])
def test_jeopardy_bad_lines(tmp_path, bad, needle):
    _bad_line(tmp_path, "jeopardy.jsonl", "jeopardy", {"answer": "a", "question": "q"}, bad, needle)


# -------------------------------------------------------------- CuratedTrec
def test_curatedtrec_dpr_csv_regexes(tmp_path):
    # DPR's CSV holds Python list reprs, so a regex backslash is written doubled.
    f = _write(tmp_path / "curatedtrec-test.qa.csv",
               "Who was the first U.S. president?\t['(George )?Washington']\n"
               "How tall is Mount Everest?\t['29,?0(29|35) (feet|ft\\\\.?)', '8,?848 m']\n")
    assert F.detect_format(f) == "curatedtrec"
    recs = list(F.read_qa(f))
    assert all(r.answer_patterns for r in recs)
    assert recs[1].answers == [r"29,?0(29|35) (feet|ft\.?)", "8,?848 m"]
    pairs = list(F.training_pairs(recs))
    # No passages: the first string each pattern spells.
    assert [(p.qid, p.answer) for p in pairs] == [(0, "George Washington"), (1, "29,029 feet"), (1, "8,848 m")]
    assert pairs[1].answers == tuple(recs[1].answers)


def _ctx(text, pid=None):
    return {"title": "T", "text": text, "score": 1.0, **({"passage_id": pid} if pid else {})}


def test_curatedtrec_dpr_biencoder_json_takes_targets_from_its_passages(tmp_path):
    items = [
        {"dataset": "curatedtrec", "question": "Who was the first U.S. president?",
         "answers": ["(George )?Washington"],
         "positive_ctxs": [_ctx("Washington crossed the Delaware; Washington, D.C.", "11"), _ctx("George Washington")],
         "negative_ctxs": [_ctx("George Washington " * 5)],  # random passages: not counted
         "hard_negative_ctxs": []},
        {"question": "How tall is Mount Everest?", "answers": [r"29,?0(29|35) (feet|ft\.?)", "8,?848 m", r"\d+ m"],
         "positive_ctxs": [_ctx("at 29035 ft it was ... 29035 ft. and 29,029 feet", "12")],
         "hard_negative_ctxs": [_ctx("8848 m")]},
    ]
    text = json.dumps(items, indent=4)
    f = _write(tmp_path / "biencoder-curatedtrec-train.json", text)
    assert F.detect_format(f) == "curatedtrec"
    recs = list(F.read_qa(f))
    # Each item's first line in the pretty-printed array (an item opens with "    {").
    assert [r.line for r in recs] == [i + 1 for i, x in enumerate(text.splitlines()) if x == "    {"]
    assert recs[0].positive_ids == ("11",) and len(recs[0].contexts) == 2 and recs[1].answer_patterns
    # Most frequent match among positive + hard-negative passages; "\d+ m" spells
    # nothing but matches "8848 m" (the same target as its sibling: kept once).
    assert [(p.qid, p.answer) for p in F.training_pairs(recs)] == [(0, "Washington"), (1, "29035 ft"), (1, "8848 m")]
    last = '  {"question": "q", "answers": ["(a"]}'
    text = json.dumps(items[:1], indent=2)[:-2] + ",\n" + last + "\n]"
    bad = _write(tmp_path / "biencoder-curatedtrec-dev.json", text)
    with pytest.raises(F.QAFormatError, match=rf"^{bad}:{text.splitlines().index(last) + 1}: bad regex '\(a'"):
        list(F.read_qa(bad))
    for text, line, needle in (('[{"question": "q", "answers": ["a"]}\n {"x": 1}]', 2, "expected ',' or ']'"),
                               ('[{"question": "q", "answers": ["a"]},\n {"question": "q2"}]', 2,
                                "missing field 'answers'"),
                               ('[{"question": "q", "answers": ["a"]},\n {"question": "q2", "answers": ["a"],'
                                ' "positive_ctxs": ["text"]}]', 2, "'positive_ctxs' must be a list"),
                               ('[{"question": "q", "answers": ["a"]},\n {"question": ', 2, "malformed JSON"),
                               ('[{"question": "q", "answers": ["a"]}]\n]', 2, "extra data")):
        bad = _write(tmp_path / "curatedtrec-bad.json", text)
        with pytest.raises(F.QAFormatError, match=rf"^{bad}:{line}: {re.escape(needle)}"):
            list(F.read_qa(bad))


def test_curatedtrec_bad_regex_and_untrainable_pattern(tmp_path):
    f = _write(tmp_path / "curatedtrec-train.qa.csv", "q1\t['ok']\nq2\t['fine', '(unclosed']\n")
    with pytest.raises(F.QAFormatError, match=rf"^{f}:2: bad regex '\(unclosed': missing \)"):
        list(F.read_qa(f))
    j = _jsonl(tmp_path / "curatedtrec.jsonl", {"question": "q1", "answers": ["a"]},
               {"question": "how many?", "answers": [r"\d+"]})
    recs = list(F.read_qa(j))
    assert all(r.answer_patterns for r in recs)
    with pytest.raises(F.QAFormatError, match=rf"^{j}:2: no training target"):
        list(F.training_pairs(recs))
    # A passage of the question that matches gives it one.
    with_ctx = dataclasses.replace(recs[1], contexts=("about 42 of them",))
    assert [p.answer for p in F.training_pairs([with_ctx])] == ["42"]


# ------------------------------------------------------------ regex targets
@pytest.mark.parametrize("pattern,spelled", [
    ("(George )?Washington", ["George Washington", "Washington"]),
    (r"Sam(uel)?\s+Houston", ["Samuel Houston", "Sam Houston"]),
    (r"\d+ (feet|ft\.?)", ["feet", "ft.", "ft"]),
    ("[Cc]olou?r", ["Colour", "Color", "colour", "color"]),
    (r"\bMount Everest\b", ["Mount Everest"]),
    ("a{2}b+c*", ["aabc"]),
    ("^$|foo", ["foo"]),
    (r"\d+", []),
    (".*", []),
])
def test_expand_pattern(pattern, spelled):
    assert R.expand_pattern(pattern) == spelled


def test_expand_pattern_limit_and_bad_regex():
    assert len(R.expand_pattern("(a|b)(c|d)(e|f)(g|h)(i|j)")) == R.EXPANSION_LIMIT
    assert R.expand_pattern("(a|b)(c|d)", limit=3) == ["ac", "ad", "bc"]
    with pytest.raises(Exception, match="missing"):
        R.expand_pattern("(a")


def test_most_frequent_match_counts_case_blind_with_first_seen_ties():
    texts = ["Ebola and EBOLA", "ebola virus", "EBOLA"]
    # Matching ignores case (DPR's flags); counts are of the surface strings.
    assert R.most_frequent_match("ebola", texts) == "EBOLA"
    assert R.most_frequent_match("ebola", ["Ebola", "EBOLA"]) == "Ebola"  # tie: first seen
    assert R.most_frequent_match("x+", ["none here"]) is None
    # NFD matching (as DPR) finds a composed é with a composed pattern; the match comes back composed.
    assert R.most_frequent_match("caf\u00e9", ["Cafe\u0301 au lait"]) == "Caf\u00e9"
    assert R.regex_target("(George )?Washington", ["nothing relevant"]) == "George Washington"
    assert R.regex_target(r"\d+", []) is None


# --------------------------------------------------------------- detection
def test_detect_format_by_name_and_first_line(tmp_path):
    cases = {
        "nq.qa.csv": ("dpr_csv", "q\t['a']\n"),
        "qa.jsonl": ("jsonl", json.dumps({"question": "q", "answers": ["a"]}) + "\n"),
        "fever-dev-kilt.jsonl": ("fever", json.dumps({"id": "1", "input": "c"}) + "\n"),
        "claims-kilt.jsonl": ("fever", json.dumps(FEVER_KILT) + "\n"),
        "triviaqa-dev-kilt.jsonl": ("kilt", "\n" + json.dumps(KILT_NQ) + "\n"),
        "eli5.jsonl": ("kilt", json.dumps({"id": "x", "input": "why?", "output": [{"answer": "SUPPORTS maybe"}]})),
        "marco.jsonl": ("msmarco", json.dumps(MARCO_ROWS[0]) + "\n"),
        "curatedtrec-dev.jsonl": ("curatedtrec", json.dumps({"question": "q", "answers": ["a"]}) + "\n"),
        "broken.jsonl": ("jsonl", "{not json\n"),
    }
    for name, (fmt, text) in cases.items():
        assert F.detect_format(_write(tmp_path / name, text)) == fmt, name
    # A column-oriented MS-MARCO file is told apart without parsing its (huge) first line.
    big = _write(tmp_path / "train_v2.1.json",
                 '{"answers": {"0": ["' + "x" * (1 << 21) + '"]}, "query": {"0": "q"}}')
    assert F.detect_format(big) == "msmarco"
    assert F.detect_format(tmp_path / "missing.jsonl") == "jsonl"  # the caller reports the missing file


def test_invalid_utf8_names_the_line(tmp_path):
    f = tmp_path / "kilt.jsonl"
    f.write_bytes(json.dumps(KILT_NQ).encode() + b"\n" + b'{"id": "2", "input": "caf\xe9"}\n')
    with pytest.raises(F.QAFormatError, match=rf"^{f}:2: invalid UTF-8"):
        list(F.read_qa(f, "kilt"))


def test_config_accepts_every_format_and_refuses_training_on_a_test_file(tmp_path):
    from rag_jax.config import load_config_module
    from rag_jax.train.config_checks import validate
    from rag_jax.train.setup import check_inputs

    cfg = load_config_module(__file__.replace("tests/test_task_formats.py", "configs/tiny.py")).get_config()
    for fmt in F.FORMATS:
        cfg.data.format = fmt
        validate(cfg)
    test = _jsonl(tmp_path / "nq-test-kilt.jsonl", {"id": "1", "input": "q one"}, {"id": "2", "input": "q two"})
    cfg.data.format = "auto"
    cfg.data.train_file = ""
    cfg.data.test_file = str(test)
    check_inputs(cfg, required=("test",), need_index=False)  # eval-only use is fine
    cfg.data.train_file = str(test)
    with pytest.raises(F.QAFormatError, match=rf"^{test}:1: no gold answer to train on"):
        check_inputs(cfg, need_index=False)


# ------------------------------------------------------------ TFDS dataset
def test_tfds_rows_carry_provenance_and_regex_targets(tmp_path):
    from rag_jax.data import pipeline as P
    from rag_jax.data import tfds_builders as T

    kilt = _jsonl(tmp_path / "nq-train-kilt.jsonl", KILT_NQ,
                  {"id": "q2", "input": "who wrote hamlet", "output": [{"answer": "Shakespeare"}]})
    trec = _write(tmp_path / "curatedtrec-train.qa.csv", "Who was the first U.S. president?\t['(George )?Washington']\n")
    ds = T.build_qa_dataset({"train": kilt, "validation": trec}, tmp_path / "tfds",
                            pair_splits=("train", "validation"))
    train = [P.decode_row(r) for r in T.open_split(ds, "train")]
    assert [(r["answer"], r["qid"], r["record_id"]) for r in train] == [
        ("Wembley Stadium", 0, "-143054837169120955"), ("the new Wembley Stadium", 0, "-143054837169120955"),
        ("Shakespeare", 1, "q2")]
    assert train[0]["positive_ids"] == ["1025669", "45309", "7777"]
    assert train[0]["titles"] == ["FA Cup", "Wembley", "Semi-final"]
    assert train[2]["positive_ids"] == [] and not train[0]["answer_patterns"]
    (row,) = [P.decode_row(r) for r in T.open_split(ds, "validation")]
    assert (row["answer"], row["answers"], row["answer_patterns"]) == (
        "George Washington", ["(George )?Washington"], True)
    batch = next(P.qa_loader_from_dir(ds, "train", 3, shuffle=False))
    assert batch["record_id"] == ["-143054837169120955"] * 2 + ["q2"]
    assert batch["answer_patterns"].tolist() == [False] * 3
    # A test file (no outputs) as training data fails before anything is written.
    test = _jsonl(tmp_path / "nq-test-kilt.jsonl", {"id": "1", "input": "q"})
    with pytest.raises(F.QAFormatError, match=rf"^{test}:1: no gold answer to train on"):
        T.build_qa_dataset({"train": test}, tmp_path / "tfds2")
    assert not (tmp_path / "tfds2").exists()
    # ... and is fine as an evaluation split.
    ev = T.build_qa_dataset({"test": test}, tmp_path / "tfds2")
    assert [P.decode_row(r)["answers"] for r in T.open_split(ev, "test")] == [[]]
