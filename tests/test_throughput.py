"""FLOPs per train step from XLA's cost analysis, peak FLOP/s by device kind, and MFU."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxidx.train import mesh as mesh_lib
from jaxidx.train import state as state_lib
from jaxidx.train import throughput


def test_step_flops_of_a_linear_layer_train_step():
    """2bdh FLOPs forward and 2bdh for the weight gradient, plus elementwise work of O(bh + dh)."""
    b, d, h = 256, 64, 32
    mesh = mesh_lib.make_mesh()
    tx = optax.sgd(0.1)
    state = state_lib.create({"w": jnp.ones((d, h))}, tx)
    shardings = state_lib.state_shardings(state, mesh)

    def loss(params, batch, aux, rng):
        return jnp.mean((batch["x"] @ params["w"]) ** 2), {}

    step = state_lib.make_train_step(loss, tx, mesh, shardings, seed=0)
    batch = mesh_lib.put_batch({"x": np.ones((b, d), np.float32)}, mesh)
    compiled = step.lower(jax.device_put(state, shardings), batch, {}).compile()
    matmuls = 2 * 2 * b * d * h
    assert matmuls <= throughput.step_flops(compiled, mesh.size) <= 1.5 * matmuls


@pytest.mark.parametrize("cost, want", [({"flops": 10.0}, 20.0), ([{"flops": 10.0}], 20.0), (None, None), ([], None),
                                        ({"flops": -1.0}, None)], ids=["dict", "list", "none", "empty", "unknown"])
def test_step_flops_across_jax_versions(cost, want):
    assert throughput.step_flops(types.SimpleNamespace(cost_analysis=lambda: cost), 2) == want


def test_step_flops_without_cost_analysis():
    def unsupported():
        raise NotImplementedError
    assert throughput.step_flops(types.SimpleNamespace(cost_analysis=unsupported), 2) is None


def test_peak_flops_by_device_kind_and_dtype():
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3", jnp.bfloat16) == 989e12
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3", jnp.float32) == 495e12
    assert throughput.peak_flops("NVIDIA H100 PCIe", jnp.bfloat16) == 756e12
    assert throughput.peak_flops("NVIDIA H200", jnp.bfloat16) == 989e12
    assert throughput.peak_flops("NVIDIA A100-SXM4-80GB", np.float32) == 156e12
    assert throughput.peak_flops("NVIDIA L4", jnp.bfloat16) == 121e12
    assert throughput.peak_flops("Tesla T4", np.float32) == 8.1e12
    assert throughput.peak_flops("Tesla V100-SXM2-16GB", np.float16) == 125e12
    for unknown in ("cpu", "NVIDIA L40S", "NVIDIA H100 NVL", "TPU v4"):
        assert throughput.peak_flops(unknown, jnp.bfloat16) is None


def test_compute_dtype_is_that_of_most_parameter_values():
    params = {"small": np.zeros(10, np.float32), "big": jnp.zeros(100, jnp.bfloat16), "ids": np.zeros(1000, np.int32)}
    assert throughput.compute_dtype(params) == jnp.bfloat16
    assert throughput.compute_dtype({"ids": np.zeros(3, np.int32)}) == np.float32


def test_mfu_and_logged_scalars():
    # 4 TFLOP per step in 0.5 s is 8 TFLOP/s; two devices of 8 TFLOP/s peak are used at half.
    assert throughput.mfu(4e12, 0.5, 2, 8e12) == pytest.approx(0.5)
    assert throughput.mfu(4e12, 0.5, 2, None) is None
    assert throughput.step_scalars(4e12, 0.5, 2, None) == {"flops_per_step": 4e12, "tflops_per_second": 8.0}
    assert throughput.step_scalars(4e12, 0.5, 2, 8e12)["mfu"] == pytest.approx(0.5)
    assert throughput.step_scalars(None, 0.5, 2, 8e12) == {}
