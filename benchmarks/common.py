"""Shared timing helpers for the benchmark scripts (not part of the package)."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def set_threads(n: int | None = None) -> int:
    """Gives torch as many intra-op threads as XLA's CPU client uses (all cores)."""
    n = n or os.cpu_count() or 1
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    return n


def timeit(fn: Callable[[], object], warmup: int = 2, reps: int = 5) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` calls (fn must block)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |")
