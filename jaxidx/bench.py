"""Benchmark plumbing shared by `launch/bench_*.py`: thread pinning, machine description,
the ANN peers (faiss IVF-Flat, hnswlib, brute force), the XMC peers (PECOS XR-Linear, one-vs-rest
logistic regression), result tables and plots."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time

from jaxidx.evaluate import timed


def pin_threads(n: int) -> None:
    """Restrict this process (XLA, faiss/OpenMP, the C++ kernel) to `n` cores. Call before importing jax."""
    if n <= 0:
        return
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:n]))
    os.environ["OMP_NUM_THREADS"] = str(n)
    if n == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def pin_threads_from_argv(default: int = 1) -> None:
    """`pin_threads` to the script's `--threads=N` (before absl parses flags, so before jax starts)."""
    given = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")]
    pin_threads(int(given[-1]) if given else default)


def machine() -> str:
    """CPU model, usable cores and Python/JAX versions, for the result files."""
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), model)
    except OSError:
        pass
    import jax
    from jaxidx.search.host import simd_paths
    paths = simd_paths()
    return (f"{model}, {len(os.sched_getaffinity(0))} usable cores of {os.cpu_count()}, "
            f"Python {platform.python_version()}, JAX {jax.__version__} ({jax.default_backend()}), "
            f"kernels: exact {paths['exact']}, 4-bit scan {paths['pq4_scan']}")


def command() -> str:
    return " ".join(["python3"] + sys.argv)


def best_at(rows: list[dict], method: str, target: float, key: str = "recall@10") -> dict:
    """Fewest candidates and most queries/s among `method`'s rows reaching `target` recall."""
    ok = [r for r in rows if r["method"] == method and r[key] >= target]
    if not ok:
        return {"method": method, "reaches": False}
    cands = [r["candidates_per_query"] for r in ok if r.get("candidates_per_query") is not None]
    return {"method": method, "reaches": True,
            "min_candidates": min(cands) if cands else None,
            "max_queries_per_second": max(r["queries_per_second"] for r in ok)}


def ann_row(method: str, setting: dict, ids, dist_bench, n_cand, seconds: float, data) -> dict:
    """One result row of an ANN method: recall@10 by id and by distance, candidates, queries/s."""
    from jaxidx.metrics import knn_recall, knn_recall_distance
    return {"method": method, "setting": setting, "recall@10": knn_recall(ids, data.gt_ids, 10),
            "recall@10_distance": knn_recall_distance(dist_bench, data.gt_dist, 10),
            "candidates_per_query": n_cand, "queries_per_second": len(ids) / seconds}


def faiss_ivf_row(index, name: str, setting: dict, data) -> dict:
    """One warm, timed search of all queries by a faiss IVF index at its current parameters (`timed`),
    candidates counted by faiss's IVF statistics over the warm pass alone (as `evaluate(..., warm=True)`
    warms the learned indexes; the statistics add up over the timed runs)."""
    import faiss
    from jaxidx.data.types import benchmark_distance
    faiss.cvar.indexIVF_stats.reset()
    index.search(data.queries, 10)
    ncand = faiss.cvar.indexIVF_stats.ndis / len(data.queries)
    (score, ids), sec = timed(lambda: index.search(data.queries, 10), warm=False)
    ip = data.kernel_metric == "ip"
    return ann_row(name, setting, ids, benchmark_distance(-score if ip else score, data.metric), ncand, sec, data)


def build_ivf_flat(data, nlist: int):
    """faiss IVF-Flat with `nlist` lists over the base (on faiss's current threads): (index, build seconds)."""
    import faiss
    d, ip = data.dim, data.kernel_metric == "ip"
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
    index.train(data.base)
    index.add(data.base)
    return index, time.perf_counter() - t0


def bench_faiss(data, nlist: int, nprobes, threads: int, build_threads: int = 0):
    """faiss IVF-Flat (`nlist` lists; built on `build_threads`, default `threads`) over an nprobe sweep,
    and brute force, searched on `threads`. Returns (rows, {name: build seconds}, IVF index bytes)."""
    import faiss
    from jaxidx.data.types import benchmark_distance
    faiss.omp_set_num_threads(build_threads or threads)
    d = data.dim
    ip = data.kernel_metric == "ip"
    index, build = build_ivf_flat(data, nlist)
    faiss.omp_set_num_threads(threads)
    rows = []
    for nprobe in nprobes:
        index.nprobe = nprobe
        rows.append(faiss_ivf_row(index, f"faiss-ivf-flat (nlist {nlist})", {"nprobe": nprobe}, data))
    n_bytes = int(faiss.serialize_index(index).nbytes)
    del index
    flat = faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)
    flat.add(data.base)
    (score, ids), sec = timed(lambda: flat.search(data.queries, 10), warm=False)  # add() just read the base
    rows.append(ann_row("brute force (faiss flat)", {}, ids, benchmark_distance(-score if ip else score, data.metric),
                        float(data.n_items), sec, data))
    return rows, {"faiss-ivf-flat": build}, n_bytes


def bench_faiss_pqfs(data, nlist: int, nprobes, k_factors, threads: int, build_threads: int = 0):
    """faiss `IVF{nlist},PQ{M}x4fs,RFlat` (4-bit PQ fast scan over M = ceil(d / 2) sub-spaces of 2 dims, then
    an exact re-rank of k_factor x 10 candidates) over nprobe x k_factor. Returns (rows, {name: build
    seconds}, index bytes)."""
    import faiss
    faiss.omp_set_num_threads(build_threads or threads)
    ip = data.kernel_metric == "ip"
    m = -(-data.dim // 2)
    name = f"faiss-ivf-pq4fs (nlist {nlist}, PQ{m}x4fs, refine)"
    t0 = time.perf_counter()
    index = faiss.index_factory(data.dim, f"IVF{nlist},PQ{m}x4fs,RFlat",
                                faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
    index.train(data.base)
    index.add(data.base)
    build = time.perf_counter() - t0
    faiss.omp_set_num_threads(threads)
    ivf = faiss.extract_index_ivf(index)
    rows = []
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        for kf in k_factors:
            index.k_factor = kf
            rows.append(faiss_ivf_row(index, name, {"nprobe": nprobe, "k_factor": kf}, data))
    return rows, {name: build}, int(faiss.serialize_index(index).nbytes)


SCANN_NAME = "scann (leaves {}, AH 2 dims/block, reorder)"


def build_scann(data, n_leaves: int, leaves_to_search, reorders):
    """ScaNN: a k-means tree of `n_leaves` leaves, asymmetric hashing with 2 dimensions per 4-bit block
    (anisotropic loss, threshold 0.2, for inner products), exact re-rank: (searcher, build seconds), or
    (None, 0) with a message when scann is not installed."""
    try:
        import scann
    except ImportError:
        print("ScaNN skipped: `pip install scann` to compare against it")
        return None, 0.0
    ip = data.kernel_metric == "ip"
    t0 = time.perf_counter()
    builder = scann.scann_ops_pybind.builder(data.base, 10, "dot_product" if ip else "squared_l2").tree(
        num_leaves=n_leaves, num_leaves_to_search=max(leaves_to_search), training_sample_size=min(data.n_items, 250000))
    builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2) if ip else builder.score_ah(2)
    searcher = builder.reorder(max(reorders)).build()
    return searcher, time.perf_counter() - t0


def bench_scann(data, n_leaves: int, leaves_to_search, reorders):
    """ScaNN (`build_scann`) swept over leaves searched x reorder, searched with `search_batched` on the
    calling thread (the cores the process is pinned to). Returns (rows, {name: build seconds}, None), or
    ([], {}, None) when scann is not installed."""
    import numpy as np
    from jaxidx.data.types import benchmark_distance
    searcher, build = build_scann(data, n_leaves, leaves_to_search, reorders)
    if searcher is None:
        return [], {}, None
    ip = data.kernel_metric == "ip"
    name = SCANN_NAME.format(n_leaves)
    rows = []
    for leaves in leaves_to_search:
        for reorder in reorders:
            def run():
                return searcher.search_batched(data.queries, final_num_neighbors=10, leaves_to_search=leaves,
                                               pre_reorder_num_neighbors=reorder)
            (ids, score), sec = timed(run)
            rows.append(ann_row(name, {"leaves": leaves, "reorder": reorder}, np.asarray(ids, np.int64),
                                benchmark_distance(-score if ip else score, data.metric), None, sec, data))
    return rows, {name: build}, None


def build_hnsw(data, build_threads: int = 0):
    """hnswlib (M 16, ef_construction 200) over the base, built on `build_threads` (0 = all usable
    cores): (index, build seconds)."""
    import hnswlib
    import numpy as np
    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip" if data.kernel_metric == "ip" else "l2", dim=data.dim)
    index.init_index(max_elements=data.n_items, M=16, ef_construction=200, random_seed=0)
    index.set_num_threads(build_threads or len(os.sched_getaffinity(0)))
    index.add_items(data.base, np.arange(data.n_items))
    return index, time.perf_counter() - t0


def hnsw_distance(dist, data):
    """hnswlib's distances as the benchmark's: its 'ip' distance is 1 - dot, its 'l2' squared L2."""
    from jaxidx.data.types import benchmark_distance
    return benchmark_distance(dist - 1.0 if data.kernel_metric == "ip" else dist, data.metric)


def bench_hnsw(data, efs, threads: int, build_threads: int):
    """hnswlib (`build_hnsw`) over an ef sweep on `threads`. Returns (rows, {name: build seconds}, index
    bytes as saved)."""
    import numpy as np
    index, build = build_hnsw(data, build_threads)
    index.set_num_threads(threads)
    rows = []
    for ef in efs:
        index.set_ef(max(ef, 10))
        (ids, dist), sec = timed(lambda: index.knn_query(data.queries, k=10))
        rows.append(ann_row("hnswlib (M 16)", {"ef": ef}, ids.astype(np.int64), hnsw_distance(dist, data), None, sec,
                            data))
    return rows, {"hnswlib": build}, int(index.index_file_size())


def one_by_one(search, queries: list) -> tuple[list, list]:
    """(seconds, results) of `search(q)` for each single query of `queries`, timed one call at a time after
    one untimed pass over all of them (warm caches and compiled shapes, as `timed`)."""
    for q in queries:
        search(q)
    times, out = [], []
    for q in queries:
        t0 = time.perf_counter()
        r = search(q)
        times.append(time.perf_counter() - t0)
        out.append(r)
    return times, out


@contextlib.contextmanager
def pq4_scan(path: str):
    """A context in which the 4-bit fast scan runs on `path`: 'auto' (the best the CPU has) or 'avx2' (AVX-512
    off through JAXIDX_NO_AVX512, which the kernel reads per call); an error if the CPU lacks AVX2."""
    from jaxidx.search.host import simd_paths
    if path not in ("auto", "avx2"):
        raise ValueError(f"--pq4_scan: {path!r} is not 'auto' or 'avx2'")
    before = os.environ.get("JAXIDX_NO_AVX512")
    if path == "avx2":
        os.environ["JAXIDX_NO_AVX512"] = "1"
    try:
        if path == "avx2" and simd_paths()["pq4_scan"] != "avx2":
            raise ValueError("--pq4_scan: this CPU (or JAXIDX_NO_AVX2) has no AVX2 path")
        yield
    finally:
        if before is None:
            os.environ.pop("JAXIDX_NO_AVX512", None)
        else:
            os.environ["JAXIDX_NO_AVX512"] = before


def latency_ms(index, data, setting: dict, n: int, k: int = 10) -> dict:
    """Median and 99th-percentile milliseconds of single-query searches of an index (each a block of one
    query, `query_blocks`) over the first `n` test queries of `data`."""
    import numpy as np
    from jaxidx.evaluate import test_queries
    from jaxidx.index import n_rows
    from jaxidx.train.batches import take
    queries = test_queries(data)
    one = [take(queries, np.arange(i, i + 1)) for i in range(min(n, n_rows(queries)))]
    times, _ = one_by_one(lambda q: index.query(q, setting, k), one)
    return {"latency_ms_p50": 1e3 * float(np.median(times)), "latency_ms_p99": 1e3 * float(np.quantile(times, 0.99))}


def at_candidates(rows: list[dict], method: str, candidates: float) -> dict:
    """`method`'s recall@10 and queries/s at `candidates` per query, interpolated linearly in log candidates
    between the settings either side (None where its sweep does not reach that far)."""
    import numpy as np
    pts = sorted((r["candidates_per_query"], r["recall@10"], r["queries_per_second"]) for r in rows
                 if r["method"] == method and r.get("candidates_per_query"))
    if not pts or not pts[0][0] <= candidates <= pts[-1][0]:
        return {"recall@10": None, "queries_per_second": None}
    c, rec, qps = (np.asarray(v, float) for v in zip(*pts))
    x = np.log(candidates)
    return {"recall@10": float(np.interp(x, np.log(c), rec)),
            "queries_per_second": float(np.exp(np.interp(x, np.log(c), np.log(qps))))}


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def plot_ann_curves(rows: list[dict], path: str, title: str) -> None:
    """recall@10 vs candidates/query and vs queries/s, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        with_c = sorted((r for r in rs if r.get("candidates_per_query")), key=lambda r: r["candidates_per_query"])
        if with_c:
            a.plot([r["candidates_per_query"] for r in with_c], [r["recall@10"] for r in with_c], "o-", label=name)
        by_q = sorted(rs, key=lambda r: r["queries_per_second"])
        b.plot([r["queries_per_second"] for r in by_q], [r["recall@10"] for r in by_q], "o-", label=name)
    a.set(xscale="log", xlabel="candidates per query", ylabel="recall@10", title=title)
    b.set(xscale="log", xlabel="queries per second (1 thread)", ylabel="recall@10", title=title)
    for ax in (a, b):
        ax.axhline(0.9, color="grey", lw=0.5, ls="--")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- XMC peers ---------------------------------------------------------------------------------------

def pecos_python() -> str:
    """The interpreter of the PECOS virtualenv, creating it on first use."""
    from jaxidx.data import cache_dir
    venv = os.path.join(cache_dir(), "pecos-venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "libpecos", "numpy<2", "scipy<1.14"], check=True)
    return py


def run_pecos(data, k: int = 100):
    """PECOS XR-Linear with its defaults on an XMCData, in its own virtualenv: (top-k label ids [Q, k],
    {train_seconds, predict_seconds})."""
    import tempfile
    import numpy as np
    import scipy.sparse as sp
    with tempfile.TemporaryDirectory() as d:
        for name in ("X_train", "Y_train", "X_test"):
            sp.save_npz(f"{d}/{name}.npz", getattr(data, name).tocsr())
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pecos_xrlinear.py")  # runs in the venv
        subprocess.run([pecos_python(), script, d, str(k)], check=True)
        with open(f"{d}/timing.json") as f:
            return np.load(f"{d}/pred.npy"), json.load(f)


def run_ovr(data, k: int = 100):
    """One liblinear logistic regression per label (labels with no positive are never ranked).

    Fitted label by label: sklearn's OneVsRestClassifier on this multilabel
    indicator input gave near-zero P@1 (measured on bibtex), the loop does not.
    """
    import numpy as np
    from joblib import Parallel, delayed
    from sklearn.linear_model import LogisticRegression
    Y = data.Y_train.tocsc()
    keep = np.flatnonzero(Y.getnnz(axis=0) > 0)

    def fit(label):
        y = Y[:, label].toarray().ravel().astype(np.int8)
        return LogisticRegression(solver="liblinear", C=4.0).fit(data.X_train, y)

    t0 = time.perf_counter()
    models = Parallel(n_jobs=-1)(delayed(fit)(label) for label in keep)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    W = np.stack([m.coef_.ravel() for m in models], 1)
    b = np.array([m.intercept_[0] for m in models])
    scores = np.asarray(data.X_test @ W) + b
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return keep[top], {"train_seconds": train_s, "predict_seconds": time.perf_counter() - t0}
