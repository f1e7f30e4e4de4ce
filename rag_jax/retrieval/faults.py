"""The one test hook of the index build: deterministic kill points.

``RAG_JAX_FAULT_POINT=NAME`` makes the process SIGKILL itself (exactly a
``kill -9``: no ``finally``, no ``atexit``) when the build reaches point
``NAME``; ``NAME:stop`` SIGSTOPs it there instead (alive, holding its lock,
until SIGCONT/SIGKILL). The points, in build order:

    corpus        the corpus store is complete
    shard-N       embedding shard N is saved (N from 0)
    embeddings    the embedding store is complete
    index         the finished index sits in OUT.work, not yet renamed to OUT
    commit        OUT is in place, the lock not yet released

tests/test_faults_index.py kills ``rag-jax build-index`` at these points and
checks that a re-run finishes with the uninterrupted build's index. Unset
(always, outside tests) it costs one environment lookup per point.
"""
from __future__ import annotations

import os
import signal

ENV = "RAG_JAX_FAULT_POINT"


def fault_point(name: str) -> None:
    want = os.environ.get(ENV)
    if want == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif want == name + ":stop":
        os.kill(os.getpid(), signal.SIGSTOP)
