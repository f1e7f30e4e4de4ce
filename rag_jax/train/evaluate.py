"""Evaluation of a RAG model on a split: the metrics of its task kind
(``task_metrics``: EM/F1 of generated answers for QA, BLEU/ROUGE for
abstractive answers, Q-BLEU for question generation, label accuracy for
classification), retrieval answer recall@k (QA) and gold recall, and the
retrieval-collapse monitor; for a run in progress (``run_eval``) or a
finished workdir (``evaluate_checkpoint``)."""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from rag_jax.data import qa_formats
from rag_jax.eval.kilt import kilt_scores
from rag_jax.eval.monitor import CollapseMonitor, collapse_stats
from rag_jax.eval.qa import qa_metrics
from rag_jax.eval.retrieval import answer_hits, gold_hits, top_k_accuracy
from rag_jax.train.logger import append_metrics
from rag_jax.rag.model import RagModel
from rag_jax.train.setup import build_models, check_inputs, kept_records, make_task, restore_params
from rag_jax.train.task import RagTask


def evaluate(
    task: Any,
    rag_model: Any,
    params: Any,
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    n_docs: int | None = None,
    num_beams: int = 1,
    max_length: int = 25,
    decoding: str = "thorough",
    progress: bool = True,
    return_predictions: bool = False,
    positive_ids: Sequence[Sequence[str]] | None = None,
    provenance: Sequence[Sequence[Sequence[str]]] | None = None,
) -> dict[str, Any]:
    """Generates an answer for every question and scores it.

    ``rag_model`` is a ``rag_jax.rag.model.RagModel`` used for its jitted
    decoders; ``params`` (whole host arrays) replace its own, so one object
    serves every eval of a run without recompiling. Batches are padded to
    ``batch_size`` (fixed shapes). With ``positive_ids`` (per question, the
    passages that state its answer; empty where unknown) it also reports
    ``gold_recall@k`` over the questions that have them: answer strings recur
    in unrelated passages, gold ids do not. With ``provenance`` (per
    question, its gold evidence sets as page titles; empty where none, e.g.
    NOT ENOUGH INFO claims) it also reports KILT's scores (``kilt/...``:
    R-precision, recall@k and the KILT downstream scores) over the questions
    that have some, with the retrieved passages' titles as the pages.

    With several processes, batch ``j`` is decoded by process ``j mod P`` and
    every process gets the same metrics, computed from all batches in order:
    exactly a one-process evaluation's.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answer lists")
    if positive_ids is not None and len(positive_ids) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(positive_ids)} positive id lists")
    if provenance is not None and len(provenance) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(provenance)} provenance lists")
    k = n_docs or task.n_docs
    kilt_keys = _kilt_keys(k) if provenance is not None and not task.closed_book else None
    rag_model.params = params
    t0 = time.perf_counter()
    starts = list(range(0, len(questions), batch_size))
    mine = starts[jax.process_index()::jax.process_count()]
    bar = tqdm(total=len(questions), desc="eval", unit="q", disable=not progress or jax.process_index() != 0,
               leave=False)
    local: list[dict[str, np.ndarray]] = []
    for start in mine:
        qs = list(questions[start : start + batch_size])
        n = len(qs)
        r = task.retrieve(params.get("question_encoder"), qs + [qs[-1]] * (batch_size - n), n_docs=k)
        if task.labels is not None:
            out = _label_tokens(task, task.predict_labels(params["generator"], r))
        else:
            out = rag_model.generate(
                r.context_input_ids, r.context_attention_mask, r.doc_scores,
                variant=task.variant, num_beams=num_beams, max_length=max_length, decoding=decoding,
            )
        local.append(_batch_record(task, r, np.asarray(out), n, answers[start : start + n],
                                   None if positive_ids is None else positive_ids[start : start + n], max_length))
        if kilt_keys is not None:
            local[-1]["kilt"] = _kilt_sums(task, r, local[-1]["tokens"][:n], answers[start : start + n],
                                           provenance[start : start + n], k, kilt_keys)
        # Every process decodes one batch per round: show the round's questions.
        first = starts.index(start) - jax.process_index()
        bar.update(sum(min(batch_size, len(questions) - s) for s in starts[first : first + jax.process_count()]))
    bar.close()
    records = _all_batches(local, len(starts), task, batch_size, k, max_length,
                           0 if kilt_keys is None else len(kilt_keys) + 1)

    preds: list[str] = []
    hits_all, gold_all, collapse = [], [], CollapseMonitor()
    for rec in records:
        n = int(rec["n"])
        preds += _predictions(task, rec["tokens"][:n])
        if not task.closed_book:
            hits_all.append(rec["hits"][:n])
            gold_all.append(rec["gold"][:n])
            collapse.add(dict(zip(CollapseMonitor.KEYS, rec["collapse"].tolist())))
    metrics: dict[str, Any] = task_metrics(task.kind, task.answer_match, preds, answers)
    if hits_all:
        if task.kind == "qa":  # an answer string in a passage means something for extractive answers only
            hits = np.concatenate(hits_all, axis=0)
            for kk, v in top_k_accuracy(hits, sorted({1, min(5, k), k})).items():
                metrics[f"recall@{kk}"] = v
        if positive_ids is not None:
            gold = np.concatenate(gold_all, axis=0)
            known = np.array([len(p) > 0 for p in positive_ids], bool)
            if known.any():
                for kk, v in top_k_accuracy(gold[known], sorted({1, min(5, k), k})).items():
                    metrics[f"gold_recall@{kk}"] = v
        metrics.update(collapse.result())
    if kilt_keys is not None:
        # Per-batch sums of kilt_scores' means: the same figures as one call over all questions.
        sums = np.sum([rec["kilt"] for rec in records], axis=0)
        if sums[-1] > 0:
            metrics.update({f"kilt/{key}": float(v / sums[-1]) for key, v in zip(kilt_keys, sums[:-1])})
            metrics["kilt/count"] = int(sums[-1])
    metrics["examples"] = len(questions)
    metrics["eval_seconds"] = time.perf_counter() - t0
    if return_predictions:
        metrics["predictions"] = preds
    return metrics


def task_metrics(kind: str, answer_match: str, predictions: Sequence[str],
                 answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The scores that fit a task kind (config.task). String-matched QA keeps
    the EM/F1 of ``eval/qa.py`` exactly as before; every other kind is scored
    by ``rag_jax.eval.scores.score`` (references: each question's gold list)."""
    refs = [list(a) for a in answers]
    if kind == "qa" and answer_match == "string":
        return dict(qa_metrics(list(predictions), refs))
    from rag_jax.eval.scores import score

    return dict(score(kind, list(predictions), refs, answer_match=answer_match))


def _predictions(task: Any, tokens: np.ndarray) -> list[str]:
    """Output rows as strings: decoded text, or a classification's label names."""
    if task.labels is None:
        return task.generator_tokenizer.decode(tokens)
    label_of = dict(zip(task.labels.token_ids, task.labels.labels))
    return [label_of[int(t)] for t in tokens[:, 1]]


def _kilt_keys(k: int) -> list[str]:
    """kilt_scores' keys (but ``count``) for ``k`` retrieved passages, in its order."""
    probe = kilt_scores(["a"], [["a"]], [["t"]], [[["t"]]], ks=_kilt_ks(k))
    return [key for key in probe if key != "count"]


def _kilt_ks(k: int) -> list[int]:
    return sorted({1, min(5, k), k})


def _kilt_sums(task: Any, r: Any, tokens: np.ndarray, answers: Sequence[Sequence[str]],
               provenance: Sequence[Sequence[Sequence[str]]], k: int, keys: list[str]) -> np.ndarray:
    """This batch's KILT scores times its count (last entry): questions
    without provenance are left out, as they have no page to find."""
    keep = [i for i, p in enumerate(provenance) if any(p)]
    out = np.zeros(len(keys) + 1, np.float64)
    if keep:
        preds = _predictions(task, tokens)
        got = kilt_scores([preds[i] for i in keep], [list(answers[i]) for i in keep],
                          [list(r.titles[i]) for i in keep], [provenance[i] for i in keep], ks=_kilt_ks(k))
        out[:-1] = [got[key] * len(keep) for key in keys]
        out[-1] = len(keep)
    return out


def _label_tokens(task: Any, indices: np.ndarray) -> np.ndarray:
    """Predicted labels as the token rows a generator would have produced
    (``<s> label </s>``), so they travel between processes like generated answers."""
    lab = task.labels
    ids = np.asarray(lab.token_ids, np.int32)[np.asarray(indices)]
    out = np.empty((ids.shape[0], 3), np.int32)
    out[:, 0], out[:, 1], out[:, 2] = lab.start_token_id, ids, task.generator_tokenizer.eos_token_id
    return out


def _batch_record(task: Any, r: Any, out: np.ndarray, n: int, answers: Sequence[Sequence[str]],
                  positive_ids: Sequence[Sequence[str]] | None, max_length: int) -> dict[str, np.ndarray]:
    """One decoded batch as fixed-shape arrays, so processes can exchange them."""
    tokens = np.full((out.shape[0], max_length), task.generator_tokenizer.pad_token_id, np.int32)
    tokens[:, : out.shape[1]] = out
    bs, k = r.doc_scores.shape
    rec = {"n": np.int32(n), "tokens": tokens, "hits": np.zeros((bs, k), bool), "gold": np.zeros((bs, k), bool),
           "collapse": np.zeros(len(CollapseMonitor.KEYS), np.float64)}
    if not task.closed_book:
        rec["hits"][:n] = answer_hits(r.texts[:n], answers)
        if positive_ids is not None:
            rec["gold"][:n] = gold_hits(r.ids[:n], positive_ids)
        stats = collapse_stats(r.rows[:n], r.doc_scores[:n])
        rec["collapse"] = np.asarray([stats[key] for key in CollapseMonitor.KEYS], np.float64)
    return rec


def _all_batches(local: list[dict[str, np.ndarray]], n_batches: int, task: Any, batch_size: int, k: int,
                 max_length: int, kilt_size: int = 0) -> list[dict[str, np.ndarray]]:
    """Every process's batch records, in batch order (batch j from process j mod P)."""
    count = jax.process_count()
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    rounds = -(-n_batches // count)
    blank = {"n": np.int32(0), "tokens": np.zeros((batch_size, max_length), np.int32),
             "hits": np.zeros((batch_size, k), bool), "gold": np.zeros((batch_size, k), bool),
             "collapse": np.zeros(len(CollapseMonitor.KEYS), np.float64)}
    if kilt_size:
        blank["kilt"] = np.zeros(kilt_size, np.float64)
    padded = local + [blank] * (rounds - len(local))
    stacked = {key: np.stack([rec[key] for rec in padded]) for key in blank}
    # jax arrays are 32-bit here: float64 statistics travel as their raw bytes.
    wide = [key for key in ("collapse", "kilt") if key in stacked]
    for key in wide:
        stacked[key] = stacked[key].view(np.uint32)
    gathered = jax.tree.map(np.asarray, multihost_utils.process_allgather(stacked))  # leaves [P, rounds, ...]
    for key in wide:
        gathered[key] = gathered[key].view(np.float64)
    return [{key: v[j % count, j // count] for key, v in gathered.items()} for j in range(n_batches)]


def _read_split(path: str, fmt: str, task: Any) -> tuple[list[str], list[list[str]], list[list[str]] | None,
                                                         list[list[list[str]]] | None]:
    """Questions, answers and, when any record names them, gold passage ids
    and gold evidence sets as page titles (``task``: config.task;
    classification drops its ignored labels)."""
    recs = kept_records(list(qa_formats.read_qa(path, fmt)), task)
    gold = [list(r.positive_ids or ()) for r in recs]
    prov = [[list(s) for s in r.provenance_titles] for r in recs]
    return ([r.question for r in recs], [list(r.answers) for r in recs], gold if any(gold) else None,
            prov if any(prov) else None)


def run_eval(config: Any, task: RagTask, rag_model: RagModel, params: Any, split_file: str,
             progress: bool = True, return_predictions: bool = False) -> dict[str, Any]:
    questions, answers, gold, prov = _read_split(split_file, config.data.format, config.task)
    if config.eval.max_examples:
        m = config.eval.max_examples
        questions, answers = questions[:m], answers[:m]
        gold, prov = (gold[:m] if gold else None), (prov[:m] if prov else None)
    return evaluate(task, rag_model, params, questions, answers, batch_size=config.eval.batch_size,
                    num_beams=config.eval.num_beams, max_length=config.eval.max_length,
                    decoding=config.eval.decoding, progress=progress, return_predictions=return_predictions,
                    positive_ids=gold, provenance=prov)


def fmt_metrics(ev: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if isinstance(v, float))


def evaluate_checkpoint(config: Any, workdir: str | os.PathLike, split: str = "test",
                        verbose: bool = True) -> dict[str, Any]:
    """EM/F1, recall@k and collapse statistics of the newest verified checkpoint
    on a split; also appended to ``workdir/metrics.jsonl`` (by process 0)."""
    check_inputs(config, required=(split,), trained_workdir=workdir)  # before tokenizers are trained into workdir
    file = {"dev": config.data.dev_file, "test": config.data.test_file}[split]
    models = build_models(config, workdir, jax.random.PRNGKey(config.train.seed))
    params, step = restore_params(config, workdir, models)
    task = make_task(config, models)
    rag_model = RagModel(task.config, params, models.question_tokenizer, models.generator_tokenizer)
    metrics = run_eval(config, task, rag_model, params, file, verbose and jax.process_index() == 0)
    metrics["step"] = step
    if jax.process_index() == 0:
        append_metrics(workdir, step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, split)
    return metrics

