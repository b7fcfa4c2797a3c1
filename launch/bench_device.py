"""Device benchmark: search with backend='device' (recall@10 vs queries/s at several batch sizes) beside
faiss IVF-Flat on the same device kind (faiss-GPU where it is installed and a GPU is present, else
faiss-cpu, labelled), training examples/s and MFU of each method for a fixed number of epochs, and peak
device memory; one table, written to --out (JSON).

    bash launch/gpu_bench.sh                  # one NVIDIA GPU: installs jax[cuda12] and faiss-gpu, GloVe
    bash launch/gpu_bench.sh --cpu            # the same code on CPU on small synthetic data (CI)
    python3 launch/bench_device.py --data=glove-6b-50d --batch_sizes=1000,10000
"""
import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import flags, logging

import jaxidx
from jaxidx import bench, cli
from jaxidx.data import load
from jaxidx.evaluate import format_results
from jaxidx.data.types import benchmark_distance
from jaxidx.search.sharded import default_mesh
from jaxidx.train.metrics_log import read_metrics

flags.DEFINE_string("data", "glove-6b-50d", "ANN data spec searched and trained on.")
flags.DEFINE_bool("cpu", False, "Small synthetic data and batches: checks the script on a CPU in under a minute.")
flags.DEFINE_list("methods", ["lmi", "irli"], "Methods (auto presets) trained and searched on the device.")
flags.DEFINE_list("batch_sizes", ["1000", "10000"], "Queries per device call.")
flags.DEFINE_integer("epochs", 0, "Training epochs of every method (0 = the auto preset's).")
flags.DEFINE_integer("max_settings", 0, "Search only the first N settings of each index (0 = all).")
flags.DEFINE_bool("host", True, "Also search each index with backend='host' (the C++ kernels, every core).")
flags.DEFINE_list("shards", ["1"], "Device counts to shard each index over (the first N devices; on CPU simulate "
                  "them with JAX_NUM_CPU_DEVICES): bytes per device and results beside one device.")
flags.DEFINE_string("out", "benchmarks/bench_device.json", "JSON result path.")
FLAGS = flags.FLAGS

CPU_DATA = "synthetic-ann:n=4000,q=200,d=16,clusters=40,seed=0"


def train_figures(workdir: str) -> dict:
    """Median training examples/s, step time and MFU (where the device's peak is known) of a run."""
    rows = [r for r in read_metrics(workdir) if "train/examples_per_second" in r][1:]  # the first includes compiling
    med = lambda key: float(np.median([r[key] for r in rows if key in r])) if any(key in r for r in rows) else None  # noqa: E731
    return {"examples_per_second": med("train/examples_per_second"), "step_ms": med("train/step_ms"),
            "mfu": med("train/mfu")}


def search_rows(index, data, batch: int, max_settings: int = 0, backend: str = "device") -> list[dict]:
    """The index's float-row search settings (the first `max_settings`, 0 = all; those with `reorder` scan
    PQ codes, a host-only path) on `backend` with `batch` queries per call: recall@10 and queries/s."""
    rows = []
    index.config.search.query_batch = batch
    float_rows = [s for s in index.config.search.settings if not s.get("reorder")]
    for setting in float_rows[:max_settings or None]:
        setting = dict(setting, backend=backend)
        index.query(data.queries[:batch], setting, 10)  # compile for this block shape
        t0 = time.perf_counter()
        res = index.query(data.queries, setting, 10)
        sec = time.perf_counter() - t0
        dist = np.where(res.ids >= 0, benchmark_distance(res.scores, data.metric), np.inf)
        rows.append(dict(bench.ann_row(f"{index.method} (B {index.stats()['n_buckets']})" + ("" if backend == "device"
                                                                                          else f" {backend}"),
                                       {k: v for k, v in setting.items() if k != "backend"}, res.ids, dist,
                                       float(res.n_candidates.mean()), sec, data), batch=batch))
    return rows


def faiss_rows(data, nlist: int, batch: int) -> list[dict]:
    """faiss IVF-Flat with nlist lists on the GPU (faiss-gpu and a GPU present), else on every CPU core."""
    try:
        import faiss
    except ImportError:
        print("faiss not installed: no peer row")
        return []
    ip = data.kernel_metric == "ip"
    quantizer = faiss.IndexFlatIP(data.dim) if ip else faiss.IndexFlatL2(data.dim)
    index = faiss.IndexIVFFlat(quantizer, data.dim, nlist, faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
    index.train(data.base)
    index.add(data.base)
    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    name = f"faiss-{'gpu' if gpu else 'cpu'}-ivf-flat (nlist {nlist})"
    if gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    rows = []
    for nprobe in [p for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= min(nlist, 2048 if gpu else nlist)]:
        index.nprobe = nprobe
        index.search(data.queries[:batch], 10)
        t0 = time.perf_counter()
        out = [index.search(data.queries[i:i + batch], 10) for i in range(0, len(data.queries), batch)]
        sec = time.perf_counter() - t0
        score, ids = np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])
        dist = benchmark_distance(-score if ip else score, data.metric)
        rows.append(dict(bench.ann_row(name, {"nprobe": nprobe}, ids, dist, None, sec, data), batch=batch))
    return rows


def update_row(index, data, n_dev: int) -> dict:
    """On the largest device count: seconds of re-placing the whole index on its shards beside an add of
    1% more vectors (host placement included; they go to the least filled shard) and their removal,
    and how many shards each rebuilt."""
    t0 = time.perf_counter()
    index.shard(index._sharded.mesh)
    jax.block_until_ready(index._sharded.arrays)
    row = {"method": index.method, "devices": n_dev, "reshard_seconds": time.perf_counter() - t0}
    new = data.base[:max(1, len(data.base) // 100)]
    for op, arg in (("add", new), ("remove", None)):
        t0 = time.perf_counter()
        ids = index.add(arg) if op == "add" else index.remove(ids)
        jax.block_until_ready(index._sharded.arrays)
        row.update({f"{op}_seconds": time.perf_counter() - t0, f"{op}_shards_rebuilt": len(index._sharded.rebuilt)})
    return dict(row, n_added=len(new))


def peak_memory() -> dict:
    """Peak bytes in use on each local device, where the backend reports it (GPUs do; CPUs do not)."""
    out = {}
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            out[str(d)] = int(stats["peak_bytes_in_use"])
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    spec = CPU_DATA if FLAGS.cpu else FLAGS.data
    batches = [50, 200] if FLAGS.cpu else [int(b) for b in FLAGS.batch_sizes]
    epochs = FLAGS.epochs or (1 if FLAGS.cpu else 0)
    max_settings = FLAGS.max_settings or (3 if FLAGS.cpu else 0)
    data = load(spec)
    rows, training, updates, nlist = [], {}, [], None
    with tempfile.TemporaryDirectory() as tmp:
        for method in FLAGS.methods:
            wd = os.path.join(tmp, method)
            overrides = {"train__epochs": epochs} if epochs else {}
            t0 = time.perf_counter()
            index = jaxidx.fit(method, data, workdir=wd, progress=False, **overrides)
            training[method] = {"build_seconds": time.perf_counter() - t0, **train_figures(wd)}
            nlist = nlist or index.stats()["n_buckets"]
            if FLAGS.host:
                index.config.search.n_threads = 0  # every core, as the device backend may use
                rows += [dict(r, devices=0) for b in batches for r in search_rows(index, data, b, max_settings, "host")]
            for n_dev in [int(n) for n in FLAGS.shards]:
                index.shard(default_mesh(jax.devices()[:n_dev]))
                for batch in batches:
                    rows += [dict(r, devices=n_dev, bytes_per_device=index.device_bytes())
                             for r in search_rows(index, data, batch, max_settings)]
            updates.append(update_row(index, data, n_dev))
    for batch in batches:
        rows += faiss_rows(data, nlist, batch)
    for r in rows:  # one method name per device count, so the summary keeps them apart
        r["method"] += f" x{r['devices']} dev" if r.get("devices", 1) > 1 else ""
    summary = [dict(bench.best_at([r for r in rows if r["batch"] == b], m, 0.90), batch=b)
               for b in batches for m in dict.fromkeys(r["method"] for r in rows if r["batch"] == b)]
    out = {"machine": bench.machine(), "command": bench.command(), "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()], "data": data.name, "n_queries": int(len(data.queries)),
           "training": training, "updates": updates, "peak_memory_bytes": peak_memory(), "rows": rows, "at_recall_0.90": summary}
    bench.write_json(FLAGS.out, out)
    print(out["machine"], "| backend", out["backend"], "|", len(out["devices"]), "device(s)")
    print(format_results([{"method": r["method"], "batch": r["batch"], **r["setting"],
                           **{k: r.get(k) for k in ("recall@10", "candidates_per_query", "queries_per_second",
                                                    "bytes_per_device")}} for r in rows]))
    print("\nat recall@10 >= 0.90:")
    print(format_results(summary))
    print("\nadd / remove on the sharded index (1% of the base) beside re-placing every shard:")
    print(format_results(updates))
    print("\ntraining:", json.dumps(training))
    print("peak device memory:", out["peak_memory_bytes"] or "not reported by this backend")
    print(f"results: {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
