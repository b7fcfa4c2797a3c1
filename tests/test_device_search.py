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
XMC_SPEC = "synthetic-xmc:n=800,test=60,features=300,labels=400,seed=1"
CASES = {  # name: (preset, data spec, settings, overrides) of the indexes that shard
    "lmi-euclidean": ("lmi:tiny", SPEC.format("euclidean"), LMI_SETTINGS, {"kmeans__balance": 2.0}),
    "lmi-angular": ("lmi:tiny", SPEC.format("angular"), LMI_SETTINGS, {"kmeans__balance": 2.0}),
    "irli-euclidean": ("irli:tiny", SPEC.format("euclidean"), IRLI_SETTINGS, {"train__epochs": 2}),
    "irli-xmc": ("irli:tiny-xmc", XMC_SPEC, [{"m": 2, "min_count": 1}, {"m": 4, "min_count": 2}], {"train__epochs": 2}),
    "elias": ("elias:tiny", XMC_SPEC, [{}, {"beam": 2, "shortlist": 5}, {"beam": 8, "shortlist": 100}], {}),
}


@pytest.fixture(scope="module")
def all_saved(tmp_path_factory):
    """{case: (saved index path, data, settings)}, each trained once for the module."""
    out = {}
    for name, (preset, spec, settings, overrides) in CASES.items():
        data = load(spec)
        path = str(tmp_path_factory.mktemp(name) / "index")
        jaxidx.fit(preset, data, progress=False, **overrides).save(path)
        out[name] = (path, data, settings)
    return out


@pytest.fixture(params=list(CASES))
def saved(request, all_saved):
    return all_saved[request.param]


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


def test_irli_first_repetitions_on_the_device_equal_host(all_saved):
    """A setting's reps (the first repetitions' networks and buckets) on the device, ANN and XMC."""
    for name, setting in (("irli-euclidean", {"m": 3, "reps": 1}), ("irli-xmc", {"m": 4, "min_count": 2, "reps": 2})):
        path, data, _ = all_saved[name]
        index = jaxidx.load(path)
        assert _results(index, data, [setting], "device") == _results(index, data, [setting], "host")


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


_CASES_SCRIPT = """
import json, sys, jax
PRELUDE
import jaxidx
from jaxidx.data import load
from jaxidx.search.sharded import default_mesh
out = {}
for name, (path, spec, settings) in json.loads(sys.argv[-1]).items():
    data = load(spec)
    queries = data.queries if data.task == "ann" else data.X_test
    index = jaxidx.load(path)
    run = lambda backend: {json.dumps(s): [a.tolist() for a in index.search(queries, 10, backend=backend, **s)]
                           for s in settings}
    out[name] = {}
    for n in COUNTS:
        index.shard(default_mesh(jax.devices()[:n]))
        out[name][str(n)] = {"results": run("device"), "bytes": index.device_bytes()}
print(json.dumps({"devices": jax.device_count(), "local": jax.local_device_count(), "cases": out}))
"""


def _cases_arg(all_saved) -> str:
    return json.dumps({name: (path, data.name, settings) for name, (path, data, settings) in all_saved.items()})


def _host(all_saved) -> dict:
    return {name: _results(jaxidx.load(path), data, settings, "host") for name, (path, data, settings) in
            all_saved.items()}


def test_eight_devices_equal_one_and_host(all_saved):
    """Every sharded index on 1 and 8 simulated devices: the host's results; memory per device about 1/8."""
    code = _CASES_SCRIPT.replace("PRELUDE", "").replace("COUNTS", "(1, 8)")
    out = run_python(code.replace("sys.argv[-1]", repr(_cases_arg(all_saved))),
                     {"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert out["devices"] == 8
    for name, host in _host(all_saved).items():
        got = out["cases"][name]
        assert got["1"]["results"] == host and got["8"]["results"] == host, name
        assert got["8"]["bytes"] < got["1"]["bytes"] / 4, name  # each device holds about 1/8 of the items


_ADD_SCRIPT = """
import json, sys, jax, numpy as np
import jaxidx
from jaxidx.data import load
from jaxidx.search.sharded import default_mesh
out = {}
for name, (path, spec, settings) in json.loads(sys.argv[-1]).items():
    data = load(spec)
    host, index = jaxidx.load(path), jaxidx.load(path).shard(default_mesh())
    sh = index._sharded
    ptrs = lambda: {s.device.id: s.data.unsafe_buffer_pointer() for s in sh.arrays["ids"].addressable_shards}
    run = lambda ix, backend="device": {json.dumps(s): [a.tolist() for a in ix.search(data.queries, 10, backend=backend,
                                                                                        **s)] for s in settings}
    steps = []
    for op, arg in [("add", 9), ("remove", "mixed"), ("add", len(data.base))]:  # the last outgrows the headroom
        before = ptrs()
        if op == "add":
            new = host.add(data.queries[:arg])
            assert (index.add(data.queries[:arg]) == new).all()
        else:
            gone = np.concatenate([new[:3], np.arange(0, 400, 101)])
            host.remove(gone)
            index.remove(gone)
        after = ptrs()
        steps.append({"op": op, "rebuilt": sorted(sh.rebuilt), "moved": sorted(d for d in after if after[d] != before[d]),
                      "equal": run(index) == run(host, "host")})
    index.save(path + "-updated")  # the sharded index saved after its updates, restored on 3 devices
    back = jaxidx.load(path + "-updated").shard(default_mesh(jax.devices()[:3]))
    out[name] = {"steps": steps, "restored": run(back) == run(host, "host")}
print(json.dumps(out))
"""


def test_add_and_remove_rebuild_only_the_shards_they_touch(all_saved):
    """On 8 devices: an add goes to one shard (the least filled) and leaves the others' device buffers as
    they were; a remove rebuilds only the shards holding the removed items; an add beyond a shard's
    headroom re-allocates every shard. After each, the device results are the host index's, and so are
    those of the updated index saved and sharded again on 3 devices."""
    cases = {name: (path, data.name, settings) for name, (path, data, settings) in all_saved.items()
             if data.task == "ann"}
    out = run_python(_ADD_SCRIPT.replace("sys.argv[-1]", repr(json.dumps(cases))),
                     {"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert set(out) == {"lmi-euclidean", "lmi-angular", "irli-euclidean"}
    for name, got in out.items():
        (add, remove, grow), restored = got["steps"], got["restored"]
        assert restored, name
        assert add["equal"] and remove["equal"] and grow["equal"], name
        assert len(add["rebuilt"]) == 1 and len(add["moved"]) == 1, (name, add)
        assert 1 < len(remove["rebuilt"]) < 8 and len(remove["moved"]) == len(remove["rebuilt"]), (name, remove)
        assert add["rebuilt"][0] in remove["rebuilt"], name  # three of the added items were removed
        assert grow["rebuilt"] == list(range(8)) and len(grow["moved"]) == 8, (name, grow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_serve_one_sharded_index(all_saved, tmp_path):
    """Two processes (2 devices each, gloo collectives) shard every index over all 4 devices and return
    the host's results in both processes."""
    addr = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    code = _CASES_SCRIPT.replace("PRELUDE", "jax.distributed.initialize(coordinator_address=sys.argv[1], "
                                            "num_processes=2, process_id=int(sys.argv[2]))").replace("COUNTS", "(4,)")
    # Output to files, not pipes: a process blocked on a full pipe would hold the other at its exit barrier.
    logs = [(open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", code, addr, str(i), _cases_arg(all_saved)], env=env, cwd=REPO,
                              stdout=out, stderr=err) for i, (out, err) in enumerate(logs)]
    try:
        for p in procs:
            p.wait(timeout=600)
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
    for name, host in _host(all_saved).items():
        assert got[0]["cases"][name]["4"]["results"] == host == got[1]["cases"][name]["4"]["results"], name


def test_irli_mach_runs_on_the_device_on_either_backend():
    data = load(XMC_SPEC)
    index = jaxidx.fit("irli:tiny-xmc", data, progress=False, train__epochs=2)
    a, b = (index.search(data.X_test, 10, mode="mach", backend=be) for be in ("host", "device"))
    np.testing.assert_array_equal(a[0], b[0])


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
