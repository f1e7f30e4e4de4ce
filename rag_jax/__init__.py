"""rag_jax: Retrieval-Augmented Generation in JAX/Flax.

Public API (see README): ``load_encoder``, ``load_generator``, ``load_rag``.
"""
from __future__ import annotations

__version__ = "0.1.0"


# Lazy: ``import rag_jax`` stays cheap (no jax) until a model is loaded.
def load_encoder(path):  # noqa: ANN001,ANN201
    """Loads an HF DPR question/context encoder or plain BERT directory."""
    from rag_jax.encoder import load_encoder as _load

    return _load(path)


def load_generator(path):  # noqa: ANN001,ANN201
    """Loads an HF ``BartForConditionalGeneration`` directory."""
    from rag_jax.generator import load_generator as _load

    return _load(path)


def load_rag(path):  # noqa: ANN001,ANN201
    """Loads an HF ``RagSequenceForGeneration`` / ``RagTokenForGeneration`` directory."""
    from rag_jax.rag.model import load_rag as _load

    return _load(path)


__all__ = ["load_encoder", "load_generator", "load_rag", "__version__"]
