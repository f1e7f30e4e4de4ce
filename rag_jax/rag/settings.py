"""``RagSettings``: the RAG-level attributes of an HF ``RagConfig`` that change
numbers rag_jax computes, each one applied (HF semantics in brackets):

* ``n_docs``, ``max_combined_length``: ``RagPipeline``'s defaults for the
  number of retrieved passages and the context token length [the retriever's
  and ``forward``/``generate``'s defaults]; training takes both from its config.
* ``title_sep``, ``doc_sep``, ``prefix``: the context string
  ``prefix + title + title_sep + text + doc_sep + question`` that
  ``rag_jax.rag.inputs.retrieve_contexts`` builds [``RagRetriever.postprocess_docs``].
  HF takes the prefix from the *generator's* config and never reads the
  RAG-level ``prefix``, so ``rag_jax.hf.rag`` imports and exports it there.
* ``exclude_bos_score``, ``label_smoothing``: ``RagModel.nll``'s defaults [the
  ``forward`` loss]; ``label_smoothing`` also scores RAG-Sequence candidates.
* special token ids: resolved by ``RagConfig`` (RAG level first, then the
  generator's).

The other HF attributes are either checked at import (``reduce_loss``,
``do_deduplication``: only HF's defaults are implemented) or do not change
anything rag_jax computes (``do_marginalize``, retrieval back-end settings);
see ``rag_jax.hf.rag``. No heavy imports here: ``rag_jax.hf.rag`` and
``rag_jax.rag.model`` (which imports it) both use this module.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RagSettings:
    """RAG attributes of an HF config that change inputs, losses or decoding."""

    n_docs: int = 5
    max_combined_length: int = 300
    title_sep: str = " / "
    doc_sep: str = " // "
    exclude_bos_score: bool = False
    label_smoothing: float = 0.0
    prefix: str | None = None
    # Special ids at the RAG level; None defers to the generator's (as HF does).
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    variant: str = "sequence"  # from ``architectures``; the default for nll/generate
