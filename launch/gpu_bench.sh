#!/usr/bin/env bash
# Device benchmark (launch/bench_device.py) on a machine with one NVIDIA GPU: installs jaxidx with the
# cuda12 extra (jax[cuda12]) and faiss-gpu, then trains LMI and IRLI on GloVe and searches them with
# backend='device' beside faiss-GPU IVF-Flat, at 1K and 10K queries per call; writes
# benchmarks/bench_device.json. Under 8 minutes on one H100-class GPU.
#
#   bash launch/gpu_bench.sh            # GPU
#   bash launch/gpu_bench.sh --cpu      # the same code on CPU, small synthetic data, under a minute (CI)
# Further flags go to launch/bench_device.py (e.g. --out=..., --methods=lmi).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--cpu" ]]; then
  shift
  JAX_PLATFORMS=cpu exec python3 launch/bench_device.py --cpu "$@"
fi
python3 -m pip install -q -e ".[cuda12,bench]"
python3 -m pip install -q faiss-gpu-cu12 || echo "faiss-gpu-cu12 not installable here: the faiss peer runs on the CPU"
exec python3 launch/bench_device.py "$@"
