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


def process_block(process_ids: np.ndarray, process: int) -> tuple[int, int]:
    """(k, n): the devices of `process` hold block k of n equal, contiguous row blocks of a batch split
    over 'data'. `process_ids` is the mesh's [data, model] array of device process indices; (0, 1) in
    a single process, and also where a process's devices span the whole 'data' axis."""
    rows = np.flatnonzero((process_ids == process).any(axis=1))
    size = rows.size
    if not size or process_ids.shape[0] % size or rows[0] % size or rows[-1] - rows[0] + 1 != size:
        raise ValueError(f"process {process}: its devices are not one aligned block of the 'data' axis "
                         f"(positions {rows.tolist()} of {process_ids.shape[0]})")
    return int(rows[0] // size), int(process_ids.shape[0] // size)


def process_shard(mesh: Mesh) -> tuple[int, int]:
    """(k, n) of this process: it builds only rows block k of n of every global batch (see `put_batch`)."""
    ids = np.vectorize(lambda d: d.process_index)(mesh.devices).reshape(mesh.shape[DATA], -1)
    return process_block(ids, jax.process_index())


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a global batch (a dict, possibly nested) -> global arrays split over 'data'.

    Each process builds only its block of rows (`process_shard`; the whole batch in a single
    process), and the global arrays are assembled from every process's block without copying data
    between processes.
    """
    sharding = batch_sharding(mesh)
    _, n = process_shard(mesh)

    def place(a):
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(sharding, a, (a.shape[0] * n,) + a.shape[1:])

    return jax.tree.map(place, batch)  # nested dicts too (sparse rows {'idx', 'val'})


def to_host(tree):
    """Device arrays (possibly sharded over processes) -> full numpy arrays."""
    from jax.experimental import multihost_utils

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(get, tree)
