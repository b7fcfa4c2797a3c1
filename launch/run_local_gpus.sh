#!/usr/bin/env bash
# Train on every GPU of this host (one process; jax.jit data-parallel over all local devices).
#   bash launch/run_local_gpus.sh configs/irli.py:glove runs/irli-glove [--config.train.batch_size=4096 ...]
set -euo pipefail
config=${1:?config, e.g. configs/irli.py:glove}; workdir=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
exec python3 launch/train.py --config="$config" --workdir="$workdir" "$@"
