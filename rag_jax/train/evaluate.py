"""Evaluation of a RAG model on a QA split: exact match / F1 of generated
answers, retrieval answer recall@k, and the retrieval-collapse monitor; for a
run in progress (``run_eval``) or a finished workdir (``evaluate_checkpoint``)."""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from rag_jax.data import qa_formats
from rag_jax.eval.monitor import CollapseMonitor
from rag_jax.eval.qa import qa_metrics
from rag_jax.eval.retrieval import answer_hits, gold_hits, top_k_accuracy
from rag_jax.rag.model import RagModel
from rag_jax.train.setup import build_models, check_inputs, make_task, restore_params
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
) -> dict[str, Any]:
    """Generates an answer for every question and scores it.

    ``rag_model`` is a ``rag_jax.rag.model.RagModel`` used for its jitted
    decoders; ``params`` replace its own, so one object serves every eval of a
    run without recompiling. Batches are padded to ``batch_size`` (fixed shapes).
    With ``positive_ids`` (per question, the passages that state its answer;
    empty where unknown) it also reports ``gold_recall@k`` over the questions
    that have them: answer strings recur in unrelated passages, gold ids do not.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answer lists")
    k = n_docs or task.n_docs
    rag_model.params = params
    preds: list[str] = []
    if positive_ids is not None and len(positive_ids) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(positive_ids)} positive id lists")
    hits_all, gold_all, collapse = [], [], CollapseMonitor()
    t0 = time.perf_counter()
    bar = tqdm(total=len(questions), desc="eval", unit="q", disable=not progress, leave=False)
    for start in range(0, len(questions), batch_size):
        qs = list(questions[start : start + batch_size])
        n = len(qs)
        qs_padded = qs + [qs[-1]] * (batch_size - n)
        r = task.retrieve(params.get("question_encoder"), qs_padded, n_docs=k)
        out = rag_model.generate(
            r.context_input_ids, r.context_attention_mask, r.doc_scores,
            variant=task.variant, num_beams=num_beams, max_length=max_length, decoding=decoding,
        )
        preds += task.generator_tokenizer.decode(np.asarray(out)[:n])
        if not task.closed_book:
            hits_all.append(answer_hits(r.texts[:n], answers[start : start + n]))
            if positive_ids is not None:
                gold_all.append(gold_hits(r.ids[:n], positive_ids[start : start + n]))
            collapse.update(r.rows[:n], r.doc_scores[:n])
        bar.update(n)
    bar.close()
    metrics: dict[str, Any] = dict(qa_metrics(preds, [list(a) for a in answers]))
    if hits_all:
        hits = np.concatenate(hits_all, axis=0)
        for kk, v in top_k_accuracy(hits, sorted({1, min(5, k), k})).items():
            metrics[f"recall@{kk}"] = v
        if gold_all:
            gold = np.concatenate(gold_all, axis=0)
            known = np.array([len(p) > 0 for p in positive_ids], bool)
            if known.any():
                for kk, v in top_k_accuracy(gold[known], sorted({1, min(5, k), k})).items():
                    metrics[f"gold_recall@{kk}"] = v
        metrics.update(collapse.result())
    metrics["examples"] = len(questions)
    metrics["eval_seconds"] = time.perf_counter() - t0
    if return_predictions:
        metrics["predictions"] = preds
    return metrics


def _read_split(path: str, fmt: str) -> tuple[list[str], list[list[str]], list[list[str]] | None]:
    """Questions, answers and, when any record names them, gold passage ids."""
    recs = list(qa_formats.read_qa(path, fmt))
    gold = [list(r.positive_ids or ()) for r in recs]
    return [r.question for r in recs], [list(r.answers) for r in recs], gold if any(gold) else None


def run_eval(config: Any, task: RagTask, rag_model: RagModel, params: Any, split_file: str,
             progress: bool = True, return_predictions: bool = False) -> dict[str, Any]:
    questions, answers, gold = _read_split(split_file, config.data.format)
    if config.eval.max_examples:
        m = config.eval.max_examples
        questions, answers, gold = questions[:m], answers[:m], (gold[:m] if gold else None)
    return evaluate(task, rag_model, params, questions, answers, batch_size=config.eval.batch_size,
                    num_beams=config.eval.num_beams, max_length=config.eval.max_length,
                    decoding=config.eval.decoding, progress=progress, return_predictions=return_predictions,
                    positive_ids=gold)


def fmt_metrics(ev: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if isinstance(v, float))


def evaluate_checkpoint(config: Any, workdir: str | os.PathLike, split: str = "test",
                        verbose: bool = True) -> dict[str, Any]:
    """EM/F1, recall@k and collapse statistics of the latest checkpoint on a split."""
    check_inputs(config, required=(split,), trained_workdir=workdir)  # before tokenizers are trained into workdir
    file = {"dev": config.data.dev_file, "test": config.data.test_file}[split]
    models = build_models(config, workdir, jax.random.PRNGKey(config.train.seed))
    params, step = restore_params(config, workdir, models)
    task = make_task(config, models)
    rag_model = RagModel(task.config, params, models.question_tokenizer, models.generator_tokenizer)
    metrics = run_eval(config, task, rag_model, params, file, verbose)
    metrics["step"] = step
    return metrics

