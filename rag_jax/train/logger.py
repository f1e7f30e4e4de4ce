"""Console + TensorBoard metrics for training and evaluation."""
from __future__ import annotations

import math
import os
import time
from typing import Mapping


class MetricLogger:
    """Writes scalars to TensorBoard event files under ``workdir/tb`` and prints
    a one-line summary with step time, examples/s and ETA."""

    def __init__(self, workdir: str | os.PathLike, total_steps: int, examples_per_step: int, enabled: bool = True):
        self.total_steps = total_steps
        self.examples_per_step = examples_per_step
        self.enabled = enabled
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(os.fspath(workdir), "tb"))
        self._t_last: float | None = None
        self._step_last: int | None = None

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if self._writer is not None:
            for k, v in metrics.items():
                if v is not None and math.isfinite(float(v)):
                    self._writer.add_scalar(f"{prefix}/{k}", float(v), step)
            self._writer.flush()

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


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
