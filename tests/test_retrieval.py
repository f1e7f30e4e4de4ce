"""Retrieval: corpus readers and store, exact/sharded/ScaNN search, index directories, import, hot swap."""
import json
import pickle

import jax
import numpy as np
import pytest

from rag_jax.retrieval.corpus import (
    CorpusError,
    Passage,
    build_corpus,
    read_dpr_tsv,
    read_jsonl,
    split_documents,
    write_corpus,
)
from rag_jax.retrieval.embeddings import import_embeddings, write_store
from rag_jax.retrieval.index import (
    ExactIndex,
    IndexMismatchError,
    ScannIndex,
    ScannParams,
    build_index,
    load_index,
    neighbor_recall,
)
from rag_jax.retrieval.retriever import Retriever
from rag_jax.retrieval.synthetic import clustered_embeddings, clustered_queries

# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------

DPR_TSV = (
    "id\ttext\ttitle\n"
    '1\t"Aaron is a prophet, ""high priest"" of Israel."\tAaron\n'
    '2\t"tab\tinside, café, 東京, emoji 🙂"\t"Zoë ""Z"" Title"\n'
    "3\tunquoted plain text\tPlain\n"
    '4\t"a field spanning\ntwo lines"\tMulti\n'
    "5\t\"\"\tEmpty text\n"
)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_dpr_tsv_conventions(tmp_path):
    f = _write(tmp_path / "psgs.tsv", DPR_TSV)
    ps = list(read_dpr_tsv(f))
    assert [p.id for p in ps] == ["1", "2", "3", "4", "5"]
    assert ps[0] == Passage("1", "Aaron", 'Aaron is a prophet, "high priest" of Israel.')
    assert ps[1].text == "tab\tinside, café, 東京, emoji 🙂"
    assert ps[1].title == 'Zoë "Z" Title'
    assert ps[3].text == "a field spanning\ntwo lines"
    assert ps[4].text == ""


def test_header_column_order_and_headerless(tmp_path):
    f = _write(tmp_path / "a.tsv", "title\tid\ttext\nT1\t7\thello\n")
    assert list(read_dpr_tsv(f)) == [Passage("7", "T1", "hello")]
    g = _write(tmp_path / "b.tsv", "9\tsome text\tTitle9\n")
    assert list(read_dpr_tsv(g)) == [Passage("9", "Title9", "some text")]


@pytest.mark.parametrize(
    "body, line",
    [
        ("id\ttext\ttitle\n1\tok\tT\n2\tonly two fields\n", 3),
        # Line numbers count physical lines, including those inside a quoted field.
        ('id\ttext\ttitle\n1\t"x\ny"\tT\n2\ttoo\tmany\tfields\n', 4),
        ('id\ttext\ttitle\n1\tok\tT\n2\t"bad "quote\tT\n', 3),
        ("id\ttext\ttitle\n\t text\tT\n", 2),
    ],
)
def test_malformed_tsv_names_file_and_line(tmp_path, body, line):
    f = _write(tmp_path / "bad.tsv", body)
    with pytest.raises(CorpusError, match=rf"bad\.tsv:{line}:"):
        list(read_dpr_tsv(f))


def test_jsonl_reader_and_errors(tmp_path):
    f = _write(tmp_path / "p.jsonl", '{"id": 5, "title": "T", "text": "é x"}\n\n{"title": "U", "text": "y"}\n')
    assert list(read_jsonl(f)) == [Passage("5", "T", "é x"), Passage("3", "U", "y")]
    bad = _write(tmp_path / "bad.jsonl", '{"id": 1, "text": "ok"}\n{"id": 2, "title": "no text"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: .*'text'"):
        list(read_jsonl(bad))
    bad2 = _write(tmp_path / "bad2.jsonl", '{"id": 1, "text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"bad2\.jsonl:2: invalid JSON"):
        list(read_jsonl(bad2))


def test_split_documents_into_100_word_passages():
    words = [f"w{i}" for i in range(250)]
    docs = [Passage("a", "Doc A", " ".join(words)), Passage("b", "Doc B", "short  doc\n here")]
    ps = list(split_documents(docs, 100, start_id=1))
    assert [p.id for p in ps] == ["1", "2", "3", "4"]
    assert [len(p.text.split()) for p in ps] == [100, 100, 50, 3]
    assert ps[1].text.split()[0] == "w100" and ps[2].title == "Doc A"
    assert ps[3].text == "short doc here" and ps[3].title == "Doc B"


def test_store_random_access_id_map_and_checksum(tmp_path):
    f = _write(tmp_path / "psgs.tsv", DPR_TSV)
    c = build_corpus(f, tmp_path / "c", progress=False)
    ref = list(read_dpr_tsv(f))
    assert len(c) == len(ref)
    for row in [4, 0, 2, 1, 3]:  # arbitrary order: random access
        assert c[row] == ref[row]
        assert c.row_of(ref[row].id) == row
    np.testing.assert_array_equal(c.rows_of(["5", "1", "3"]), [4, 0, 2])
    with pytest.raises(KeyError, match="'99'"):
        c.row_of("99")
    with pytest.raises(IndexError):
        c[5]
    # Same passages -> same checksum; one changed character -> different.
    c2 = build_corpus(f, tmp_path / "c2", progress=False)
    assert c2.checksum == c.checksum
    g = _write(tmp_path / "psgs2.tsv", DPR_TSV.replace("café", "cafe"))
    assert build_corpus(g, tmp_path / "c3", progress=False).checksum != c.checksum
    # Moving a field boundary changes the checksum too.
    a = write_corpus([Passage("1", "ab", "c")], tmp_path / "x1", progress=False)
    b = write_corpus([Passage("1", "a", "bc")], tmp_path / "x2", progress=False)
    assert a.checksum != b.checksum


def test_store_duplicate_ids_and_atomic_write(tmp_path):
    with pytest.raises(CorpusError, match="duplicate passage id '2'"):
        write_corpus([Passage("1", "", "a"), Passage("2", "", "b"), Passage("2", "", "c")], tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()

    def broken():
        yield Passage("1", "t", "x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_corpus(broken(), tmp_path / "e", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp dir is left


# ---------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered():
    docs = clustered_embeddings(30_000, 64, seed=0)
    queries = clustered_queries(docs, 300, seed=1)
    exact_rows, exact_scores = ExactIndex(docs).search(queries, 10)
    return docs, queries, exact_rows, exact_scores


def test_exact_matches_numpy(clustered):
    docs, queries, rows, scores = clustered
    ref = queries[:20].astype(np.float64) @ docs.T.astype(np.float64)
    np.testing.assert_allclose(scores[:20], np.sort(ref, axis=1)[:, ::-1][:, :10], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(ref, rows[:20], 1), scores[:20], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reorder", ["int8", "memmap"])
def test_scann_recall_on_clustered_embeddings(clustered, reorder):
    docs, queries, exact_rows, exact_scores = clustered
    params = ScannParams.for_size(len(docs), reorder_dtype=reorder)
    assert not params.brute_force and params.num_leaves == 173
    idx = ScannIndex.build(docs, params)
    rows, scores = idx.search(queries, 10)
    r = neighbor_recall(rows, exact_rows)
    assert r >= 0.95, r
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    if reorder == "memmap":  # re-scored from the float32 vectors: exact scores for the rows found
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, docs[rows]), rtol=1e-5)


def test_sharded_exact_equals_unsharded():
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",))
    rng = np.random.default_rng(3)
    docs = clustered_embeddings(1003, 16, seed=3)  # not a multiple of 8: padding rows must never win
    docs[500] = docs[7]  # exact ties across shards resolve to the lower row, as unsharded
    docs[900] = docs[7]
    queries = np.concatenate([docs[[7]], rng.standard_normal((12, 16)).astype(np.float32)])
    ref_rows, ref_scores = ExactIndex(docs).search(queries, 10)
    rows, scores = ExactIndex(docs, mesh=mesh).search(queries, 10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    assert list(rows[0, :3]) == [7, 500, 900]
    # Negative scores everywhere: the -inf padding must still lose.
    neg_rows, _ = ExactIndex(docs, mesh=mesh).search(-np.abs(queries) * 0 - docs.mean(0, keepdims=True) * 50, 5)
    assert neg_rows.max() < 1003


# ---------------------------------------------------------------------------
# Index directories
# ---------------------------------------------------------------------------


def _corpus(path, n, tag="v1"):
    return write_corpus(
        (Passage(str(i + 1), f"Title {i} {tag}", f"passage {i} text {tag}") for i in range(n)), path, progress=False
    )


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    n = 3000
    corpus = _corpus(root / "corpus", n)
    docs = clustered_embeddings(n, 32, num_clusters=40, seed=5)
    store = write_store(docs, root / "emb", shard_rows=1000, encoder_fingerprint="enc-A", corpus_checksum=corpus.checksum)
    params = dict(brute_force=False, num_leaves=40, num_leaves_to_search=12, reorder_k=100)
    # k-means training is randomised: keep the very searcher that was saved, to compare after loading.
    fresh = ScannIndex.build(docs, ScannParams.for_size(n, **params))
    path = build_index(store, root / "index", kind="scann", corpus=corpus, include_corpus=True, prebuilt=fresh)
    return root, corpus, docs, store, path, fresh


def test_save_load_identical_results(small):
    root, corpus, docs, store, path, fresh = small
    queries = clustered_queries(docs, 50, seed=9)
    loaded = load_index(path, encoder_fingerprint="enc-A")
    assert loaded.kind == "scann" and loaded.count == 3000 and loaded.dim == 32
    assert loaded.manifest["corpus_checksum"] == corpus.checksum
    r1, s1 = fresh.search(queries, 10)
    r2, s2 = loaded.search(queries, 10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)
    r3, s3 = load_index(path).search(queries, 10)  # a second load, same again
    np.testing.assert_array_equal(r2, r3)
    # Stored embeddings come back bit-exact, gathered only for the asked rows.
    np.testing.assert_array_equal(loaded.embeddings.get(r2[:3]), docs[r2[:3]])
    assert loaded.corpus.title(int(r2[0, 0])) == f"Title {r2[0, 0]} v1"
    # An exact index directory gives the exact top-k.
    # Default re-ordering reads the memory-mapped float32 store: exact scores, small resident part.
    assert loaded.manifest["scann"]["reorder_dtype"] == "memmap"
    assert loaded.manifest["search_bytes"] < 0.25 * docs.nbytes
    np.testing.assert_allclose(s2, np.einsum("qd,qkd->qk", queries, docs[r2]), rtol=1e-5)
    # ScaNN's own int8 copy for re-ordering.
    mpath = build_index(store, root / "int8", kind="scann", corpus=corpus,
                        scann_params=dict(brute_force=False, num_leaves=40, num_leaves_to_search=12, reorder_dtype="int8"))
    mloaded = load_index(mpath, corpus=corpus)
    assert mloaded.manifest["scann"]["reorder_dtype"] == "int8"
    mr, ms = mloaded.search(queries, 10)
    np.testing.assert_allclose(ms, np.einsum("qd,qkd->qk", queries, docs[mr]), rtol=0.05, atol=0.05)
    epath = build_index(store, root / "exact", kind="exact", corpus=corpus)
    er, es = load_index(epath, corpus=corpus).search(queries, 10)
    xr, xs = ExactIndex(docs).search(queries, 10)
    np.testing.assert_array_equal(er, xr)
    assert neighbor_recall(r2, xr) >= 0.95
    # int8 re-order scores swap near-ties around rank 10, and ScaNN's multi-threaded
    # training varies with thread timing: 0.93-0.99 measured on this data.
    assert neighbor_recall(mr, xr) >= 0.9


def test_mismatch_detection(small, tmp_path):
    root, corpus, docs, store, path, _ = small
    other = _corpus(tmp_path / "other", 3000, tag="v2")  # same size, different text
    with pytest.raises(IndexMismatchError, match="built for corpus"):
        load_index(path, corpus=other)
    with pytest.raises(IndexMismatchError, match="encoded with encoder"):
        load_index(path, encoder_fingerprint="enc-B")
    shorter = _corpus(tmp_path / "short", 10)
    with pytest.raises(IndexMismatchError):
        build_index(docs[:10], tmp_path / "i2", kind="exact", corpus=shorter, corpus_checksum=corpus.checksum)
    with pytest.raises(IndexMismatchError, match="embeddings but corpus"):
        build_index(docs, tmp_path / "i3", kind="exact", corpus=shorter)
    with pytest.raises(FileExistsError):
        build_index(store, path, kind="exact")


def test_interrupted_build_never_loads(small, tmp_path, monkeypatch):
    root, corpus, docs, store, path, _ = small

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ScannIndex, "build", boom)
    with pytest.raises(KeyboardInterrupt):
        build_index(store, tmp_path / "half", kind="scann", corpus=corpus, include_corpus=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "embeddings").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete index"):
        load_index(tmp_path / "manual")


# ---------------------------------------------------------------------------
# Precomputed embeddings
# ---------------------------------------------------------------------------


def test_import_dpr_pickles_and_npy(tmp_path):
    n, d = 50, 8
    corpus = _corpus(tmp_path / "c", n)
    vecs = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    perm = np.random.default_rng(1).permutation(n)
    # DPR shards: shuffled (id, vector) pairs, "wiki:" prefixed or bare ids.
    for part, sel in enumerate(np.array_split(perm, 2)):
        pairs = [(f"wiki:{i + 1}" if part == 0 else i + 1, vecs[i]) for i in sel]
        with open(tmp_path / f"wikipedia_passages_{part}.pkl", "wb") as f:
            pickle.dump(pairs, f)
    store = import_embeddings(corpus, tmp_path / "s1", dpr_pickles=str(tmp_path / "wikipedia_passages_*.pkl"),
                              encoder_fingerprint="dpr", progress=False)
    np.testing.assert_array_equal(store.to_array(), vecs)
    assert store.corpus_checksum == corpus.checksum and store.encoder_fingerprint == "dpr"

    np.save(tmp_path / "v.npy", vecs[perm])
    (tmp_path / "ids.txt").write_text("\n".join(str(i + 1) for i in perm))
    s2 = import_embeddings(corpus, tmp_path / "s2", npy=str(tmp_path / "v.npy"), ids=str(tmp_path / "ids.txt"),
                           dtype="float16", progress=False)
    np.testing.assert_array_equal(s2.get(np.arange(n)), vecs.astype(np.float16).astype(np.float32))

    (tmp_path / "ids_bad.txt").write_text("\n".join(["999"] + [str(i + 1) for i in perm[1:]]))
    with pytest.raises(CorpusError, match="'999' not in corpus"):
        import_embeddings(corpus, tmp_path / "s3", npy=str(tmp_path / "v.npy"), ids=str(tmp_path / "ids_bad.txt"),
                          progress=False)
    np.save(tmp_path / "v_short.npy", vecs[perm][:-1])
    (tmp_path / "ids_short.txt").write_text("\n".join(str(i + 1) for i in perm[:-1]))
    with pytest.raises(CorpusError, match="1 of 50 corpus passages have no embedding"):
        import_embeddings(corpus, tmp_path / "s4", npy=str(tmp_path / "v_short.npy"),
                          ids=str(tmp_path / "ids_short.txt"), progress=False)
    assert not (tmp_path / "s3").exists() and not (tmp_path / "s4").exists()


# ---------------------------------------------------------------------------
# Hot swap
# ---------------------------------------------------------------------------


def test_hot_swap_replaces_index_and_corpus(tmp_path):
    n, d = 200, 16
    docs_a = clustered_embeddings(n, d, seed=11)
    docs_b = clustered_embeddings(n, d, seed=12)
    ca, cb = _corpus(tmp_path / "ca", n, "2016"), _corpus(tmp_path / "cb", n, "2018")
    ia = build_index(docs_a, tmp_path / "ia", kind="scann", corpus=ca, include_corpus=True, encoder_fingerprint="q")
    ib = build_index(docs_b, tmp_path / "ib", kind="exact", corpus=cb, include_corpus=True, encoder_fingerprint="q")
    q = docs_b[[3, 17]] + 0.01
    params = {"w": np.ones(3)}  # stands for model params: the retriever never sees them
    ret = Retriever(ia, encoder_fingerprint="q")
    before = ret.retrieve(q, 4)
    assert all(t.endswith("2016") for row in before.texts for t in row)
    old = ret.swap(ib, encoder_fingerprint="q")
    assert old.path == ia and ret.path == ib
    after = ret.retrieve(q, 4)
    assert all(t.endswith("2018") for row in after.texts for t in row)
    best = np.argsort(-(q @ docs_b.T), axis=1)[:, :4]
    np.testing.assert_array_equal(after.rows, best)
    assert list(after.ids[:, 0]) == [str(r + 1) for r in best[:, 0]]
    assert after.titles[0][0] == f"Title {best[0, 0]} 2018"
    np.testing.assert_allclose(after.scores, np.einsum("qd,qkd->qk", q, docs_b[after.rows]), rtol=1e-6)
    assert after.doc_embeds.shape == (2, 4, d)
    np.testing.assert_array_equal(params["w"], np.ones(3))
    with pytest.raises(IndexMismatchError):
        ret.swap(ia, encoder_fingerprint="other-encoder")
    wide = build_index(np.ones((n, 8), np.float32), tmp_path / "iw", kind="exact", corpus=ca, include_corpus=True)
    with pytest.raises(IndexMismatchError, match="dimension 8"):
        ret.swap(wide)
    assert ret.path == ib  # failed swaps leave the current index in place


def test_cli_build_index_from_imported_embeddings(tmp_path, capsys):
    from rag_jax.cli import main as cli_main

    n, d = 30, 8
    tsv = tmp_path / "p.tsv"
    tsv.write_text("id\ttext\ttitle\n" + "".join(f'{i + 1}\t"text {i}"\tT{i}\n' for i in range(n)), encoding="utf-8")
    vecs = clustered_embeddings(n, d, seed=4)
    perm = np.random.default_rng(0).permutation(n)
    np.save(tmp_path / "v.npy", vecs[perm])
    (tmp_path / "ids.json").write_text(json.dumps([f"wiki:{i + 1}" for i in perm]))
    out = tmp_path / "index"
    rc = cli_main(["build-index", "--passages", str(tsv), "--embeddings-npy", str(tmp_path / "v.npy"),
                   "--embeddings-ids", str(tmp_path / "ids.json"), "--out", str(out), "--index-type", "exact",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    idx = load_index(out)
    np.testing.assert_array_equal(idx.embeddings.to_array(), vecs)
    rows, _ = idx.search(vecs[[5]], 3)
    np.testing.assert_array_equal(rows[0], np.argsort(-(vecs[5] @ vecs.T))[:3])
    assert idx.corpus.title(5) == "T5" and not (tmp_path / "index.work").exists()
