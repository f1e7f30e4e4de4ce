"""benchmarks/gpu_check.sh: the dry run goes through the GPU benchmark's code
path on CPU and prints its figures; without a GPU the real run refuses in one line."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # ~20 s of CPU: three small compiles (init, optimizer state, train step)
def test_dry_run_prints_tokens_per_second_and_mfu():
    out = _run("--dry-run", "--remat", "minimal")
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    tok = re.search(r"^tokens/s: (\d+) ", text, re.M)
    mfu = re.search(r"^MFU: ([\d.]+)% ", text, re.M)
    assert tok and mfu, text
    assert int(tok.group(1)) > 0 and 0 < float(mfu.group(1)) < 100
    assert re.search(r"^HFU: [\d.]+% \(recomputed forward included\)", text, re.M), text
    assert "remat minimal" in text and "loss" in text


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the real run would start")
def test_without_a_gpu_the_real_run_refuses_in_one_line():
    out = _run()
    assert out.returncode == 1
    assert out.stderr.strip() == "gpu_check.sh: no nvidia-smi: not a GPU machine (try --dry-run)"
