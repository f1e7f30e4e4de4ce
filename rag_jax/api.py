"""The public loading functions (DESIGN.md section 5), gathered in one place."""
from __future__ import annotations

import os


def load_encoder(path: str | os.PathLike):  # noqa: ANN201
    from rag_jax.encoder import load_encoder as _load

    return _load(path)


def load_generator(path: str | os.PathLike):  # noqa: ANN201
    from rag_jax.generator import load_generator as _load

    return _load(path)


def load_rag(path: str | os.PathLike):  # noqa: ANN201
    from rag_jax.rag.model import load_rag as _load

    return _load(path)
