"""Scaling study: how cost grows with labels (XMC), base size (ANN) and devices.

    python launch/bench_scaling.py --out=benchmarks/scaling.json          # the full study, under an hour on 2 cores
    python launch/bench_scaling.py --small --out=out/scaling_small.json   # every measurement at sizes of seconds

XMC: IRLI and ELIAS (`scaling_xmc` presets in configs/) on `scaling_xmc_spec(L)` (power-law labels, L / 20
training examples, 10K features) for each L, trained for a fixed budget of about --steps steps per stage;
ELIAS also without its cluster cap (C = L / 100) at --elias_uncapped, untrained (per-query cost only), with the
flat cluster classifier; trained with a two-level cluster tree and no cap (C = L / 100) at --elias_tree (P@1 and
cost beside the flat classifier); and with dense AdamW over all label rows (its path before lazy label rows)
at --elias_dense_labels.
ANN: LMI and IRLI (`scaling_ann` presets) on GloVe (`scaling_ann_spec(N)`, noisy copies beyond 390K) beside
faiss IVF-Flat (nlist = the learned index's bucket count), hnswlib and brute force. Devices: the `tiny`
presets trained on 1, 2, 4, 8 simulated CPU devices (`JAX_NUM_CPU_DEVICES`), losses and parameters compared.

Every training run and every search is a fresh subprocess, so its peak host memory is its ru_maxrss:
training and index builds on all cores, searches pinned to one core (queries/s: all test queries in one
call; latency: one query at a time). Prints markdown tables and writes --out (JSON; the results of parts
not run keep their place, so a part can be re-run alone) and the plots beside it (`<out>_xmc.png`,
`_ann.png`, `_devices.png`).
"""
from jaxidx.bench import pin_threads_from_argv

if __name__ == "__main__":  # search workers get --threads=1 and pin before jax starts; the driver does not
    pin_threads_from_argv(default=0)

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

from jaxidx import bench, cli  # noqa: E402
from jaxidx.evaluate import format_results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = {"xmc_labels": [10**4, 10**5, 10**6], "ann_sizes": [100000, 390000, 1000000, 4000000], "devices": [1, 2, 4, 8],
        "xmc_methods": ["irli", "elias"], "ann_methods": ["lmi", "irli"], "device_methods": ["irli", "lmi", "elias"],
        "steps": 128, "lmi_examples": 2 * 10**6, "irli_ann_epochs": 8, "device_epochs": 2, "xmc_test": 1000,
        "ann_queries": 1000, "candidates": 4000, "latency_queries": 200, "device_data": {}, "elias_uncapped": None,
        "elias_dense_labels": None, "elias_tree": None,
        "irli_ann_max": 1000000, "hnsw_budget": 300.0, "hnsw_ef": 40, "workdir": "runs/scaling"}
SMALL = dict(FULL, xmc_labels=[1000, 3000], ann_sizes=[2000, 6000], steps=1, lmi_examples=2000, irli_ann_epochs=2,
             device_epochs=1, xmc_test=100, ann_queries=100, candidates=1000, latency_queries=20,
             device_data={"irli": "synthetic-ann:n=512,q=50,d=16,clusters=8,seed=0",
                          "lmi": "synthetic-ann:n=512,q=50,d=16,clusters=8,seed=0",
                          "elias": "synthetic-xmc:n=512,test=50,features=300,labels=100,seed=0"})

flags.DEFINE_list("parts", ["xmc", "ann", "devices"], "Parts to run: xmc, ann, devices.")
flags.DEFINE_bool("small", False, "Sizes and budgets of seconds (what the tests run).")
flags.DEFINE_list("xmc_labels", None, "XMC label counts L (default 10K, 100K, 1M; --small: 1K, 3K).")
flags.DEFINE_list("ann_sizes", None, "ANN base sizes N (default 100K, 390K, 1M, 4M; --small: 2K, 6K).")
flags.DEFINE_list("devices", None, "Simulated CPU device counts (default 1, 2, 4, 8).")
flags.DEFINE_list("xmc_methods", None, "XMC methods (default irli, elias).")
flags.DEFINE_list("ann_methods", None, "Learned ANN methods (default lmi, irli).")
flags.DEFINE_list("device_methods", None, "Methods of the devices part (default irli, lmi, elias).")
flags.DEFINE_integer("steps", None, "XMC budget: about this many steps of 256 per stage, in whole epochs (128).")
flags.DEFINE_integer("lmi_examples", None, "LMI training budget in the ANN part: max(1, round(this / N)) epochs "
                     "(2M).")
flags.DEFINE_integer("irli_ann_epochs", None, "IRLI training epochs in the ANN part (8, on a 50K sample, "
                     "re-partitioned halfway).")
flags.DEFINE_list("elias_uncapped", None, "L at which ELIAS also runs with C = L / 100, untrained, for its per-query "
                  "cost (default: the largest L, if the cluster cap changes its C).")
flags.DEFINE_list("elias_tree", None, "L at which ELIAS also trains with a two-level cluster tree and C = L / 100 "
                  "(no cap: the tree routes them; default: the largest L).")
flags.DEFINE_list("elias_dense_labels", None, "L at which ELIAS also trains with train.label_optimizer 'dense' "
                  "(AdamW over all L label rows every step) beside the lazy rows of its sparse layout, for the "
                  "step-time comparison (default: the largest L).")
flags.DEFINE_integer("irli_ann_max", None, "Largest N IRLI is trained on in the ANN part (1M; see the skip "
                     "reason in BENCHMARKS.md).")
flags.DEFINE_float("hnsw_budget", None, "Skip hnswlib where its build, estimated from the last measured rate, "
                   "would take longer than this many seconds (300).")
flags.DEFINE_integer("xmc_test", None, "XMC test queries per data set (1000; --small: 100); the data's label "
                     "prototypes are drawn after its rows, so another count is other data of the same law.")
flags.DEFINE_integer("candidates", None, "ANN: recall@10 and queries/s compared at this many candidates per query "
                     "(4000; --small: 1000).")
flags.DEFINE_integer("hnsw_ef", None, "ANN: the hnswlib setting in the summary table (40).")
flags.DEFINE_string("workdir", None, "Scratch directory for the runs, each replacing its own (runs/scaling).")
flags.DEFINE_string("out", "benchmarks/scaling.json", "JSON result path; the PNGs go beside it.")
flags.DEFINE_string("worker", None, "Internal: run one measurement (a JSON job) and print its JSON result.")
flags.DEFINE_integer("threads", 0, "Internal: cores a worker is pinned to (search workers: 1).")
FLAGS = flags.FLAGS
_FLAG_KEYS = ("xmc_labels", "ann_sizes", "devices", "xmc_methods", "ann_methods", "device_methods", "steps",
              "lmi_examples", "irli_ann_epochs", "elias_uncapped", "elias_dense_labels", "elias_tree", "irli_ann_max",
              "hnsw_budget",
              "candidates", "xmc_test", "hnsw_ef", "workdir")


# --- workers (each runs in its own process) ------------------------------------------------------------

def _preset(method: str):
    """The presets module of a method (`jaxidx.configs.<method>`), for its scaling presets."""
    from jaxidx.config import preset_module
    return preset_module(method)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _device_peak_mb():
    """Peak device memory where the backend reports it (GPU, TPU); None on CPU."""
    import jax
    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def _arrays(tree, prefix: str) -> dict:
    """{path: (elements, bytes)} of the arrays (or shape structs) in a pytree."""
    import jax
    return {prefix + jax.tree_util.keystr(path): (int(np.prod(x.shape, dtype=np.int64)),
                                                  int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


def train_job(job: dict) -> dict:
    """Train one scaling preset from scratch in job['workdir']: timings per stage, the arrays of the trained
    state (params, Adam moments, aux) and peak memory."""
    import jax
    from jaxidx.data import load
    from jaxidx.runner import build
    from jaxidx.train.loop import fit, stage_dir
    mod = _preset(job["method"])
    if job["part"] == "xmc":
        extra = {k: job[k] for k in ("max_clusters", "tree") if k in job}
        config = mod.scaling_xmc(job["size"], steps=job["steps"], n_test=job["queries"], **extra)
        if "label_optimizer" in job:
            config.train.label_optimizer = job["label_optimizer"]
    else:
        config = mod.scaling_ann(job["size"], n_queries=job["queries"], **job["budget"])
    config.lock()
    wd = job["workdir"]
    shutil.rmtree(wd, ignore_errors=True)
    t0 = time.perf_counter()
    data = load(config.data)
    out = {"data": config.data, "data_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    method, data, mesh = build(config, data)
    stages, result = {}, None
    for name in getattr(method, "stages", ()) or (None,):
        task = method if name is None else method.stage(name, result)
        result = fit(task, config, wd if name is None else stage_dir(wd, name), mesh,
                     data_fingerprint=data.fingerprint(), progress=False, epochs=getattr(task, "epochs", None))
        stages[name or "train"] = dict(result.phases, epochs=result.epoch, steps=result.step,
                                       train_s=result.train_seconds)
    arrays = {**_arrays(result.params, "params"), **_arrays(result.aux, "aux"),
              **_arrays(jax.eval_shape(task.optimizer(1).init, result.params), "opt")}
    out.update(build_s=time.perf_counter() - t0, stages=stages, train_rss_mb=_max_rss_mb(),
               device_peak_mb=_device_peak_mb(), n_train=int(getattr(method, "n_train", 0)), arrays=arrays,
               shapes=task.shapes())
    return out


def index_arrays(index) -> dict:
    """{name: (elements, bytes)} of what a search reads: the index's parameters and arrays (its partition
    and, for ANN, its own copy of the vectors and their ids)."""
    return {**_arrays(index.params, "params"), **_arrays(index.arrays, "arrays")}


def search_job(job: dict) -> dict:
    """Open a trained run as an index (`jaxidx.load`, in a process pinned to one core), search its test
    queries with each setting; XMC also single-query latency."""
    import jaxidx
    from jaxidx.data import load
    from jaxidx.evaluate import evaluate
    t0 = time.perf_counter()
    index = jaxidx.load(job["workdir"])
    index.config.search.n_threads = 1
    out = {"index_s": time.perf_counter() - t0, "arrays": index_arrays(index)}
    data = load(index.config.data)
    out["results"] = evaluate(index, data, index.config.search.settings, index.config.search.k)
    out["search_rss_mb"] = _max_rss_mb()
    if data.task == "xmc":
        out.update(bench.latency_ms(index, data, dict(index.config.search.settings[0]), job["latency_queries"]))
    return out


def peers_job(job: dict) -> dict:
    """faiss IVF-Flat and brute force (and hnswlib unless skipped): built on all cores, searched on one."""
    from jaxidx.data import load
    data = load(job["data"])
    cores = len(os.sched_getaffinity(0))
    rows, builds, faiss_bytes = bench.bench_faiss(data, job["nlist"], job["nprobe"], 1, build_threads=cores)
    sizes = {"faiss-ivf-flat": faiss_bytes}
    if job["hnsw"]:
        hrows, hb, sizes["hnswlib"] = bench.bench_hnsw(data, job["ef"], 1, cores)
        rows, builds = rows + hrows, {**builds, **hb}
    return {"rows": rows, "build_s": builds, "index_bytes": sizes}


def devices_job(job: dict) -> dict:
    """Each method's tiny preset trained on meshes of the first n of the visible (simulated) devices, for
    each n: per-step losses, throughput, final parameters."""
    import jax
    from jax.sharding import Mesh
    from jaxidx.runner import build
    from jaxidx.train import mesh as mesh_lib
    from jaxidx.train.loop import fit_stages, stage_dir
    from jaxidx.train.metrics_log import read_metrics
    out = []
    for method_name in job["methods"]:
        config = _preset(method_name).get_config("tiny")
        config.train.update(epochs=job["epochs"], log_every=1)
        config.data = job["data"].get(method_name, config.data)
        if method_name == "elias":
            config.train.stage2_epochs = job["epochs"]
        for n in job["devices"]:
            wd = os.path.join(job["workdir"], f"{method_name}-{n}")
            shutil.rmtree(wd, ignore_errors=True)
            mesh = Mesh(np.asarray(jax.devices()[:n]).reshape(n, 1), (mesh_lib.DATA, mesh_lib.MODEL))
            method, data, _ = build(config, mesh=mesh)
            _, result = fit_stages(method, config, wd, mesh, data_fingerprint=data.fingerprint(), progress=False)
            dirs = [stage_dir(wd, s) for s in getattr(method, "stages", ())] or [wd]
            recs = [[r for r in read_metrics(d) if "train/loss" in r] for d in dirs]
            rate = [r["train/examples_per_second"] for rs in recs for r in rs[1:]]  # a stage's first step compiles
            params = jax.tree.leaves(jax.device_get(result.params))
            out.append({"method": method_name, "devices": n, "losses": [r["train/loss"] for rs in recs for r in rs],
                        "examples_per_second": float(np.median(rate)),
                        "params": np.concatenate([np.asarray(x, np.float64).ravel() for x in params]).tolist()})
    return {"runs": out}


WORKERS = {"train": train_job, "search": search_job, "peers": peers_job, "devices": devices_job}


# --- driver --------------------------------------------------------------------------------------------

def run_worker(kind: str, job: dict, env: dict | None = None) -> dict:
    """Run `WORKERS[kind](job)` in a fresh interpreter (its stderr goes to ours; a search is pinned to one
    core); the last line it prints is the result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker=" + json.dumps(dict(job, kind=kind))]
    cmd += ["--threads=1"] if kind == "search" else []
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, check=False,
                          env=dict(os.environ, PYTHONPATH=REPO, **(env or {})))
    if proc.returncode:
        raise RuntimeError(f"worker failed ({proc.returncode}): {job}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _total_mb(arrays: dict) -> float:
    return sum(b for _, b in arrays.values()) / 2**20


def array_growth(rows: list[dict], size_key: str) -> None:
    """Per row, `array_growth`: the largest exponent e with (elements of one array) ~ size^e between this
    size and the method's previous size, over every array of the trained state and the index (1 = linear)."""
    last = {}
    for r in rows:
        prev = last.get(r["method"])
        if prev is not None:
            ratio = math.log(r[size_key] / prev[size_key])
            r["array_growth"] = max(math.log(max(n, 1) / max(prev["arrays"][k][0], 1)) / ratio
                                    for k, (n, _) in r["arrays"].items() if k in prev["arrays"])
        last[r["method"]] = r


def xmc_part(cfg: dict, run=run_worker) -> dict:
    """IRLI and ELIAS at each L: train (all cores), then search (one core)."""
    elias = _preset("elias")
    labels = cfg["xmc_labels"]
    uncapped = cfg["elias_uncapped"]
    if uncapped is None:
        uncapped = [L for L in labels[-1:] if "elias" in cfg["xmc_methods"] and elias.scaling_xmc(L).model.max_leaf > 100]
    dense_labels = cfg["elias_dense_labels"]
    if dense_labels is None:
        dense_labels = labels[-1:] if "elias" in cfg["xmc_methods"] else []
    runs = [(m, L, {}) for m in cfg["xmc_methods"] for L in labels]
    runs += [("elias", L, {"label_optimizer": "dense"}) for L in dense_labels]
    tree_labels = cfg["elias_tree"]
    if tree_labels is None:
        tree_labels = labels[-1:] if "elias" in cfg["xmc_methods"] else []
    runs += [("elias", L, {"max_clusters": 0, "tree": True}) for L in tree_labels]
    runs += [("elias", L, {"max_clusters": 0, "steps": 0, "tree": False}) for L in uncapped]
    rows = []
    for method, L, extra in runs:
        tree, dense = extra.get("tree", False), "label_optimizer" in extra
        uncap = "max_clusters" in extra and not tree  # untrained, cost only
        job = {"part": "xmc", "method": method, "size": L, "steps": cfg["steps"], "queries": cfg["xmc_test"],
               "workdir": os.path.join(cfg["workdir"], f"xmc-{method}-{L}" + ("-uncapped" if uncap else "")
                                       + ("-tree" if tree else "") + ("-dense-labels" if dense else "")), **extra}
        print(f"== xmc {method} L={L} {extra}", flush=True)
        tr = run("train", job)
        se = run("search", dict(job, latency_queries=cfg["latency_queries"]))
        res, sh, st = se["results"][0], tr["shapes"], list(tr["stages"].values())
        arrays = {**tr["arrays"], **{"index." + k: v for k, v in se["arrays"].items()}}
        rows.append({
            "method": method + (" (C = L/100, untrained: cost only)" if uncap else "")
            + (f" (C = L/100, cluster tree of {sh['cluster_groups']} groups)" if tree else "")
            + (" (dense label AdamW)" if dense else ""), "labels": L,
            "buckets": sh.get("n_buckets", sh.get("n_clusters")), "train_examples": tr["n_train"],
            "steps": "/".join(str(s["steps"]) for s in st), "epochs": "/".join(str(s["epochs"]) for s in st),
            "step_ms": "/".join("-" if s["step_ms"] is None else f"{s['step_ms']:.0f}" for s in st),
            "build_s": "/".join(f"{s.get('init_s', 0) + sum(s.get('end_of_epoch_s', [])):.1f}" for s in st),
            "train_s": sum(s["train_s"] for s in st), "train_rss_mb": tr["train_rss_mb"],
            "search_rss_mb": se["search_rss_mb"], "device_peak_mb": tr["device_peak_mb"],
            "state_mb": _total_mb(tr["arrays"]), "index_mb": _total_mb(se["arrays"]),
            "bytes_per_label": _total_mb(arrays) * 2**20 / L, "arrays": arrays,
            "latency_ms_p50": se["latency_ms_p50"], "latency_ms_p99": se["latency_ms_p99"],
            "queries_per_second": res["queries_per_second"], "us_per_query": 1e6 / res["queries_per_second"],
            "candidates_per_query": res["candidates_per_query"], "P@1": None if uncap else res["P@1"],
            "setting": json.dumps({k: v for k, v in res.items() if k in ("m", "min_count", "beam", "shortlist")})})
        print(format_results([{k: v for k, v in rows[-1].items() if k != "arrays"}]), flush=True)
    array_growth(rows, "labels")
    rows.append({"method": "lmi", "note": "not run: LMI indexes vectors (k-means of the base vectors, exact "
                 "re-rank); XMC labels have no vectors, and LMI refuses XMC data (TypeError)."})
    return {"rows": rows}


def ann_part(cfg: dict, run=run_worker) -> dict:
    """LMI and IRLI at each N (train on all cores, search on one), then faiss IVF-Flat with as many lists,
    brute force and hnswlib (skipped where its estimated build exceeds the budget)."""
    summary, sweeps, hnsw_rate, hnsw_n = [], [], None, None
    for n in cfg["ann_sizes"]:
        nlist, spec = None, None
        for method in cfg["ann_methods"]:
            if method == "irli" and n > cfg["irli_ann_max"]:
                last = next((r for r in reversed(summary) if r["method"] == "irli" and "build_s" in r), None)
                est = (f"; about {last['build_s'] * (n / last['n']) ** 1.5:.0f} s by N^1.5 from {last['build_s']:.0f} s "
                       f"at N={last['n']}") if last else ""
                summary.append({"method": "irli", "n": n, "note": f"skipped above N={cfg['irli_ann_max']}: the exact "
                                "neighbours of its 50K training points cost O(50K x N) and each re-partition routes "
                                f"all N vectors through R networks, O(N x R x H x B) with B ~ sqrt N{est}"})
                continue
            job = {"part": "ann", "method": method, "size": n, "queries": cfg["ann_queries"],
                   "budget": {"examples": cfg["lmi_examples"]} if method == "lmi" else {"epochs": cfg["irli_ann_epochs"]},
                   "workdir": os.path.join(cfg["workdir"], f"ann-{method}-{n}")}
            print(f"== ann {method} N={n}", flush=True)
            tr = run("train", job)
            se = run("search", job)
            nlist, spec = tr["shapes"].get("n_buckets") or math.prod(tr["shapes"]["levels"]), tr["data"]
            name = f"{method} (B {nlist})"
            rows = [dict(r, method=name, n=n) for r in se["results"]]
            sweeps += rows
            summary.append({"method": method, "n": n, "buckets": nlist, "epochs": tr["stages"]["train"]["epochs"],
                            "build_s": tr["build_s"], "bytes_per_vector": _total_mb(se["arrays"]) * 2**20 / n,
                            "arrays": {**tr["arrays"], **{"index." + k: v for k, v in se["arrays"].items()}},
                            "train_rss_mb": tr["train_rss_mb"], "search_rss_mb": se["search_rss_mb"],
                            **_at(rows, name, cfg["candidates"])})
        est = n / hnsw_rate * math.log(n) / math.log(hnsw_n) if hnsw_rate else 0.0
        hnsw = est <= cfg["hnsw_budget"]
        print(f"== ann peers N={n}, nlist {nlist}", flush=True)
        pe = run("peers", {"data": spec, "nlist": nlist, "nprobe": [1, 2, 4, 8, 16, 32, 64, 128],
                           "ef": [10, 20, 40, 80, 160], "hnsw": hnsw})
        rows = [dict(r, n=n) for r in pe["rows"]]
        sweeps += rows
        for name in dict.fromkeys(r["method"] for r in rows):
            key = name.split(" ")[0] if name.startswith(("faiss", "hnswlib")) else None
            entry = {"method": name.split(" (")[0], "n": n, "buckets": nlist if key == "faiss-ivf-flat" else None,
                     "build_s": pe["build_s"].get(key),
                     "bytes_per_vector": pe["index_bytes"][key] / n if key else None}
            if key == "faiss-ivf-flat":
                entry.update(_at(rows, name, cfg["candidates"]))
            else:
                r = next(r for r in rows if r["method"] == name and r["setting"].get("ef", cfg["hnsw_ef"]) == cfg["hnsw_ef"])
                entry.update({k: r[k] for k in ("recall@10", "queries_per_second")},
                             setting=f"ef {cfg['hnsw_ef']}" if key else "exact")
            summary.append(entry)
        if hnsw:
            hnsw_rate, hnsw_n = n / pe["build_s"]["hnswlib"], n
        else:
            summary.append({"method": "hnswlib", "n": n, "note": f"skipped: estimated build {est:.0f} s > "
                            f"hnsw_budget {cfg['hnsw_budget']:.0f} s at the rate measured at N={hnsw_n} "
                            f"({hnsw_rate:.0f} vectors/s on 2 cores; cost per insert grows with log N)"})
    array_growth([r for r in summary if "arrays" in r], "n")
    return {"rows": summary, "sweeps": sweeps, "candidates": cfg["candidates"]}


def _at(rows: list[dict], name: str, candidates: int) -> dict:
    at = bench.at_candidates(rows, name, candidates)
    return {"recall@10": at["recall@10"], "queries_per_second": at["queries_per_second"],
            "setting": f"{candidates} candidates"}


def devices_part(cfg: dict, run=run_worker) -> dict:
    """The methods on 1, 2, 4, 8 simulated CPU devices (one process with the largest count, a mesh over
    the first n devices per run), each compared with its run on the fewest devices."""
    counts = cfg["devices"]
    print(f"== devices {counts}", flush=True)
    runs = run("devices", {"methods": cfg["device_methods"], "devices": counts, "epochs": cfg["device_epochs"],
                           "data": cfg["device_data"], "workdir": os.path.join(cfg["workdir"], "devices")},
               env={"JAX_NUM_CPU_DEVICES": str(max(counts)), "JAX_PLATFORMS": "cpu"})["runs"]
    rows = []
    for r in runs:
        ref = next(x for x in runs if x["method"] == r["method"] and x["devices"] == counts[0])
        loss, params = np.asarray(r["losses"]), np.asarray(r["params"])
        rows.append({"method": r["method"], "devices": r["devices"], "steps": len(loss),
                     "examples_per_second": r["examples_per_second"],
                     "max_loss_rel_diff": float(np.max(np.abs(loss - ref["losses"]) / np.abs(ref["losses"]))),
                     "max_param_abs_diff": float(np.max(np.abs(params - ref["params"]))),
                     "same_training": bool(np.allclose(loss, ref["losses"], rtol=1e-4, atol=1e-6)
                                           and np.allclose(params, ref["params"], rtol=1e-3, atol=1e-5))})
    return {"rows": rows}


def markdown(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of `cols` (missing values blank)."""
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"
        return str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows])


def plot(out: dict, stem: str) -> list[str]:
    """One PNG per part: cost against size, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []

    def panels(rows, x, by, specs, xlabel, path):
        fig, axes = plt.subplots(1, len(specs), figsize=(4.2 * len(specs), 3.8), squeeze=False)
        axes = axes[0]
        for ax, (key, label) in zip(axes, specs):
            for name in dict.fromkeys(r[by] for r in rows):
                pts = sorted((r[x], r[key]) for r in rows if r[by] == name and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), "o-", label=name)
            ax.set(xscale="log", yscale="log" if key != "recall@10" else "linear", xlabel=xlabel, ylabel=label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    if "xmc" in out:
        rows = [dict(r, step=None if r["step_ms"].endswith("-") else float(r["step_ms"].split("/")[-1]))
                for r in out["xmc"]["rows"] if "note" not in r]
        panels(rows, "labels", "method", [("latency_ms_p50", "latency ms (1 query, 1 thread)"),
                                          ("us_per_query", "us / query (batch, 1 thread)"),
                                          ("candidates_per_query", "candidates / query"),
                                          ("step", "train step ms (last stage)"),
                                          ("train_rss_mb", "peak host MB (training)")], "labels L", stem + "_xmc.png")
    if "ann" in out:
        rows = [r for r in out["ann"]["rows"] if "note" not in r]
        panels(rows, "n", "method", [("recall@10", f"recall@10 at {out['ann']['candidates']} candidates"),
                                     ("queries_per_second", "queries/s (1 thread)"), ("build_s", "build s"),
                                     ("bytes_per_vector", "index bytes / vector")], "base vectors N", stem + "_ann.png")
    if "devices" in out:
        panels(out["devices"]["rows"], "devices", "method", [("examples_per_second", "train examples/s")],
               "simulated CPU devices", stem + "_devices.png")
    return paths


XMC_COLUMNS = ["method", "labels", "buckets", "train_examples", "epochs", "steps", "step_ms", "build_s",
               "train_rss_mb", "search_rss_mb", "device_peak_mb", "state_mb", "index_mb", "bytes_per_label",
               "array_growth", "latency_ms_p50", "us_per_query", "queries_per_second", "candidates_per_query", "P@1",
               "note"]
ANN_COLUMNS = ["method", "n", "buckets", "epochs", "build_s", "bytes_per_vector", "array_growth", "setting",
               "recall@10", "queries_per_second", "train_rss_mb", "search_rss_mb", "note"]
DEVICE_COLUMNS = ["method", "devices", "steps", "examples_per_second", "max_loss_rel_diff", "max_param_abs_diff",
                  "same_training"]


PARTS = {"xmc": (xmc_part, XMC_COLUMNS), "ann": (ann_part, ANN_COLUMNS), "devices": (devices_part, DEVICE_COLUMNS)}


def main(argv):
    del argv
    if FLAGS.worker:
        logging.set_verbosity(logging.ERROR)  # orbax's read-only notices
        job = json.loads(FLAGS.worker)
        print(json.dumps(WORKERS[job.pop("kind")](job)))
        return
    logging.set_verbosity(logging.WARNING)
    cfg = dict(SMALL if FLAGS.small else FULL)
    for key in _FLAG_KEYS:
        value = getattr(FLAGS, key)
        if value is not None:
            cfg[key] = [v if key.endswith("methods") else int(v) for v in value] if isinstance(value, list) else value
    out = {}
    if os.path.exists(FLAGS.out):  # results of the parts not run now are kept
        with open(FLAGS.out, encoding="utf-8") as f:
            out = json.load(f)
    for part in FLAGS.parts:
        t0 = time.perf_counter()
        result = PARTS[part][0](cfg, run_worker)
        out[part] = {"machine": bench.machine(), "command": bench.command(), "config": cfg,
                     "wall_s": time.perf_counter() - t0, **result}
        bench.write_json(FLAGS.out, out)
    out["plots"] = plot(out, FLAGS.out.rsplit(".", 1)[0])
    bench.write_json(FLAGS.out, out)
    for part in FLAGS.parts:
        print(f"\n{part}: {out[part]['machine']}; {out[part]['wall_s']:.0f} s\n"
              + markdown(out[part]["rows"], PARTS[part][1]))
    print(f"\nwrote {FLAGS.out} and {', '.join(out['plots'])}")


if __name__ == "__main__":
    cli.run(main)
