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

LMI_SETTINGS = [{"n_probe": 1}, {"n_probe": 5}, {"n_probe": 5, "max_candidates": 300},
                {"n_probe": 3, "route": "centroids"}]
IRLI_SETTINGS = [{"m": 1, "min_count": 1}, {"m": 4, "min_count": 2}, {"m": 3}]
SPEC = "synthetic-ann:n=3000,q=100,d=13,clusters=30,metric={},seed=4"
CASES = {  # name: (preset, data spec, settings, overrides) of the indexes that shard
    "lmi-euclidean": ("lmi:tiny", SPEC.format("euclidean"), LMI_SETTINGS, {"kmeans__balance": 2.0}),
    "lmi-angular": ("lmi:tiny", SPEC.format("angular"), LMI_SETTINGS, {"kmeans__balance": 2.0}),
    "irli-euclidean": ("irli:tiny", SPEC.format("euclidean"), IRLI_SETTINGS, {"train__epochs": 2}),
    "irli-xmc": ("irli:tiny-xmc", "synthetic-xmc:n=800,test=60,features=300,labels=400,seed=1",
                 [{"m": 2, "min_count": 1}, {"m": 4, "min_count": 2}], {"train__epochs": 2}),
}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """(saved index path, data, settings) of each case, trained once."""
    preset, spec, settings, overrides = CASES[request.param]
    data = load(spec)
    index = jaxidx.fit(preset, data, progress=False, **overrides)
    path = str(tmp_path_factory.mktemp(request.param) / "index")
    index.save(path)
    return path, data, settings


def _queries(data):
    return data.queries if data.task == "ann" else data.X_test


def _results(index, data, settings, backend):
    return {json.dumps(s): [a.tolist() for a in index.search(_queries(data), 10, backend=backend, **s)]
            for s in settings}


def test_runs_to_rows_by_hand():
    import jax.numpy as jnp
    rows, valid = runs_to_rows(jnp.array([[5, 0, 9], [2, 2, 2]]), jnp.array([[2, 0, 3], [0, 1, 0]]), 6)
    np.testing.assert_array_equal(np.asarray(valid), [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.where(np.asarray(valid), np.asarray(rows), -1),
                                  [[5, 6, 9, 10, 11, -1], [2, -1, -1, -1, -1, -1]])


def test_device_backend_equals_host(saved):
    path, data, settings = saved
    index = jaxidx.load(path)
    assert _results(index, data, settings, "device") == _results(index, data, settings, "host")  # ids, score bits
    queries = _queries(data)
    for s in settings:  # and the same candidate counts
        np.testing.assert_array_equal(index.query(queries, index.resolve_setting(s), 10).n_candidates,
                                      index.query(queries, index.resolve_setting(dict(s, backend="device")),
                                                  10).n_candidates)
    with pytest.raises(ValueError, match="backend"):
        index.search(queries, 10, backend="gpu")


def test_device_layout_follows_add_and_remove(saved):
    path, data, settings = saved
    index = jaxidx.load(path)
    if index.task == "xmc":
        pytest.skip("an XMC index holds fixed labels")
    index.shard()
    new = index.add(data.queries[:7])
    index.remove(np.concatenate([new[:2], np.arange(50)]))
    assert _results(index, data, settings, "device") == _results(index, data, settings, "host")


def test_sharded_layout_splits_every_bucket():
    offsets = np.array([0, 5, 5, 12])
    layout = ShardedLayout(offsets, np.zeros((12, 4), np.float32), np.arange(12) + 100)
    assert layout.local_sizes.sum() == 12 and layout.capacity(2) >= 12


_EIGHT = """
import json, numpy as np, jax, jaxidx
from jaxidx.data import load
from jaxidx.search.sharded import default_mesh
path, spec, settings = PATH, SPEC, json.loads(SETTINGS)
data = load(spec)
queries = data.queries if data.task == "ann" else data.X_test
index = jaxidx.load(path)
run = lambda backend: {json.dumps(s): [a.tolist() for a in index.search(queries, 10, backend=backend, **s)]
                       for s in settings}
host, out = run("host"), {}
for n in (1, 8):
    index.shard(default_mesh(jax.devices()[:n]))
    part = getattr(index, "_layout", None) or index._partition
    out[n] = {"same": run("device") == host, "bytes": part.device_bytes()}
print(json.dumps({"devices": jax.device_count(), **{str(k): v for k, v in out.items()}}))
"""


def test_eight_devices_equal_one_and_host(saved):
    path, data, settings = saved
    code = _EIGHT.replace("PATH, SPEC, json.loads(SETTINGS)", f"{path!r}, {data.name!r}, json.loads({json.dumps(settings)!r})")
    out = run_python(code, {"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"})
    assert out["devices"] == 8 and out["1"]["same"] and out["8"]["same"]
    assert out["8"]["bytes"] < out["1"]["bytes"] / 4  # each device holds about 1/8 of the items


_TWO_PROCESSES = """
import json, sys, numpy as np, jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jaxidx
from jaxidx.data import load
path, spec, settings = sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
data = load(spec)
queries = data.queries if data.task == "ann" else data.X_test
index = jaxidx.load(path).shard()  # every device of both processes
dev = {json.dumps(s): [a.tolist() for a in index.search(queries, 10, backend="device", **s)] for s in settings}
print(json.dumps({"devices": jax.device_count(), "local": jax.local_device_count(), "results": dev}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_serve_one_sharded_index(saved, tmp_path):
    path, data, settings = saved
    addr = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    # Output to files, not pipes: a process blocked on a full pipe would hold the other at its exit barrier.
    logs = [(open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, addr, str(i), path, data.name,
                               json.dumps(settings)], env=env, cwd=REPO, stdout=out, stderr=err)
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
    host = _results(jaxidx.load(path), data, settings, "host")
    assert got[0]["results"] == host and got[1]["results"] == host


def test_irli_mach_and_elias_device_backend():
    """mode='mach' runs on the device either way; ELIAS's device path is its jitted merge (one device)."""
    data = load(CASES["irli-xmc"][1])
    index = jaxidx.fit("irli:tiny-xmc", data, progress=False, train__epochs=2)
    a, b = (index.search(data.X_test, 10, mode="mach", backend=be) for be in ("host", "device"))
    np.testing.assert_array_equal(a[0], b[0])
    elias = jaxidx.fit("elias:tiny", data, progress=False)
    a, b = (elias.search(data.X_test, 10, backend=be) for be in ("host", "device"))
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(NotImplementedError, match="sharded layout"):
        elias.shard()


def test_gpu_bench_runs_on_cpu(tmp_path):
    """launch/gpu_bench.sh --cpu: the GPU benchmark's code on small data, so it cannot rot unnoticed."""
    out = tmp_path / "bench_device.json"
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_bench.sh"), "--cpu", f"--out={out}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    methods = {r["method"].split(" ")[0] for r in res["rows"]}
    assert {"lmi", "irli"} <= methods and {r["batch"] for r in res["rows"]} == {50, 200}
    assert all(res["training"][m]["examples_per_second"] > 0 for m in ("lmi", "irli"))
    assert "at recall@10 >= 0.90" in proc.stdout
