"""QA readers, the TFDS array_record dataset and the grain loader."""
import json

import pytest

from rag_jax.data import pipeline as P
from rag_jax.data import qa_formats as F
from rag_jax.data import tfds_builders as T


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------- readers
def test_dpr_csv_python_and_json_lists(tmp_path):
    f = _write(tmp_path / "nq.qa.csv",
               "who wrote hamlet\t['William Shakespeare', 'Shakespeare']\n"
               "\n"
               "what's the \"big apple\"\t[\"New York City\"]\n"
               "who said 'hi'\t['O\\'Brien']\n")
    recs = list(F.read_qa(f))
    assert [r.question for r in recs] == ["who wrote hamlet", 'what\'s the "big apple"', "who said 'hi'"]
    assert recs[0].answers == ["William Shakespeare", "Shakespeare"]
    assert recs[1].answers == ["New York City"]
    assert recs[2].answers == ["O'Brien"]
    assert [r.line for r in recs] == [1, 3, 4]


@pytest.mark.parametrize("line,needle", [
    ("only a question", "expected 2 tab-separated fields"),
    ("q\t['a']\textra", "expected 2 tab-separated fields"),
    ("   \t['a']", "empty question"),
    ("q\t['a', ", "cannot parse answers list"),
    ("q\t[]", "empty answers list"),
    ("q\t['', '  ']", "empty answers list"),
    ("q\t'just a string'", "got a single string"),
    ("q\t[1, 2]", "answer 0 is int"),
])
def test_dpr_csv_errors_name_file_and_line(tmp_path, line, needle):
    f = _write(tmp_path / "bad.csv", "fine question\t['ok']\n" + line + "\n")
    with pytest.raises(F.QAFormatError) as e:
        list(F.read_dpr_csv(f))
    assert str(e.value).startswith(f"{f}:2:"), str(e.value)
    assert needle in str(e.value)


def test_jsonl_reader_and_errors(tmp_path):
    good = _write(tmp_path / "a.jsonl",
                  json.dumps({"question": " q1 ", "answers": ["x", "y"], "extra": 1}) + "\n\n"
                  + json.dumps({"question": "q2", "answers": ["z"]}) + "\n")
    recs = list(F.read_qa(good))
    assert [(r.question, r.answers, r.line) for r in recs] == [("q1", ["x", "y"], 1), ("q2", ["z"], 3)]
    cases = [
        ('{"question": "q", "answers": ["a"]', "malformed JSON"),
        ('["q", ["a"]]', "expected a JSON object"),
        ('{"answers": ["a"]}', "missing field 'question'"),
        ('{"question": "", "answers": ["a"]}', "empty question"),
        ('{"question": "q", "answers": []}', "empty answers list"),
        ('{"question": "q", "answers": "a"}', "got a single string"),
    ]
    for i, (line, needle) in enumerate(cases):
        f = _write(tmp_path / f"bad{i}.jsonl", json.dumps({"question": "q", "answers": ["a"]}) + "\n" + line + "\n")
        with pytest.raises(F.QAFormatError, match=needle) as e:
            list(F.read_qa(f))
        assert str(e.value).startswith(f"{f}:2:")


def test_seq2seq_pairs_and_mismatch(tmp_path):
    _write(tmp_path / "train.source", "q one\nq two\nq three\n")
    _write(tmp_path / "train.target", "a1\na2\tb2\n['x', 'y']\n")
    for name in ("train", "train.source", "train.target"):
        recs = list(F.read_qa(tmp_path / name, "seq2seq" if name == "train" else "auto"))
        assert [r.answers for r in recs] == [["a1"], ["a2", "b2"], ["x", "y"]]
    _write(tmp_path / "bad.source", "q one\nq two\n")
    _write(tmp_path / "bad.target", "a1\n")
    with pytest.raises(F.QAFormatError, match=r"bad\.target:2: .*different line counts"):
        list(F.read_qa(tmp_path / "bad.source"))
    _write(tmp_path / "empty.source", "q\n\n")
    _write(tmp_path / "empty.target", "a\nb\n")
    with pytest.raises(F.QAFormatError, match=r"empty\.source:2: empty question"):
        list(F.read_qa(tmp_path / "empty.source"))


def test_one_training_pair_per_answer_eval_keeps_all():
    recs = [F.QARecord("q0", ["a", "b", "a"]), F.QARecord("q1", ["c"])]
    pairs = list(F.training_pairs(recs))
    assert [(p.question, p.answer, p.qid) for p in pairs] == [("q0", "a", 0), ("q0", "b", 0), ("q1", "c", 1)]
    assert pairs[1].answers == ("a", "b", "a")
    ev = list(F.eval_pairs(recs))
    assert [(p.answer, p.answers) for p in ev] == [("a", ("a", "b", "a")), ("c", ("c",))]


# ------------------------------------------------------------ TFDS dataset
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    rows = []
    for i in range(40):
        answers = [f"ans {i}"] + ([f"alt {i}"] if i % 3 == 0 else [])
        rows.append(json.dumps({"question": f"question {i}?", "answers": answers}))
    train = _write(root / "train.jsonl", "\n".join(rows) + "\n")
    dev = _write(root / "dev.csv", "".join(f"dev q {i}\t['d{i}', 'e{i}']\n" for i in range(10)))
    ds_dir = T.build_qa_dataset({"train": train, "validation": dev}, root / "tfds")
    return root, ds_dir


def test_tfds_dataset_rows_in_file_order(built):
    root, ds_dir = built
    assert (ds_dir / "dataset_info.json").exists()
    assert list(ds_dir.glob("*.array_record*")), "array_record shards expected"
    train = T.open_split(ds_dir, "train")
    assert len(train) == 40 + 14  # one row per answer: 14 questions (i % 3 == 0) have two
    rows = [P.decode_row(train[i]) for i in range(len(train))]
    assert rows[0] == {"question": "question 0?", "answer": "ans 0", "answers": ["ans 0", "alt 0"], "qid": 0,
                       "record_id": "", "positive_ids": [], "titles": [], "answer_patterns": False}
    assert rows[1]["answer"] == "alt 0" and rows[2]["answer"] == "ans 1"
    assert [r["qid"] for r in rows] == sorted(r["qid"] for r in rows)
    dev = T.open_split(ds_dir, "validation")
    assert len(dev) == 10
    assert P.decode_row(dev[7])["answers"] == ["d7", "e7"]
    with pytest.raises(KeyError, match="no split 'test'"):
        T.open_split(ds_dir, "test")
    # Same inputs reuse the dataset; changed contents build a new one.
    assert T.build_qa_dataset({"train": root / "train.jsonl", "validation": root / "dev.csv"}, root / "tfds") == ds_dir


def test_tfds_bad_input_fails_with_file_line(built, tmp_path):
    bad = _write(tmp_path / "bad.csv", "q\t['a']\nq2\t[oops\n")
    with pytest.raises(F.QAFormatError, match=r"bad\.csv:2: cannot parse answers list"):
        T.build_qa_dataset({"train": bad}, tmp_path / "tfds")
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))


# ----------------------------------------------------------- grain loader
def _rows(n):
    return [{"question": f"q{i}".encode(), "answer": f"a{i}".encode(), "answers": [f"a{i}".encode()],
             "qid": i, "line": i + 1} for i in range(n)]


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _ids(batches):
    return [b["qid"].tolist() for b in batches]


def test_loader_batches_are_fixed_shape_strings(built):
    _, ds_dir = built
    loader = P.qa_loader_from_dir(ds_dir, "train", 4, seed=0)
    b = next(loader)
    assert len(b["question"]) == len(b["answer"]) == len(b["answers"]) == 4
    assert b["qid"].shape == (4,)
    assert all(isinstance(q, str) for q in b["question"])
    assert loader.description["global_batch"] == 4


def test_loader_deterministic_by_seed_and_reshuffles_per_epoch():
    a = _ids(_take(P.make_loader(_rows(30), 5, seed=7), 12))
    b = _ids(_take(P.make_loader(_rows(30), 5, seed=7), 12))
    c = _ids(_take(P.make_loader(_rows(30), 5, seed=8), 12))
    assert a == b and a != c
    epoch0, epoch1 = sum(a[:6], []), sum(a[6:12], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(30))  # every row once per epoch
    assert epoch0 != epoch1 and epoch0 != list(range(30))


@pytest.mark.parametrize("stop", [3, 7])  # inside the first epoch / after the boundary
def test_loader_state_restore_gives_identical_batches(stop):
    rows = _rows(23)
    ref = P.make_loader(rows, 4, seed=3)
    _take(ref, stop)
    state = json.loads(json.dumps(ref.get_state()))  # must survive JSON
    expected = _ids(_take(ref, 8))
    fresh = P.make_loader(rows, 4, seed=3)
    fresh.set_state(state)
    assert _ids(_take(fresh, 8)) == expected
    other = P.make_loader(rows, 4, seed=4)
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


def test_process_slices_partition_the_same_global_batches():
    # Any split of the global batch over processes reads exactly the rows a
    # single process reads, step for step: the stream does not depend on the topology.
    rows, gb = _rows(29), 6
    whole = _ids(_take(P.make_loader(rows, gb, seed=1), 9))
    for slices in ([range(0, 3), range(3, 6)], [range(0, 2), range(2, 4), range(4, 6)], [[0, 5], [1, 2, 3, 4]]):
        parts = [_ids(_take(P.make_loader(rows, gb, seed=1, rows=r), 9)) for r in slices]
        for step in range(9):
            got = [q for part, r in zip(parts, slices) for q in part[step]]
            want = [whole[step][i] for r in slices for i in r]
            assert got == want
    with pytest.raises(ValueError, match="not positions"):
        P.make_loader(rows, gb, rows=[6])
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        P.make_loader(_rows(5), gb)


def test_state_saved_by_one_process_count_restores_on_another():
    rows, gb = _rows(23), 4
    one = P.make_loader(rows, gb, seed=3)
    _take(one, 5)
    state = json.loads(json.dumps(one.get_state()))
    expected = _ids(_take(one, 4))
    half = P.make_loader(rows, gb, seed=3, rows=[2, 3])
    half.set_state(state)
    assert _ids(_take(half, 4)) == [b[2:] for b in expected]
    # A state written before the global stream (one process, shard [0, 1]) still restores.
    old = dict(state, pipeline={"rows": 23, "batch_size": 4, "seed": 3, "shuffle": True, "num_epochs": None,
                                "shard": [0, 1], "drop_remainder": True})
    again = P.make_loader(rows, gb, seed=3)
    again.set_state(old)
    assert _ids(_take(again, 4)) == expected


def test_config_pipeline_resumes_through_checkpoint(built, tmp_path):
    """The data position saved with a checkpoint continues the exact batch stream."""
    import jax.numpy as jnp

    from rag_jax.train.checkpointing import CheckpointManager
    from rag_jax.config import load_config_module

    root, _ = built
    cfg = load_config_module(__file__.replace("tests/test_qa_data.py", "configs/tiny.py")).get_config()
    cfg.data.train_file = str(root / "train.jsonl")
    cfg.data.dev_file = str(root / "dev.csv")
    cfg.data.dataset_dir = str(tmp_path / "tfds")
    cfg.eval.max_examples = 7
    ds_dir = P.dataset_from_config(cfg, tmp_path)
    run = P.train_loader_from_config(cfg, ds_dir, global_batch=6)
    _take(run, 5)
    with CheckpointManager(tmp_path / "ckpt", every=5, async_save=True) as mngr:
        assert mngr.save(5, {"step": jnp.asarray(5)}, run.get_state())
        expected = _take(run, 6)
        mngr.wait()
        _, data_state, step = mngr.restore()
    resumed = P.train_loader_from_config(cfg, ds_dir, global_batch=6)
    resumed.set_state(data_state)
    got = _take(resumed, 6)
    assert step == 5
    assert [b["question"] for b in got] == [b["question"] for b in expected]
    assert [b["answer"] for b in got] == [b["answer"] for b in expected]
