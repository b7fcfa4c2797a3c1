"""Benchmarks of the index layer: opening a trained index, and searching after `add`.

    python3 launch/bench_index.py load --workdir=runs/lmi-glove --workdir=runs/elias-dd \
        --out=benchmarks/bench_load.json
    python3 launch/bench_index.py add --workdir=runs/lmi-glove --fraction=0.1 --threads=1 --out=benchmarks/bench_add.json

`load`: per run, three ways to get a searchable index, each in a fresh process (so its peak RSS is its
own), all checked to return the same ids on the same queries:
  restore     the path before `jaxidx.load` (re-enacted with today's pieces): load the data set, build
              the method, run its init (LMI: the k-means tree; ELIAS: PIFA clustering), restore the whole
              train state (parameters and both Adam moments), build the index;
  load run    `jaxidx.load(run_dir)`: parameters and aux only, no data, no init;
  load saved  `jaxidx.load(saved_dir)` of `Index.save`.
and the bytes on disk of the saved index beside the checkpoint step it came from.

`add`: the run's preset trained on the first (1 - fraction) of its base vectors, then the rest added with
`Index.add`; searched beside the run's own index (built on all of them) at the same settings, one core.
"""
import sys

from jaxidx.bench import pin_threads_from_argv

if __name__ == "__main__":  # pin before jax starts its thread pools
    pin_threads_from_argv(default=0)

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from jaxidx import bench, cli  # noqa: E402
from jaxidx.evaluate import format_results  # noqa: E402

flags.DEFINE_multi_string("workdir", [], "Training run directories.")
flags.DEFINE_integer("threads", 0, "Pin to this many cores (0 = all).")
flags.DEFINE_float("fraction", 0.1, "add: the share of the base vectors added after training.")
flags.DEFINE_integer("queries", 200, "load: test queries searched to check the three paths agree.")
flags.DEFINE_string("out", "out/bench_index.json", "JSON result path.")
flags.DEFINE_string("job", None, "(internal) run one load job and print its JSON.")
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def restore_previous_way(workdir: str):
    """The restore path before the index layer: data, method and init, the whole train state, the index."""
    import jax
    import ml_collections
    from jaxidx.api import run_checkpoint_dir
    from jaxidx.runner import build
    from jaxidx.train import checkpoint as ckpt_lib
    from jaxidx.train import state as state_lib
    ckpt_dir = run_checkpoint_dir(workdir)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    _, meta = ckpt.read_meta()
    config = ml_collections.ConfigDict(meta["config"])
    method, data, mesh = build(config)
    task = method.stage(os.path.basename(ckpt_dir)) if getattr(method, "stages", ()) else method
    params, aux = task.init(jax.random.key(config.seed))
    shapes = jax.eval_shape(lambda p: state_lib.create(p, task.optimizer(1)), params)
    del params
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                          state_lib.state_shardings(shapes, mesh, task.leaf_spec))
    _, restored, _ = ckpt.restore({"state": target, "aux": aux})
    ckpt.close()
    aux = {k: np.asarray(v) for k, v in restored["aux"].items()}
    return task.index(jax.device_get(restored["state"].params), aux)


def load_job(spec: dict) -> dict:
    """One way of opening an index, timed, then a search of the saved queries (ids returned to compare)."""
    import jaxidx
    t0 = time.perf_counter()
    if spec["how"] == "restore":
        index = restore_previous_way(spec["path"])
    else:
        index = jaxidx.load(spec["path"])
    seconds = time.perf_counter() - t0
    rss = _rss_mb()
    queries = np.load(spec["queries"], allow_pickle=False) if spec["queries"].endswith(".npy") else \
        __import__("scipy.sparse", fromlist=["load_npz"]).load_npz(spec["queries"])
    ids, _ = index.search(queries, k=10)
    return {"seconds": seconds, "peak_rss_mb": rss, "ids": ids.tolist()}


def imports_job(_spec: dict) -> dict:
    """The floor every job shares: Python with jaxidx, JAX and orbax imported."""
    import jaxidx.api  # noqa: F401
    import jaxidx.methods.elias  # noqa: F401
    import jaxidx.methods.irli  # noqa: F401
    import jaxidx.methods.lmi  # noqa: F401
    return {"seconds": 0.0, "peak_rss_mb": _rss_mb(), "ids": []}


def _run_job(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, f"--job={json.dumps(spec)}"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO))
    if out.returncode:
        raise RuntimeError(f"job {spec['how']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_part(tmp: str) -> list[dict]:
    import jaxidx
    from jaxidx.api import run_checkpoint_dir
    from jaxidx.data import load
    rows = []
    floor = _run_job({"how": "imports"})
    for wd in FLAGS.workdir:
        index = jaxidx.load(wd)
        saved = os.path.join(tmp, os.path.basename(os.path.normpath(wd)) + ".index")
        index.save(saved)
        data = load(index.config.data)
        if data.task == "ann":
            qpath = os.path.join(tmp, "q.npy")
            np.save(qpath, data.queries[:FLAGS.queries])
        else:
            import scipy.sparse as sp
            qpath = os.path.join(tmp, "q.npz")
            sp.save_npz(qpath, data.X_test[:FLAGS.queries])
        del data, index
        ckpt_dir = run_checkpoint_dir(wd)
        steps = sorted(int(s) for s in os.listdir(os.path.join(ckpt_dir, "checkpoints")) if s.isdigit())
        step_bytes = _dir_bytes(os.path.join(ckpt_dir, "checkpoints", str(steps[-1])))
        results = {how: _run_job({"how": how, "path": saved if how == "load saved" else wd, "queries": qpath})
                   for how in ("restore", "load run", "load saved")}
        same = all(r["ids"] == results["restore"]["ids"] for r in results.values())
        base = results["restore"]
        for how, r in results.items():
            rows.append({"run": wd, "how": how, "seconds": round(r["seconds"], 2),
                         "peak_rss_mb": round(r["peak_rss_mb"]),
                         "rss_above_imports_mb": round(r["peak_rss_mb"] - floor["peak_rss_mb"]),
                         "time_vs_restore": round(r["seconds"] / base["seconds"], 3),
                         "rss_above_imports_vs_restore": round((r["peak_rss_mb"] - floor["peak_rss_mb"])
                                                               / max(base["peak_rss_mb"] - floor["peak_rss_mb"], 1), 3),
                         "same_ids": same,
                         "disk_mb": round((_dir_bytes(saved) if how == "load saved" else step_bytes) / 2**20, 1)})
        print(format_results(rows[-3:]), flush=True)
    return rows, floor["peak_rss_mb"]


def add_part() -> list[dict]:
    import jaxidx
    from jaxidx.config import apply_overrides
    from jaxidx.data import load
    from jaxidx.evaluate import evaluate
    wd = FLAGS.workdir[0]
    fresh = jaxidx.load(wd)
    data = load(fresh.config.data)
    n = len(data.base)
    n_old = n - int(round(FLAGS.fraction * n))
    config = fresh.config
    t0 = time.perf_counter()
    grown = jaxidx.fit(config, data.base[:n_old], metric={"dot": "ip"}.get(data.metric, data.metric),
                       progress=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = grown.add(data.base[n_old:])
    add_s = time.perf_counter() - t0
    assert (ids == np.arange(n_old, n)).all()
    rows = []
    for name, index in (("fresh build", fresh), (f"trained on {n_old}, +{n - n_old} added", grown)):
        apply_overrides(index.config, {"search.n_threads": FLAGS.threads or 0})
        for r in evaluate(index, data, index.config.search.settings, warm=True):
            rows.append({"index": name, **r})
    for a, b in zip(rows[:len(rows) // 2], rows[len(rows) // 2:]):
        b["qps_vs_fresh"] = round(b["queries_per_second"] / a["queries_per_second"], 3)
        b["recall_minus_fresh"] = round(b["recall@10"] - a["recall@10"], 4)
    print(format_results(rows))
    return rows, {"train_seconds": train_s, "add_seconds": add_s, "n_trained": n_old, "n_added": n - n_old,
                  "leaf_stats_fresh": fresh.stats()["bucket_sizes"], "leaf_stats_added": grown.stats()["bucket_sizes"]}


def main(argv):
    if FLAGS.job:
        spec = json.loads(FLAGS.job)
        print(json.dumps((imports_job if spec["how"] == "imports" else load_job)(spec)))
        return 0
    what = argv[1] if len(argv) > 1 else "load"
    cli.init_runtime()
    if not FLAGS.workdir:
        raise ValueError("--workdir: at least one training run directory is needed")
    out = {"machine": bench.machine(), "command": bench.command(), "what": what}
    if what == "load":
        tmp = tempfile.mkdtemp(prefix="bench-index-")
        try:
            out["rows"], out["imports_rss_mb"] = load_part(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif what == "add":
        out["rows"], out["info"] = add_part()
    else:
        raise ValueError(f"unknown benchmark {what!r}; valid: load, add")
    bench.write_json(FLAGS.out, out)
    print(f"results: {FLAGS.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
