"""Questions in, generator inputs out: the one retrieval path of training,
evaluation, inference and ``rag-jax search`` (``retrieve_contexts``), with each
retrieved passage joined to its question as HF ``RagRetriever.postprocess_docs``
does (``context_string``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from rag_jax.data.tokenize import TextTokenizer
from rag_jax.models.bert import BertConfig
from rag_jax.rag.model import question_embedder
from rag_jax.rag.settings import RagSettings

_DEFAULT = RagSettings()


def context_string(
    title: str, text: str, question: str, prefix: str | None = None,
    title_sep: str = _DEFAULT.title_sep, doc_sep: str = _DEFAULT.doc_sep,
) -> str:
    """``prefix + title + title_sep + text + doc_sep + question``.

    As HF: one leading and one trailing double quote are removed from the
    title (DPR TSV titles are often quoted), and each run of two spaces is
    replaced once, left to right (``str.replace``), not collapsed fully.
    """
    title = str(title).removeprefix('"').removesuffix('"')
    out = (prefix or "") + title + title_sep + str(text) + doc_sep + str(question)
    return out.replace("  ", " ")


def split_doc_sep(doc_sep: str) -> tuple[str, str]:
    """``doc_sep`` -> (its head up to the last non-space character, the
    whitespace after it), e.g. ``" // "`` -> ``(" //", " ")``.

    On-device context assembly (``rag_jax.retrieval.token_table``) joins the
    tokens of ``passage_string`` and ``question_string`` at that point. The
    join equals tokenizing ``context_string`` whole when the head ends in a
    non-whitespace character and the tail starts with a space: no ``"  "``
    replacement straddles the cut, a byte-level BPE pre-token never runs
    from a non-space character into whitespace, and a string starting with a
    space gets no extra ``add_prefix_space`` space.
    """
    head = doc_sep.rstrip()
    tail = doc_sep[len(head):]
    if not head or not tail.startswith(" "):
        raise ValueError(f"doc_sep {doc_sep!r} must hold a non-space character followed by a space "
                         "for token-space context assembly")
    return head, tail


def passage_string(
    title: str, text: str, prefix: str | None = None,
    title_sep: str = _DEFAULT.title_sep, doc_sep: str = _DEFAULT.doc_sep,
) -> str:
    """The passage part of :func:`context_string`: ``prefix + title + title_sep + text + head(doc_sep)``,
    with the same title-quote and double-space rules."""
    title = str(title).removeprefix('"').removesuffix('"')
    head, _ = split_doc_sep(doc_sep)
    return ((prefix or "") + title + title_sep + str(text) + head).replace("  ", " ")


def question_string(question: str, doc_sep: str = _DEFAULT.doc_sep) -> str:
    """The question part of :func:`context_string`: ``tail(doc_sep) + question``, same double-space rule.
    ``passage_string(...) + question_string(...) == context_string(...)``."""
    _, tail = split_doc_sep(doc_sep)
    return (tail + str(question)).replace("  ", " ")


def build_context_strings(
    titles: Sequence[Sequence[str]],
    texts: Sequence[Sequence[str]],
    questions: Sequence[str],
    prefix: str | None = None,
    title_sep: str = _DEFAULT.title_sep,
    doc_sep: str = _DEFAULT.doc_sep,
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


# eq=False: field-wise equality of numpy arrays has no single truth value.
@dataclasses.dataclass(frozen=True, eq=False)
class RetrievedContexts:
    """One retrieval step for ``B`` questions, ``K`` documents each, best first.

    ``context_*`` are ``[B, K, L]`` token ids and mask of the generator inputs
    (None when no generator tokenizer was given: ``rag-jax search`` only ranks).
    ``doc_scores`` ``[B, K]`` are ``q . d`` in float32, ``doc_embeds``
    ``[B, K, D]`` the stored document vectors (the training step recomputes
    the scores from them); from a BM25 index ``doc_scores`` are the BM25
    scores and ``doc_embeds`` is None (the training step takes the scores as
    they are). ``rows``/``ids`` ``[B, K]`` corpus rows and passage
    ids. Closed book: one "document", the question itself, with row -1, id
    "", a zero vector and score 0. ``question_*`` ``[B, Lq]`` are the question
    tokens the embedding was computed from.
    """

    question_input_ids: np.ndarray
    question_attention_mask: np.ndarray
    question_token_type_ids: np.ndarray
    context_input_ids: np.ndarray | None
    context_attention_mask: np.ndarray | None
    doc_scores: np.ndarray
    doc_embeds: np.ndarray | None
    rows: np.ndarray
    ids: np.ndarray
    titles: list[list[str]]
    texts: list[list[str]]


def retrieve_contexts(
    questions: Sequence[str],
    *,
    question_config: BertConfig,
    question_params: Any,
    question_tokenizer: TextTokenizer,
    retriever: Any,
    n_docs: int,
    max_question_length: int,
    generator_tokenizer: TextTokenizer | None = None,
    max_combined_length: int = _DEFAULT.max_combined_length,
    settings: RagSettings = _DEFAULT,
    embed: Callable[..., np.ndarray] | None = None,
) -> RetrievedContexts:
    """Tokenizes the questions, embeds them with the jitted question encoder
    (``question_params``), retrieves ``n_docs`` passages each from
    ``retriever`` (a ``rag_jax.retrieval.retriever.Retriever``; None: closed
    book) and tokenizes the contexts, padded and truncated to
    ``max_combined_length`` (HF ``padding="max_length"``).

    ``settings.title_sep``, ``settings.doc_sep`` and ``settings.prefix`` format
    the context strings; its ``n_docs`` and ``max_combined_length`` are not
    read (callers decide which defaults apply). ``embed`` replaces the jitted
    embedding (``(params, ids, mask, token_types) -> [B, D]``; multi-process
    training runs it as one program over the global batch). A retriever
    that searches text (BM25, hybrid: its ``needs_text``) also gets the
    questions; one that needs no vectors (BM25 alone: ``needs_vectors``
    False) is searched without running the question encoder.
    """
    questions = [str(q) for q in questions]
    for i, q in enumerate(questions):
        if not q.strip():
            raise ValueError(f"question {i} is empty")
    b = len(questions)
    q = question_tokenizer(questions, max_length=max_question_length)
    tokens = {
        "question_input_ids": q["input_ids"],
        "question_attention_mask": q["attention_mask"],
        "question_token_type_ids": q["token_type_ids"],
    }
    if retriever is None:
        if generator_tokenizer is None:
            raise ValueError("closed book needs the generator tokenizer: the question is the only document")
        ctx = generator_tokenizer(questions, max_length=max_combined_length)
        return RetrievedContexts(
            **tokens,
            context_input_ids=ctx["input_ids"][:, None],
            context_attention_mask=ctx["attention_mask"][:, None],
            doc_scores=np.zeros((b, 1), np.float32),
            doc_embeds=np.zeros((b, 1, question_config.output_dim), np.float32),
            rows=np.full((b, 1), -1, np.int64),
            ids=np.full((b, 1), "", object),
            titles=[[""] for _ in range(b)],
            texts=[[""] for _ in range(b)],
        )
    vectors = None
    if getattr(retriever, "needs_vectors", True):  # stand-ins without the attribute are dense
        vectors = np.asarray((embed or question_embedder(question_config))(
            question_params, q["input_ids"], q["attention_mask"], q["token_type_ids"]
        ))
    if getattr(retriever, "needs_text", False):
        got = retriever.retrieve(vectors, n_docs, questions=questions)
    else:
        got = retriever.retrieve(vectors, n_docs)
    ctx_ids = ctx_mask = None
    if generator_tokenizer is not None:
        strings = build_context_strings(
            got.titles, got.texts, questions, settings.prefix, settings.title_sep, settings.doc_sep
        )
        ctx = generator_tokenizer([s for row in strings for s in row], max_length=max_combined_length)
        ctx_ids = ctx["input_ids"].reshape(b, n_docs, -1)
        ctx_mask = ctx["attention_mask"].reshape(b, n_docs, -1)
    return RetrievedContexts(
        **tokens,
        context_input_ids=ctx_ids,
        context_attention_mask=ctx_mask,
        doc_scores=np.asarray(got.scores, np.float32),
        doc_embeds=None if got.doc_embeds is None else np.asarray(got.doc_embeds, np.float32),
        rows=np.asarray(got.rows),
        ids=np.asarray(got.ids),
        titles=got.titles,
        texts=got.texts,
    )
