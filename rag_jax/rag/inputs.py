"""Generator inputs: each retrieved passage joined with the question, as HF
``RagRetriever.postprocess_docs`` builds them."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

TITLE_SEP = " / "
DOC_SEP = " // "


def context_string(
    title: str, text: str, question: str, prefix: str | None = None,
    title_sep: str = TITLE_SEP, doc_sep: str = DOC_SEP,
) -> str:
    """``prefix + title + " / " + text + " // " + question``.

    As HF: one leading and one trailing double quote are removed from the
    title (DPR TSV titles are often quoted), and each run of two spaces is
    replaced once, left to right (``str.replace``), not collapsed fully.
    """
    title = str(title).removeprefix('"').removesuffix('"')
    out = (prefix or "") + title + title_sep + str(text) + doc_sep + str(question)
    return out.replace("  ", " ")


def build_context_strings(
    titles: Sequence[Sequence[str]],
    texts: Sequence[Sequence[str]],
    questions: Sequence[str],
    prefix: str | None = None,
    title_sep: str = TITLE_SEP,
    doc_sep: str = DOC_SEP,
) -> list[list[str]]:
    """``[B][K]`` strings from per-question lists of titles and texts."""
    if not (len(titles) == len(texts) == len(questions)):
        raise ValueError(f"{len(questions)} questions but {len(titles)} title rows and {len(texts)} text rows")
    out = []
    for i, (ts, xs, q) in enumerate(zip(titles, texts, questions)):
        if len(ts) != len(xs):
            raise ValueError(f"question {i}: {len(ts)} titles but {len(xs)} texts")
        out.append([context_string(t, x, q, prefix, title_sep, doc_sep) for t, x in zip(ts, xs)])
    return out


def build_generator_inputs(
    tokenizer: Any,
    titles: Sequence[Sequence[str]],
    texts: Sequence[Sequence[str]],
    questions: Sequence[str],
    max_combined_length: int = 300,
    prefix: str | None = None,
    title_sep: str = TITLE_SEP,
    doc_sep: str = DOC_SEP,
) -> dict[str, np.ndarray]:
    """Tokenized contexts: ``input_ids`` and ``attention_mask`` ``[B, K, L]``
    (padded to ``max_combined_length`` and truncated, as HF ``padding="max_length"``).

    ``tokenizer`` is a ``rag_jax.data.tokenize.TextTokenizer`` (or any callable
    returning the same dict of ``[N, L]`` arrays).
    """
    strings = build_context_strings(titles, texts, questions, prefix, title_sep, doc_sep)
    k = {len(row) for row in strings}
    if len(k) > 1:
        raise ValueError(f"every question needs the same number of documents, got {sorted(k)}")
    b, k = len(strings), (k.pop() if k else 0)
    enc = tokenizer([s for row in strings for s in row], max_length=max_combined_length)
    return {
        "input_ids": np.asarray(enc["input_ids"]).reshape(b, k, -1),
        "attention_mask": np.asarray(enc["attention_mask"]).reshape(b, k, -1),
    }
