"""FLOPs per train step and model FLOP utilisation (MFU), for the training logs.

FLOPs come from XLA's cost analysis of the compiled step, which describes one
device's share after SPMD partitioning; MFU divides the achieved FLOP/s by the
devices' peak dense FLOP/s, known here for common NVIDIA GPUs only.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Peak dense (no sparsity) FLOP/s of one device from NVIDIA's data sheets, first match of device_kind wins:
# (16-bit matmuls: bf16 tensor cores, fp16 on T4 and V100 which have no bf16; float32 matmuls at JAX's
# default precision: TF32 tensor cores from Ampere on, plain FP32 before).
PEAK_FLOPS = (
    (r"H100.*PCIE", 756e12, 378e12),
    (r"H100(?!.*NVL)", 989e12, 495e12),   # SXM ("NVIDIA H100 80GB HBM3")
    (r"H200(?!.*NVL)", 989e12, 495e12),
    (r"A100", 312e12, 156e12),
    (r"\bL4\b", 121e12, 60e12),
    (r"\bT4\b", 65e12, 8.1e12),
    (r"V100.*PCIE", 112e12, 14e12),
    (r"V100", 125e12, 15.7e12),
)


def peak_flops(device_kind: str, dtype) -> Optional[float]:
    """Peak dense FLOP/s of one `device_kind` device for matmuls in `dtype`; None for an unknown device."""
    for pattern, half, single in PEAK_FLOPS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return half if np.dtype(dtype).itemsize <= 2 else single
    return None


def compute_dtype(params: Any):
    """The dtype most parameter values have (what the step's matmuls mostly run in)."""
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return max(leaves, key=lambda x: x.size).dtype if leaves else np.dtype(np.float32)


def step_flops(compiled, n_devices: int) -> Optional[float]:
    """FLOPs of one call of a compiled SPMD program on all `n_devices`, from `compiled.cost_analysis()`
    (one device's share).

    That is a dict in current JAX, a list of one dict in older versions, and None (or an error)
    on backends without cost analysis; None is returned then.
    """
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) * n_devices if flops and flops > 0 else None


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, peak: Optional[float]) -> Optional[float]:
    """Achieved FLOP/s over the peak FLOP/s of all `n_devices`; None where the peak is unknown."""
    if peak is None:
        return None
    return flops_per_step / step_seconds / (n_devices * peak)


def step_scalars(flops_per_step: Optional[float], step_seconds: float, n_devices: int,
                 peak: Optional[float]) -> dict:
    """What the train loop logs: FLOPs per (global) step, achieved TFLOP/s, and MFU where the peak is known."""
    if flops_per_step is None:
        return {}
    out = {"flops_per_step": flops_per_step, "tflops_per_second": flops_per_step / step_seconds / 1e12}
    util = mfu(flops_per_step, step_seconds, n_devices, peak)
    if util is not None:
        out["mfu"] = util
    return out
