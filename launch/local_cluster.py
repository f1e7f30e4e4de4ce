"""Runs a multi-process job as N local processes: a pod run rehearsed on one CPU machine.

    python launch/local_cluster.py -n 2 -- --config=configs/tiny.py --workdir=/tmp/run
    python launch/local_cluster.py -n 4 --devices-per-process 2 -- launch/evaluate.py --config=... --workdir=...
    python launch/local_cluster.py -n 2 -- -m rag_jax.cli build-index --passages P.tsv --encoder CTX --out IDX

After ``--`` come a Python script and its arguments, or ``-m MODULE`` and its
arguments (without either: launch/train.py). Each process gets XLA_FLAGS=--xla_force_host_platform_device_count=D
(default 8 // N), JAX_PLATFORMS=cpu unless set, and --coordinator_address=localhost:PORT
--num_processes=N --process_id=I appended. Output lines are prefixed [pI]. SIGTERM/SIGINT
are forwarded to all processes; when one fails the others are stopped and this exits
with the failing process's status.
"""
from __future__ import annotations

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)


def main(argv: list[str]) -> int:
    from rag_jax.train.distributed import run_local_cluster

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s -n N [--devices-per-process D] [--port P] -- [SCRIPT.py | -m MODULE] ARGS...")
    parser.add_argument("-n", "--num-processes", dest="num_processes", type=int, required=True)
    parser.add_argument("--devices-per-process", "--devices_per_process", dest="devices_per_process", type=int,
                        default=None, help="fake CPU devices in each process (default 8 // N, at least 1)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on localhost (default: a free one)")
    if "--" not in argv:
        parser.error("missing '--' before the script and its arguments")
    split = argv.index("--")
    args, rest = parser.parse_args(argv[:split]), argv[split + 1:]
    has_script = bool(rest) and not rest[0].startswith("-") and rest[0].endswith(".py")
    if rest[:1] == ["-m"] and len(rest) < 2:
        parser.error("-m needs a module name (e.g. -m rag_jax.cli build-index ...)")
    if has_script or rest[:1] == ["-m"]:
        command = [sys.executable, *rest]
    else:
        command = [sys.executable, os.path.join(_REPO, "launch", "train.py"), *rest]
    try:
        return run_local_cluster(command, args.num_processes, args.devices_per_process, args.port)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
