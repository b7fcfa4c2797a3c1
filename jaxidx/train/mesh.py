"""Device mesh and data-parallel placement (the current form of `pmap`).

Training is `jax.jit` over a `Mesh` with axes ('data', 'model'): parameters are
replicated (or split over 'model'), batches are split over 'data'. The same code
runs on one CPU, 8 simulated devices, a multi-GPU host or many hosts.
"""
from __future__ import annotations

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def make_mesh(model_parallel: int = 1) -> Mesh:
    """All devices of all processes as a ('data', 'model') mesh."""
    devices = np.asarray(jax.devices())
    if model_parallel < 1 or devices.size % model_parallel:
        raise ValueError(
            f"mesh.model_parallel: {model_parallel} must be >= 1 and divide the device count {devices.size}")
    return Mesh(devices.reshape(-1, model_parallel), (DATA, MODEL))


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, P(DATA))


def put_replicated(tree, mesh: Mesh):
    """Host arrays -> device arrays replicated on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: jax.device_put(a, sharding), tree)


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """A global host batch (a dict, possibly nested) -> arrays split over 'data'.

    Every process holds the same global batch (built from the same seed); each
    contributes only the rows that belong to its own devices, so this is also
    correct with several processes.
    """
    sharding = batch_sharding(mesh)
    n_proc, proc = jax.process_count(), jax.process_index()

    def place(a):
        a = np.asarray(a)
        if n_proc == 1:
            return jax.device_put(a, sharding)
        rows = a.shape[0] // n_proc
        return jax.make_array_from_process_local_data(sharding, a[proc * rows:(proc + 1) * rows], a.shape)

    return jax.tree.map(place, batch)  # nested dicts too (sparse rows {'idx', 'val'})


def to_host(tree):
    """Device arrays (possibly sharded over processes) -> full numpy arrays."""
    from jax.experimental import multihost_utils

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(get, tree)
