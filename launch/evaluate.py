"""Evaluates the latest checkpoint of a training workdir on the config's dev/test files.

    python launch/evaluate.py --config=configs/demo.py --workdir=DIR [--split=test]
"""
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir holding checkpoints/")
_SPLIT = flags.DEFINE_enum("split", "test", ["dev", "test"], "which file of config.data to evaluate")
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
    import jax
    from rag_jax.train.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _SPLIT.value)
    if jax.process_index() == 0:  # one process of a multi-process run prints
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=2))


if __name__ == "__main__":
    from rag_jax.config import parse_absl_flags
    from rag_jax.errors import debug_requested, run_reporting_errors

    # Flag parsing and main inside the boundary: a bad flag or --config field is
    # one line too. app.run exits through SystemExit, which the boundary lets pass.
    sys.exit(run_reporting_errors(lambda: app.run(main, flags_parser=parse_absl_flags),
                                  "evaluate.py", debug=debug_requested(sys.argv)))
