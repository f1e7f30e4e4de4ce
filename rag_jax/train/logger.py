"""Console, TensorBoard and ``metrics.jsonl`` metrics for training and evaluation.

``workdir/metrics.jsonl`` holds one JSON object per logged training step
(``{"step", "loss", "grad_norm", "lr", "step_time_s", ...}``) and one per
evaluation (with ``"split"``), appended as they happen: scripts and tests read
losses from it, not from the console. Only one process of a run writes (the
loop passes ``write_files`` on process 0 alone).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    """Writes scalars to TensorBoard event files under ``workdir/tb`` and to
    ``workdir/metrics.jsonl``, and prints a one-line summary with step time,
    examples/s and ETA."""

    def __init__(self, workdir: str | os.PathLike, total_steps: int, examples_per_step: int, enabled: bool = True,
                 write_files: bool = True):
        self.total_steps = total_steps
        self.examples_per_step = examples_per_step
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if write_files:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(os.fspath(workdir), "tb"))
            # Appended: a resumed run continues the same file (a step logged
            # twice across a crash appears twice; readers keep the last).
            self._jsonl = open(os.path.join(os.fspath(workdir), METRICS_FILE), "a", encoding="utf-8")
        self._t_last: float | None = None
        self._step_last: int | None = None

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if self._writer is not None:
            for k, v in metrics.items():
                if v is not None and math.isfinite(float(v)):
                    self._writer.add_scalar(f"{prefix}/{k}", float(v), step)
            self._writer.flush()
        if self._jsonl is not None:
            self._jsonl.write(_record(step, metrics, prefix))
            self._jsonl.flush()

    def log_train(self, step: int, metrics: Mapping[str, float]) -> str:
        now = time.perf_counter()
        extra = {}
        if self._t_last is not None and step > self._step_last:
            dt = (now - self._t_last) / (step - self._step_last)
            extra = {"step_time_s": dt, "examples_per_s": self.examples_per_step / dt}
            eta = dt * max(self.total_steps - step, 0)
        else:
            eta = None
        self._t_last, self._step_last = now, step
        self.write(step, {**metrics, **extra}, "train")
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {float(v):.4g}" for k, v in metrics.items()]
        if extra:
            parts += [f"{extra['step_time_s']:.2f}s/step", f"{extra['examples_per_s']:.1f} ex/s", f"ETA {_fmt(eta)}"]
        line = " | ".join(parts)
        if self.enabled:
            print(line, flush=True)
        return line

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def append_metrics(workdir: str | os.PathLike, step: int, metrics: Mapping[str, float], split: str) -> None:
    """One evaluation's record appended to ``workdir/metrics.jsonl`` (an
    evaluation of a finished run, outside any logger)."""
    with open(os.path.join(os.fspath(workdir), METRICS_FILE), "a", encoding="utf-8") as f:
        f.write(_record(step, metrics, split))


def _record(step: int, metrics: Mapping[str, float], prefix: str) -> str:
    record = {"step": int(step), **({} if prefix == "train" else {"split": prefix}),
              **{k: _json_number(v) for k, v in metrics.items()}}
    return json.dumps(record) + "\n"


def _json_number(v: float | None) -> float | None:
    # JSON has no NaN/Inf: write null rather than an invalid file.
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
