"""Retrieval benchmark: ScaNN vs faiss HNSW vs exact search on clustered float32 embeddings.

For each method: build time, bytes per passage that must stay resident to
search, and, at each recall@10 target (0.95, 0.99) against exact search, the
fastest swept setting that reaches it (ScaNN: leaves searched x re-order
depth; HNSW: efSearch). The chosen settings are then timed with the methods
interleaved (on a shared machine, load changes hit all of them alike):
batched on 1 thread (what the RAG training/serving path does: one
``search_batched`` call per question batch), batched on all threads, and one
query per call. HNSW rows: HF RAG's custom-index recipe (M=128, faiss's
default efConstruction 40) and a well-built graph (M=64, efConstruction 200).
Optionally also document-encoding throughput (passages/s) of the rag_jax
encoding job vs PyTorch transformers on the same CPU with the real
all-MiniLM-L6-v2 weights.

    python benchmarks/bench_retrieval.py                 # 200k x 768, minutes on 2 cores
    python benchmarks/bench_retrieval.py --n 1000000     # the issue's 1M x 768
    python benchmarks/bench_retrieval.py --scann int8,dims_per_block=4 --hnsw 32:40   # other configurations
    python benchmarks/bench_retrieval.py --encode 256    # + encoding throughput
    # real embeddings: a built index (e.g. the demo's MiniLM one) and its questions
    python benchmarks/bench_retrieval.py --index demo_out/index --questions demo_out/world/test.jsonl
    # BM25: rag_jax (bm25s) vs rank-bm25 on 1M synthetic passages; BM25 vs DPR recall on the demo
    python benchmarks/bench_retrieval.py --bm25 --n 1000000 --queries 1000
    python benchmarks/bench_retrieval.py --bm25-recall demo_out --queries 615

Needs ``faiss-cpu`` (the ``bench`` extra) for the HNSW rows.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table  # noqa: E402

from rag_jax.retrieval.embeddings import write_store  # noqa: E402
from rag_jax.retrieval.index import ExactIndex, ScannIndex, ScannParams, neighbor_recall  # noqa: E402
from rag_jax.retrieval.synthetic import clustered_embeddings, clustered_queries  # noqa: E402

TARGETS = (0.95, 0.99)
SCANN_DEFAULT_SPECS = ("int8", "memmap")
HNSW_DEFAULT_SPECS = ("128:40", "64:200")
FULL = 21_000_000


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _qps(fn, queries: np.ndarray, reps: int = 2) -> tuple[float, np.ndarray]:
    rows = fn(queries)  # warm-up (and compile for jax)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        rows = fn(queries)
        best = min(best, time.perf_counter() - t)
    return len(queries) / best, rows


@dataclass
class Method:
    """A built index under test: ``search(queries, setting, threads)`` returns rows [Q, k]."""

    name: str
    build_s: float
    bytes: float  # resident bytes per passage
    search: Callable[[np.ndarray, Any, int], np.ndarray]
    settings: list
    describe: Callable[[Any], str] = str
    sweep: list = field(default_factory=list)  # (setting, recall, QPS 1 thread) per setting


def _one_at_a_time(method: Method, setting: Any) -> Callable[[np.ndarray], np.ndarray]:
    # A serving request of one question: the per-call overhead counts.
    return lambda q: np.concatenate([method.search(q[i : i + 1], setting, 1) for i in range(len(q))])


def scann_method(data, k: int, spec: str, tmp: Path, store) -> Method:
    """``spec`` is ``reorder[,field=value...]``: a ScannParams.for_size override list,
    e.g. ``int8,dims_per_block=4,num_leaves=900``."""
    reorder, *rest = spec.split(",")
    over: dict[str, Any] = {"reorder_dtype": reorder}
    for item in rest:
        key, _, value = item.partition("=")
        over[key.strip()] = value.strip()
    t = time.perf_counter()
    params = ScannParams.for_size(len(data), **over)
    idx = ScannIndex.build(data, params)
    build = time.perf_counter() - t
    out = tmp / "scann"
    idx.serialize(out)
    nbytes = _dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    if reorder == "memmap":
        idx.rerank_source = store  # the memory-mapped float32 store, as a loaded index uses
    base = params.num_leaves_to_search
    leaves = ([None] if params.brute_force else
              sorted({min(params.num_leaves, max(1, base * f // 4)) for f in (2, 4, 8, 16, 32)}))
    depths = [0] if reorder == "none" else sorted({max(k, d) for d in (20, 50, 100, 200)})

    def search(q, s, threads):
        return idx.search(q, k, leaves_to_search=s[0], reorder_k=s[1] or None, parallel=threads > 1)[0]

    shape = ("brute force" if params.brute_force else f"{params.num_leaves} leaves, {params.dims_per_block} "
             f"dims/block, AH threshold {params.anisotropic_quantization_threshold}")
    return Method(f"ScaNN {reorder} reorder ({shape})", build, nbytes / len(data), search,
                  [(lv, d) for lv in leaves for d in depths],
                  lambda s: f"leaves {s[0] or '-'}, reorder {s[1] or '-'}")


def hnsw_method(data, k: int, m: int, ef_construction: int) -> Method:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(data.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(data)
    build = time.perf_counter() - t
    nbytes = faiss.serialize_index(index).nbytes

    def search(q, ef, threads):
        faiss.omp_set_num_threads(threads)
        index.hnsw.efSearch = ef
        return index.search(q, k)[1]

    return Method(f"faiss HNSWFlat (M={m}, efConstruction {ef_construction})", build, nbytes / len(data), search,
                  [16, 32, 64, 128, 256, 512, 1024, 2048], lambda ef: f"efSearch {ef}")


def sweep(method: Method, queries: np.ndarray, truth: np.ndarray, k: int) -> None:
    """Recall and a first 1-thread QPS of every setting (the pick below uses both)."""
    top = max(TARGETS)
    for s in method.settings:
        qps, rows = _qps(lambda q: method.search(q, s, 1), queries, reps=1)
        r = neighbor_recall(rows, truth)
        method.sweep.append((s, r, qps))
        print(f"  {method.name[:60]:60s} {method.describe(s):>28s}: recall@{k} {r:.4f} {qps:8.0f} q/s", flush=True)
        if r >= top + 0.5 * (1 - top) and not isinstance(s, tuple):
            break  # HNSW: efSearch only grows from here


def pick(method: Method, target: float) -> Any:
    """The fastest swept setting reaching ``target`` (None if none does)."""
    ok = [(qps, s) for s, r, qps in method.sweep if r >= target]
    return max(ok, key=lambda x: x[0])[1] if ok else None


def timed_round_robin(methods: list[Method], chosen: list[Any], queries: np.ndarray, rounds: int) -> list[dict]:
    """Best-of-``rounds`` QPS per method and mode, methods interleaved in every round so that
    load changes on a shared machine hit all of them alike."""
    threads = os.cpu_count() or 1
    modes = {"1 thread": lambda m, s: (lambda q: m.search(q, s, 1)),
             f"{threads} threads": lambda m, s: (lambda q: m.search(q, s, threads)),
             "1 thread, one query per call": _one_at_a_time}
    best = [dict.fromkeys(modes, 0.0) for _ in methods]
    for _ in range(rounds):
        for i, (m, s) in enumerate(zip(methods, chosen)):
            if s is None:
                continue
            for mode, make in modes.items():
                qps, _ = _qps(make(m, s), queries, reps=1)
                best[i][mode] = max(best[i][mode], qps)
    return best


def compare(methods: list[Method], queries: np.ndarray, k: int, d: int, n: int, rounds: int) -> None:
    """One table per recall target: cheapest setting reaching it, QPS ratios to the best HNSW."""
    fp32 = 4 * d
    for target in TARGETS:
        chosen = [pick(m, target) for m in methods]
        qps = timed_round_robin(methods, chosen, queries, rounds)
        modes = list(qps[0])
        hnsw_best = max((q[modes[0]] for m, q in zip(methods, qps) if m.name.startswith("faiss")), default=0.0)
        rows = []
        for m, s, q in zip(methods, chosen, qps):
            rec = next(r for st, r, _ in m.sweep if st == s) if s is not None else None
            rows.append([m.name, f"{m.build_s:.1f}", f"{m.bytes:.0f}", f"{m.bytes / fp32:.1%}",
                         m.describe(s) if s is not None else "not reached", f"{rec:.4f}" if rec else "-",
                         *(f"{q[md]:.0f}" if s is not None else "-" for md in modes),
                         f"{q[modes[0]] / hnsw_best:.2f}x" if s is not None and hnsw_best else "-",
                         f"{m.bytes * FULL / 1e9:.1f}", f"{_build_21m(m, n) / 3600:.1f}"])
        print_table(f"Retrieval at recall@{k} >= {target} (best of {rounds} interleaved rounds; load "
                    f"{_load()})", ["method", "build (s)", "bytes/passage", "of float32", "setting", f"recall@{k}",
                                   *(f"QPS {md}" for md in modes), "vs best HNSW (1 thread)", "21M: RAM (GB)",
                                   "21M: build (h, est.)"], rows)


def _build_21m(m: Method, n: int) -> float:
    # ScaNN linear in n (the k-means/AH training sample is capped; assigning points to sqrt(n)
    # leaves grows as n^1.5 but is a small share at these sizes); HNSW ~ n log n.
    scale = FULL / n
    return m.build_s * scale * (1.0 if m.name.startswith("ScaNN") else math.log(FULL) / math.log(n))


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def encode_passages(kind: str, n: int, words: list[str], rng: np.random.Generator) -> list:
    """``n`` synthetic passages. ``dpr``: DPR's shape, 100 words and a 2-word
    title each. ``mixed``: documents of 20-400 words split into 100-word
    passages, as DPR split Wikipedia, so each document's last piece is short
    (about a third of the passages)."""
    from rag_jax.retrieval.corpus import Passage

    def text(count: int) -> list[str]:
        # Some words glue 2-3 vocabulary words together (split again into
        # pieces), so passage lengths vary as real ones do: about 150 tokens.
        pieces = rng.choice([1, 2, 3], size=count, p=[0.88, 0.1, 0.02])
        return ["".join(rng.choice(words, int(m))) for m in pieces]

    if kind == "dpr":
        return [Passage(str(i + 1), " ".join(text(2)), " ".join(text(100))) for i in range(n)]
    out: list = []
    while len(out) < n:
        title, body = " ".join(text(2)), text(int(rng.integers(20, 401)))
        for s in range(0, len(body), 100):
            out.append(Passage(str(len(out) + 1), title, " ".join(body[s : s + 100])))
    return out[:n]


def bench_encode(n: int, max_length: int, batch_size: int, bucket: int, kind: str) -> list[list[str]]:
    """Passages/s: rag_jax encoding job vs transformers BertModel (CLS pooling,
    as DPR) on the same CPU and the same passages. rag_jax first encodes the
    corpus once (compiling each length bucket it meets; reported as "first
    run") and is then timed on a second run into a new directory."""
    import torch
    from transformers import BertModel, BertTokenizerFast

    import rag_jax
    from rag_jax.demo.run import minilm_dir
    from rag_jax.retrieval.corpus import write_corpus
    from rag_jax.retrieval.encode import encode_corpus

    path = minilm_dir()
    rng = np.random.default_rng(0)
    words = [w.strip() for w in open(os.path.join(path, "vocab.txt"), encoding="utf-8")
             if w.strip().isalpha() and w.strip().isascii() and len(w.strip()) > 2]
    passages = encode_passages(kind, n, words, rng)
    tok = BertTokenizerFast.from_pretrained(path)
    lengths = np.asarray([len(x) for x in tok([p.title for p in passages], [p.text for p in passages],
                                              truncation="longest_first", max_length=max_length)["input_ids"]])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(passages, Path(tmp) / "c", progress=False)
        enc = rag_jax.load_encoder(path)
        kw = dict(batch_size=batch_size, max_length=max_length, length_bucket=bucket or None, progress=False)
        t = time.perf_counter()
        encode_corpus(corpus, enc, Path(tmp) / "first", **kw)
        first = n / (time.perf_counter() - t)
        t = time.perf_counter()
        store = encode_corpus(corpus, enc, Path(tmp) / "e", **kw)
        ours = n / (time.perf_counter() - t)
        got = store.to_array()
    torch.set_num_threads(os.cpu_count() or 1)
    model = BertModel.from_pretrained(path).eval()
    ref = []
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            chunk = passages[s : s + batch_size]
            # As HF's RAG knowledge-base script: pad to the longest in the batch.
            b = tok([p.title for p in chunk], [p.text for p in chunk], truncation="longest_first",
                    max_length=max_length, padding="longest", return_tensors="pt")
            ref.append(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, 0].numpy())
    theirs = n / (time.perf_counter() - t)
    err = float(np.abs(np.concatenate(ref) - got).max())
    what = f"{kind}: tokens min/median/max {lengths.min()}/{int(np.median(lengths))}/{lengths.max()}"
    label = f"sorted by length, padded to multiple of {bucket}" if bucket else f"{max_length} (padded)"
    return [[f"rag_jax encode_corpus (jit), {what}", f"{ours:.1f} (first run {first:.1f})", label, f"{err:.1e}",
             f"{ours / theirs:.2f}x"],
            ["transformers BertModel (torch)", f"{theirs:.1f}", "longest in batch (corpus order)", "reference", ""]]


def real_embeddings(args) -> tuple[np.ndarray, np.ndarray, str]:
    """The float32 vectors of a built index and, as queries, its QA file's
    questions encoded by the question encoder (or perturbed rows without one)."""
    from rag_jax.retrieval.index import load_index

    idx = load_index(args.index)
    data = np.ascontiguousarray(idx.embeddings.to_array(), dtype=np.float32)
    if not args.questions:
        return data, clustered_queries(data, args.queries, seed=1), f"embeddings of {args.index}"
    import rag_jax
    from rag_jax.data.qa_formats import read_qa

    enc_dir = args.encoder
    if not enc_dir:
        from rag_jax.demo.run import minilm_dir

        enc_dir = minilm_dir()
    questions = [r.question for r in read_qa(args.questions)][: args.queries]
    queries = rag_jax.load_encoder(enc_dir).encode_texts(questions, max_length=64)
    return data, np.ascontiguousarray(queries, np.float32), f"embeddings of {args.index}, real questions"

# ---------------------------------------------------------------------------
# BM25 (--bm25, --bm25-recall): bm25s through rag_jax vs rank-bm25; BM25 vs DPR recall
# ---------------------------------------------------------------------------


def zipf_passages(n: int, vocab: int, words: int, seed: int = 0, chunk: int = 50_000):
    """``n`` synthetic passages of ``words`` words from a ``vocab``-word Zipfian vocabulary.

    Word ``i`` (rank from 0) is drawn with probability proportional to
    ``1 / (i + 2.7)`` (Zipf-Mandelbrot, exponent 1, as word frequencies in
    English text); its spelling is a pronounceable letter string (consonant-
    vowel syllables) that spells out ``i``, so each rank is a distinct word;
    lengths ~ N(words, words / 5). Titles are two words. Yields Passages in
    chunks (the texts of 1M passages are not held at once)."""
    from rag_jax.retrieval.corpus import Passage

    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / (np.arange(vocab) + 2.7))
    cdf /= cdf[-1]
    spell = _zipf_spellings(vocab)
    pid = 0
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        lens = np.clip(rng.normal(words, words / 5, m).astype(int), 5, 3 * words)
        ids = np.searchsorted(cdf, rng.random(int(lens.sum()) + 2 * m))
        pos = 0
        for ln in lens:
            title = spell[ids[pos]] + " " + spell[ids[pos + 1]]
            text = " ".join(spell[j] for j in ids[pos + 2 : pos + 2 + ln])
            pos += 2 + ln
            pid += 1
            yield Passage(str(pid), title, text)


def _zipf_spellings(vocab: int) -> list[str]:
    cons, vows = "bcdfghjklmnprstvz", "aeiou"
    syll = [c + v for c in cons for v in vows]  # 85 syllables
    out = []
    for i in range(vocab):
        parts, x = [], i
        while True:
            parts.append(syll[x % len(syll)])
            x //= len(syll)
            if not x:
                break
        out.append("".join(parts) + "n")  # the final consonant keeps two-letter stopwords ("be", "do") out
    return out


def zipf_questions(corpus, q: int, seed: int = 1) -> list[str]:
    """Questions of 6 words: 4 drawn from a random passage, 2 from another (noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(q):
        a = corpus.text(int(rng.integers(len(corpus)))).split()
        b = corpus.text(int(rng.integers(len(corpus)))).split()
        out.append(" ".join(list(rng.choice(a, 4)) + list(rng.choice(b, 2))))
    return out


def bench_bm25(n: int, vocab: int, words: int, queries: int, ref_queries: int, ref_n: int) -> list[list[str]]:
    """Build time and QPS: rag_jax's BM25 index (bm25s) vs rank-bm25's BM25Okapi on the same tokens."""
    import gc

    from rank_bm25 import BM25Okapi

    from rag_jax.retrieval.bm25 import Bm25Index, Bm25Params, tokenize_corpus
    from rag_jax.retrieval.corpus import write_corpus

    tmp = Path(tempfile.mkdtemp(prefix="bench_bm25_"))
    rows = []
    try:
        t = time.perf_counter()
        corpus = write_corpus(zipf_passages(n, vocab, words), tmp / "corpus", progress=True)
        print(f"corpus: {n} passages in {time.perf_counter() - t:.1f}s", flush=True)
        t = time.perf_counter()
        tokenizer, ids = tokenize_corpus(corpus, Bm25Params(), progress=True)  # split, stopwords, Porter stems
        t_tok = time.perf_counter() - t
        t = time.perf_counter()
        index = Bm25Index.from_ids(tokenizer, ids, Bm25Params(), progress=True)
        t_index = time.perf_counter() - t
        index.save(tmp / "bm25")
        size = _dir_bytes(tmp / "bm25")
        qs = zipf_questions(corpus, queries)
        index.search(qs[:8], 10)  # warm-up
        t = time.perf_counter()
        got, _ = index.search(qs, 10)
        qps = len(qs) / (time.perf_counter() - t)
        print(f"rag_jax bm25s: tokenize {t_tok:.1f}s, index {t_index:.1f}s, {qps:.1f} q/s ({len(qs)} questions)",
              flush=True)
        rows.append(["rag_jax BM25 (bm25s 0.3.16, lucene, numpy backend)", str(n), f"{t_tok:.1f}",
                     f"{t_index:.1f}", f"{size / n:.0f}", f"{qps:.1f}", f"{len(qs)}", "-"])

        # rank-bm25 on the same tokens (rag_jax's tokenization, not counted on its side).
        ref_n = min(ref_n or n, n)
        docs = tokenizer.decode(ids[:ref_n])
        del ids
        del index
        gc.collect()
        t = time.perf_counter()
        ref = BM25Okapi(docs, k1=0.9, b=0.4)
        ref_build = time.perf_counter() - t
        print(f"rank-bm25: BM25Okapi of {ref_n} passages built in {ref_build:.1f}s", flush=True)
        del docs
        qtok = [[w for w in toks if w] for toks in _question_tokens(qs[:ref_queries])]
        t = time.perf_counter()
        ref_rows = [np.argsort(-ref.get_scores(x), kind="stable")[:10] for x in qtok]
        ref_qps = len(qtok) / (time.perf_counter() - t)
        same = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ref_rows, got)]) \
            if ref_n == n else float("nan")
        print(f"rank-bm25: build {ref_build:.1f}s, {ref_qps:.2f} q/s ({len(qtok)} questions); "
              f"top-10 overlap with rag_jax {same:.3f}", flush=True)
        rows.append(["rank-bm25 0.2.2 BM25Okapi (pure Python)", str(ref_n), "(same tokens)", f"{ref_build:.1f}", "-",
                     f"{ref_qps:.2f}", f"{len(qtok)}", f"{same:.3f}"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _question_tokens(questions: list[str]) -> list[list[str]]:
    from rag_jax.retrieval.bm25 import Bm25Params, make_tokenizer

    tok = make_tokenizer(Bm25Params())
    return tok.decode(tok.tokenize(questions, update_vocab=True, show_progress=False, return_as="ids"))


def bench_bm25_recall(demo: str, queries: int) -> list[list[str]]:
    """Gold-passage recall@k and QPS on the demo world's test questions: BM25, DPR (the demo's
    MiniLM index, as the frozen retriever sees it) and both hybrids."""
    import rag_jax
    from rag_jax.data.qa_formats import read_qa
    from rag_jax.demo.run import minilm_dir
    from rag_jax.retrieval.build import build_index_dir
    from rag_jax.retrieval.fusion import Fusion
    from rag_jax.retrieval.retriever import Retriever

    demo_dir = Path(demo)
    passages, dense_dir = demo_dir / "world" / "passages.tsv", demo_dir / "index"
    bm25_dir = demo_dir / "bm25_index"
    t = time.perf_counter()
    build_index_dir(bm25_dir, passages=passages, index_type="bm25", progress=False)
    print(f"BM25 index of {passages}: {time.perf_counter() - t:.1f}s", flush=True)
    recs = [r for r in read_qa(demo_dir / "world" / "test.jsonl") if r.positive_ids][:queries]
    qs = [r.question for r in recs]
    vecs = np.ascontiguousarray(rag_jax.load_encoder(minilm_dir()).encode_texts(qs, max_length=64), np.float32)
    ks = (1, 3, 5, 10, 20)
    retrievers = {
        "DPR stand-in (MiniLM, frozen), ScaNN": Retriever(dense_dir),
        "BM25 (bm25s, k1 0.9, b 0.4, Porter)": Retriever(bm25_dir),
        "hybrid RRF (c 60, depth 100)": Retriever(dense_dir, bm25=bm25_dir, fusion=Fusion("rrf")),
        "hybrid score (w 0.5, depth 100)": Retriever(dense_dir, bm25=bm25_dir, fusion=Fusion("score")),
    }
    rows = []
    for name, r in retrievers.items():
        r.retrieve(vecs[:8], 20, questions=qs[:8] if r.needs_text else None)  # warm-up
        t = time.perf_counter()
        got = r.retrieve(vecs, max(ks), questions=qs if r.needs_text else None)
        qps = len(qs) / (time.perf_counter() - t)
        hit = np.array([[str(i) in set(rec.positive_ids) for i in row] for rec, row in zip(recs, got.ids)])
        rec_k = [100 * float(np.mean(hit[:, :k].any(axis=1))) for k in ks]
        print(f"  {name:40s} " + " ".join(f"R@{k} {v:5.1f}" for k, v in zip(ks, rec_k)) + f"  {qps:8.0f} q/s",
              flush=True)
        rows.append([name] + [f"{v:.1f}" for v in rec_k] + [f"{qps:.0f}"])
    return rows


def bm25_main(args) -> int:
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.bm25:
        rows = bench_bm25(args.n, args.bm25_vocab, args.bm25_words, args.queries, args.bm25_ref_queries,
                          args.bm25_ref_n)
        print_table(f"BM25, {args.n} synthetic passages (~{args.bm25_words} words, Zipfian vocabulary of "
                    f"{args.bm25_vocab}), top-10 ({machine()})",
                    ["method", "passages", "tokenize (s)", "index build (s)", "bytes/passage", "QPS (1 process)",
                     "questions", "top-10 overlap"], rows)
    if args.bm25_recall:
        rows = bench_bm25_recall(args.bm25_recall, args.queries)
        print_table(f"Gold-passage recall@k (%), demo world test questions ({machine()})",
                    ["retriever", "R@1", "R@3", "R@5", "R@10", "R@20", "QPS"], rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="number of passages (embeddings)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--hnsw", action="append", default=None, metavar="M:EF_CONSTRUCTION",
                    help="a faiss HNSWFlat graph to compare (repeatable; default: HF RAG's recipe 128:40 "
                         "from use_own_knowledge_dataset.py, and a well-built 64:200)")
    ap.add_argument("--scann", action="append", default=None, metavar="REORDER[,FIELD=VALUE...]",
                    help="a ScaNN configuration (repeatable): re-order dtype then ScannParams overrides, "
                         "e.g. int8,dims_per_block=4 (default: " + " ; ".join(SCANN_DEFAULT_SPECS) + ")")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per recall target")
    ap.add_argument("--skip-faiss", action="store_true")
    ap.add_argument("--encode", type=int, default=0, help="also time encoding of N synthetic passages (MiniLM)")
    ap.add_argument("--encode-max-length", type=int, default=256)
    ap.add_argument("--encode-batch", type=int, default=32)
    ap.add_argument("--encode-bucket", type=int, default=16, help="length bucket of the encoding job (0: pad to max)")
    ap.add_argument("--encode-corpus", choices=["dpr", "mixed", "both"], default="both",
                    help="DPR-shaped passages (100 words + title), a mixed corpus (documents split into 100-word "
                         "passages, last pieces short), or both")
    ap.add_argument("--encode-only", action="store_true", help="skip the retrieval benchmark (with --encode)")
    ap.add_argument("--index", default="", help="benchmark the embeddings of this built index instead of synthetic ones")
    ap.add_argument("--questions", default="", help="with --index: QA JSONL/CSV whose questions are the queries")
    ap.add_argument("--encoder", default="", help="question encoder for --questions (default: the demo's MiniLM)")
    bm = ap.add_argument_group("BM25 (instead of the dense rows)")
    bm.add_argument("--bm25", action="store_true", help="BM25 build time and QPS on --n synthetic Zipfian passages, "
                    "rag_jax (bm25s) vs rank-bm25 (on --bm25-ref-n passages, --bm25-ref-queries questions)")
    bm.add_argument("--bm25-vocab", type=int, default=200_000)
    bm.add_argument("--bm25-words", type=int, default=100, help="mean passage length in words")
    bm.add_argument("--bm25-ref-n", type=int, default=0, help="rank-bm25's passages (default --n)")
    bm.add_argument("--bm25-ref-queries", type=int, default=10, help="rank-bm25 scores every passage in Python")
    bm.add_argument("--bm25-recall", default="", metavar="DEMO_OUT",
                    help="gold-passage recall of BM25, DPR and hybrids on a built demo dir (world/ and index/)")
    args = ap.parse_args()
    if args.encode_only:
        encode_table(args)
        return 0
    if args.bm25 or args.bm25_recall:
        return bm25_main(args)
    t = time.perf_counter()
    if args.index:
        data, queries, what = real_embeddings(args)
        args.n, args.dim, args.queries = data.shape[0], data.shape[1], len(queries)
    else:
        data = clustered_embeddings(args.n, args.dim, seed=0)
        queries = clustered_queries(data, args.queries, seed=1)
        what = "clustered float32"
    n, d, k = args.n, args.dim, args.k
    print(f"machine: {machine()}; {what}: n={n} dim={d} queries={args.queries} k={k}", flush=True)
    print(f"data: {time.perf_counter() - t:.1f}s", flush=True)

    t = time.perf_counter()
    exact = ExactIndex(data, query_chunk=128)
    exact_build = time.perf_counter() - t
    exact_qps, truth = _qps(lambda q, e=exact: e.search(q, k)[0], queries)
    print(f"  exact (jax, all threads)    : {exact_qps:9.0f} q/s", flush=True)
    del exact  # its device copy of the vectors is not needed any more

    methods = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_retrieval_"))
    try:
        store = write_store(data, tmp / "store")  # the memory-mapped float32 vectors a loaded index reads
        for spec in args.scann or SCANN_DEFAULT_SPECS:
            print(f"ScaNN {spec} ...", flush=True)
            methods.append(scann_method(data, k, spec, tmp, store))
            print(f"  build {methods[-1].build_s:.1f}s; sweep (1 thread; load {_load()})", flush=True)
            sweep(methods[-1], queries, truth, k)  # right away: a run cut short still reports it
        for spec in ([] if args.skip_faiss else args.hnsw or HNSW_DEFAULT_SPECS):
            m, _, efc = spec.partition(":")
            print(f"faiss HNSW M={m} efConstruction={efc} ...", flush=True)
            methods.append(hnsw_method(data, k, int(m), int(efc)))
            print(f"  build {methods[-1].build_s:.1f}s; sweep (1 thread; load {_load()})", flush=True)
            sweep(methods[-1], queries, truth, k)
        print(f"Retrieval, {n} x {d} {what}, {args.queries} queries ({machine()}); exact (jax matmul + top_k, "
              f"all threads): {exact_qps:.0f} q/s, {4 * d} bytes/passage, build {exact_build:.1f}s")
        compare(methods, queries, k, d, n, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("  21M: RAM = resident bytes/passage x 21M; build: ScaNN linear in n, HNSW n log n. Search cost at a "
          "fixed fraction of leaves searched grows linearly with n for exact and ScaNN, roughly with log n for HNSW.")
    if args.encode:
        encode_table(args)
    return 0


def encode_table(args) -> None:
    rows = []
    for kind in (("dpr", "mixed") if args.encode_corpus == "both" else (args.encode_corpus,)):
        rows += bench_encode(args.encode, args.encode_max_length, args.encode_batch, args.encode_bucket, kind)
    print_table(f"Document encoding, all-MiniLM-L6-v2, {args.encode} passages per corpus, batch {args.encode_batch} "
                f"({machine()}, load {os.getloadavg()[0]:.1f} at the end)",
                ["encoder", "passages/s", "padding", "max |diff| vs torch", "ratio"], rows)


if __name__ == "__main__":
    sys.exit(main())
