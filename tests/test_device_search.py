"""backend='device' and sharded indexes: the same results as the host kernels, on one device, on 8
simulated devices and on two processes joined by gloo collectives; memory per device falls with the
device count."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import jaxidx
from helpers import REPO, run_python
from jaxidx.data import load
from jaxidx.search.sharded import ShardedLayout, runs_to_rows

SETTINGS = [{"n_probe": 1}, {"n_probe": 5}, {"n_probe": 5, "max_candidates": 300},
            {"n_probe": 3, "route": "centroids"}]


@pytest.fixture(scope="module", params=["euclidean", "angular"])
def saved(request, tmp_path_factory):
    data = load(f"synthetic-ann:n=3000,q=100,d=13,clusters=30,metric={request.param},seed=4")
    index = jaxidx.fit("lmi:tiny", data, progress=False, kmeans__balance=2.0)
    path = str(tmp_path_factory.mktemp("lmi") / "index")
    index.save(path)
    return path, data


def _results(index, queries, backend):
    return {json.dumps(s): [a.tolist() for a in index.search(queries, 10, backend=backend, **s)] for s in SETTINGS}


def test_runs_to_rows_by_hand():
    import jax.numpy as jnp
    rows, valid = runs_to_rows(jnp.array([[5, 0, 9], [2, 2, 2]]), jnp.array([[2, 0, 3], [0, 1, 0]]), 6)
    np.testing.assert_array_equal(np.asarray(valid), [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.where(np.asarray(valid), np.asarray(rows), -1),
                                  [[5, 6, 9, 10, 11, -1], [2, -1, -1, -1, -1, -1]])


def test_device_backend_equals_host(saved):
    path, data = saved
    index = jaxidx.load(path)
    host = _results(index, data.queries, "host")
    assert _results(index, data.queries, "device") == host  # same ids and the same distance bits
    for s in SETTINGS:  # and the same candidate counts
        np.testing.assert_array_equal(index.query(data.queries, index.resolve_setting(s), 10).n_candidates,
                                      index.query(data.queries, index.resolve_setting(s), 10, "device").n_candidates)
    with pytest.raises(ValueError, match="backend"):
        index.search(data.queries, 10, backend="gpu")


def test_device_layout_follows_add_and_remove(saved):
    path, data = saved
    index = jaxidx.load(path).shard()
    new = index.add(data.queries[:7])
    index.remove(np.concatenate([new[:2], np.arange(50)]))
    assert _results(index, data.queries, "device") == _results(index, data.queries, "host")


def test_sharded_layout_splits_every_bucket():
    offsets = np.array([0, 5, 5, 12])
    layout = ShardedLayout(offsets, np.zeros((12, 4), np.float32), np.arange(12) + 100)
    assert layout.local_sizes.sum() == 12 and layout.capacity(2) >= 12


_EIGHT = """
import json, sys, numpy as np, jax, jaxidx
from jaxidx.data import load
from jaxidx.search.sharded import default_mesh
path, spec = sys.argv[1], sys.argv[2]
settings = json.loads(sys.argv[3])
data = load(spec)
index = jaxidx.load(path)
host = {json.dumps(s): [a.tolist() for a in index.search(data.queries, 10, **s)] for s in settings}
out = {}
for n in (1, 8):
    index.shard(default_mesh(jax.devices()[:n]))
    dev = {json.dumps(s): [a.tolist() for a in index.search(data.queries, 10, backend="device", **s)] for s in settings}
    out[n] = {"same": dev == host, "bytes": index._layout.device_bytes()}
print(json.dumps({"devices": jax.device_count(), **{str(k): v for k, v in out.items()}}))
"""


def test_eight_devices_equal_one_and_host(saved):
    path, data = saved
    out = run_python(_EIGHT.replace("sys.argv[1], sys.argv[2]", f"{path!r}, {data.name!r}").replace(
        "sys.argv[3]", repr(json.dumps(SETTINGS))), {"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"})
    assert out["devices"] == 8 and out["1"]["same"] and out["8"]["same"]
    assert out["8"]["bytes"] < out["1"]["bytes"] / 6  # each device holds about 1/8 of the rows


_TWO_PROCESSES = """
import json, sys, numpy as np, jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jaxidx
from jaxidx.data import load
path, spec, settings = sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
data = load(spec)
index = jaxidx.load(path).shard()  # every device of both processes
dev = {json.dumps(s): [a.tolist() for a in index.search(data.queries, 10, backend="device", **s)] for s in settings}
print(json.dumps({"devices": jax.device_count(), "local": jax.local_device_count(), "results": dev}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_serve_one_sharded_index(saved, tmp_path):
    path, data = saved
    addr = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    # Output to files, not pipes: a process blocked on a full pipe would hold the other at its exit barrier.
    logs = [(open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, addr, str(i), path, data.name,
                               json.dumps(SETTINGS)], env=env, cwd=REPO, stdout=out, stderr=err)
             for i, (out, err) in enumerate(logs)]
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in sum(logs, ()):
            f.close()
    for i, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"err{i}").read_text()[-3000:]
    got = [json.loads((tmp_path / f"out{i}").read_text().strip().splitlines()[-1]) for i in range(2)]
    assert all(g["devices"] == 4 and g["local"] == 2 for g in got)
    host = _results(jaxidx.load(path), data.queries, "host")
    assert got[0]["results"] == host and got[1]["results"] == host
