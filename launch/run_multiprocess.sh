#!/usr/bin/env bash
# Several processes without a scheduler (one per host, or several on one host): each gets the
# coordinator address, the process count and its own id; jax.distributed.initialize() joins them.
#   On host i of N:  bash launch/run_multiprocess.sh HOST0:PORT N i configs/irli.py:glove runs/irli-glove
#   Two processes on this CPU box (gloo collectives):
#     JAX_PLATFORMS=cpu bash launch/run_multiprocess.sh 127.0.0.1:12345 2 0 configs/irli.py:tiny runs/t &
#     JAX_PLATFORMS=cpu bash launch/run_multiprocess.sh 127.0.0.1:12345 2 1 configs/irli.py:tiny runs/t
set -euo pipefail
coord=${1:?coordinator host:port}; n=${2:?process count}; id=${3:?process id}
config=${4:?config}; workdir=${5:?workdir}; shift 5
cd "$(dirname "$0")/.."
exec python3 launch/train.py --config="$config" --workdir="$workdir" \
  --coordinator_address="$coord" --num_processes="$n" --process_id="$id" "$@"
