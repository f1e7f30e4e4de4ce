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
flags.DEFINE_bool("debug", False, "on an error, show the full traceback instead of one line")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 in a multi-process run (else JAX_COORDINATOR_ADDRESS)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (else JAX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process, in [0, num_processes) (else JAX_PROCESS_ID)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from rag_jax.train.distributed import initialize

    # Before any other jax use; config.multihost=True auto-detects TPU pod slices and SLURM.
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
               multihost=_CONFIG.value.get("multihost", False))
    from rag_jax.train.checkpointing import PREEMPTED_EXIT_CODE
    from rag_jax.train.loop import train_and_evaluate

    out = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    # app.run exits with main's return value: a preempted run saved its state
    # but is not finished, and schedulers requeue on this code.
    return PREEMPTED_EXIT_CODE if out["preempted"] else 0


if __name__ == "__main__":
    from rag_jax.config import parse_absl_flags
    from rag_jax.errors import debug_requested, run_reporting_errors

    # Flag parsing and main inside the boundary: a bad flag or --config field is
    # one line too. app.run exits through SystemExit, which the boundary lets pass.
    sys.exit(run_reporting_errors(lambda: app.run(main, flags_parser=parse_absl_flags),
                                  "train.py", debug=debug_requested(sys.argv)))
