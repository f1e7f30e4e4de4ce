"""Pod-facing training entry point.

    python launch/train.py --config=configs/rag_sequence_nq.py \
        --config.train.lr=1e-5 --workdir=/path/to/workdir

Re-running the same command resumes from the latest checkpoint in workdir.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, TensorBoard events and results")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from rag_jax.train.loop import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
