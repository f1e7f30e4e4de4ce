#!/usr/bin/env bash
# One command for a lent GPU machine: install the CUDA build of jax 0.10.2 (if
# this Python lacks a working one), then time the paper-shape RAG-Sequence
# train step (benchmarks/gpu_step.py) and print tokens/s and MFU.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repo root
#   bash benchmarks/gpu_check.sh --remat minimal # extra flags go to gpu_step.py
#   bash benchmarks/gpu_check.sh --dry-run       # tiny shapes on CPU, nothing installed
#
# PYTHON picks the interpreter (default python3); it needs network access to
# PyPI only when jax's CUDA plugin is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
JAX_VERSION=0.10.2

dry_run=0
for a in "$@"; do [[ "$a" == "--dry-run" ]] && dry_run=1; done

if [[ $dry_run == 0 ]]; then
  command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: no nvidia-smi: not a GPU machine (try --dry-run)" >&2; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  if ! "$PYTHON" -c "import jax, sys; sys.exit(jax.__version__ != '$JAX_VERSION' or jax.devices()[0].platform != 'gpu')" 2>/dev/null; then
    # jax's CUDA 13 wheels need an R580+ driver; older drivers take the CUDA 12 ones.
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)
    cuda=cuda12; [[ "$driver" -ge 580 ]] && cuda=cuda13
    echo "installing jax[$cuda]==$JAX_VERSION (driver $driver)"
    # The pins of pyproject.toml that the train step imports (not scann, torch...).
    "$PYTHON" -m pip install --quiet "jax[$cuda]==$JAX_VERSION" flax==0.12.8 optax==0.2.8 numpy==2.4.6 \
      tokenizers==0.23.3 ml-collections==1.1.0 absl-py==2.5.1
  fi
  "$PYTHON" -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('jax', jax.__version__, d)"
fi
exec timeout 300 "$PYTHON" benchmarks/gpu_step.py "$@"
