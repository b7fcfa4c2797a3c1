"""Benchmark the search kernels at realistic sizes.

merge_topk: C++ (1 thread and all threads) against the NumPy reference and the
JAX twin (jit on CPU, timed after a warm-up call). rerank_topk: C++ against
faiss IndexIVFFlat with as many buckets, nprobe set so that faiss scans about
as many vectors per query as the re-rank does, in ns per scanned vector
(faiss timed both with its coarse quantizer and on preassigned lists), and
the runs form (LMI's path) scanning faiss's own lists in the same order. The
contenders take turns and the best of --repeats rounds is kept. Prints a
table and writes JSON to --out. Run from the repository root (with jaxidx
installed, or PYTHONPATH=.):

  python3 launch/bench_kernels.py                # Q=10000, R=4, m=8, N=390000, B=4096, d=50, k=10
  python3 launch/bench_kernels.py --Q 1000 --N 50000 --B 512   # quick
"""
import argparse
import json
import os
import platform
import subprocess
import time

import numpy as np

from jaxidx.search import device, host, reference


def hashed_partition(N, R, B):
    """Bucket of item i in repetition r: a 32-bit integer hash of (i, r) mod B, in CSR."""
    items = np.arange(N, dtype=np.uint64)
    offsets = np.zeros((R, B + 1), np.int32)
    members = np.zeros((R, N), np.int32)
    for r in range(R):
        h = (items * np.uint64(0x9E3779B1) + np.uint64(r) * np.uint64(0x85EBCA77)) & np.uint64(0xFFFFFFFF)
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
        h ^= h >> np.uint64(13)
        bucket = (h % np.uint64(B)).astype(np.int64)
        members[r] = np.argsort(bucket, kind="stable")
        offsets[r, 1:] = np.cumsum(np.bincount(bucket, minlength=B))
    return offsets, members


def routed_buckets(rng, Q, R, m, B):
    """m distinct random buckets per query and repetition, with descending scores."""
    gaps = rng.integers(1, max(2, B // m), (Q, R, m))
    bucket_ids = ((rng.integers(0, B, (Q, R, 1)) + np.cumsum(gaps, axis=2)) % B).astype(np.int32)
    scores = -np.sort(-rng.random((Q, R, m), dtype=np.float32), axis=2)
    return bucket_ids, np.ascontiguousarray(scores)


def routed_members_csr(bucket_ids, offsets, members):
    """CSR of the members of every routed bucket (duplicates across repetitions kept)."""
    Q, R, m = bucket_ids.shape
    rep = np.broadcast_to(np.arange(R)[None, :, None], bucket_ids.shape).ravel()
    b = bucket_ids.ravel()
    start = offsets[rep, b].astype(np.int64)
    size = offsets[rep, b + 1] - start
    total = size.sum()
    pos = np.repeat(start - (np.cumsum(size) - size), size) + np.arange(total)
    ids = members[np.repeat(rep, size), pos].astype(np.int32)
    cand_offsets = np.zeros(Q + 1, np.int64)
    cand_offsets[1:] = np.cumsum(size.reshape(Q, R * m).sum(axis=1))
    return cand_offsets, ids


def interleaved_best(contenders, repeats):
    """Best wall time of each callable over `repeats` rounds in which the
    contenders take turns, so that load from other processes hits them alike."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(repeats):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--Q", type=int, default=10000)
    p.add_argument("--R", type=int, default=4)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--N", type=int, default=390000)
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--d", type=int, default=50)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ref-queries", type=int, default=1000, help="queries timed on the NumPy reference")
    p.add_argument("--jax-batch", type=int, default=1000, help="queries per jitted JAX call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/bench_kernels.json")
    a = p.parse_args()
    import faiss  # bench extra

    rng = np.random.default_rng(a.seed)
    n_cpu = os.cpu_count()
    offsets, members = hashed_partition(a.N, a.R, a.B)
    bucket_ids, bucket_scores = routed_buckets(rng, a.Q, a.R, a.m, a.B)
    merge_args = (bucket_ids, bucket_scores, offsets, members, None, a.k)
    S = device.max_bucket_size_of(offsets)
    nr, nb = min(a.ref_queries, a.Q), min(a.jax_batch, a.Q)
    ref_args = (bucket_ids[:nr], bucket_scores[:nr]) + merge_args[2:]
    jax_args = (bucket_ids[:nb], bucket_scores[:nb]) + merge_args[2:]

    def run_jax():
        for out in device.merge_topk(*jax_args, max_bucket_size=S):
            out.block_until_ready()

    # The backends agree on the timed queries (this also compiles the JAX version).
    jax_out = [np.asarray(x) for x in device.merge_topk(*jax_args, max_bucket_size=S)]
    assert all(np.array_equal(x, y) for x, y in zip(jax_out, host.merge_topk(*jax_args))), "JAX != C++"
    merge = {  # name: (callable, queries per call)
        "C++ 1 thread": (lambda: host.merge_topk(*merge_args, n_threads=1), a.Q),
        f"C++ {n_cpu} threads": (lambda: host.merge_topk(*merge_args), a.Q),
        "NumPy reference": (lambda: reference.merge_topk(*ref_args), nr),
        "JAX jit (CPU)": (run_jax, nb),
    }
    best = interleaved_best({name: fn for name, (fn, _) in merge.items()}, a.repeats)
    rows = [{"kernel": "merge_topk", "impl": name, "us_per_query": 1e6 * best[name] / n}
            for name, (_, n) in merge.items()]

    # rerank_topk on every member of the routed buckets vs faiss IVF-Flat (inner product).
    base = rng.standard_normal((a.N, a.d), dtype=np.float32)
    queries = rng.standard_normal((a.Q, a.d), dtype=np.float32)
    cands = routed_members_csr(bucket_ids, offsets, members)
    _, _, n_unique = host.rerank_topk(queries, base, cands, a.k)
    scanned = int(n_unique.sum())
    quantizer = faiss.IndexFlatIP(a.d)
    ivf = faiss.IndexIVFFlat(quantizer, a.d, a.B, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = 10
    ivf.train(base[rng.choice(a.N, min(a.N, 64 * a.B), replace=False)])
    ivf.add(base)
    ivf.nprobe = max(1, round(scanned / a.Q / (a.N / a.B)))
    coarse_d, coarse = quantizer.search(queries, ivf.nprobe)
    faiss.cvar.indexIVF_stats.reset()
    ivf.search_preassigned(queries, a.k, coarse, coarse_d)
    ndis = faiss.cvar.indexIVF_stats.ndis

    def faiss_call(threads, fn):
        def run():
            faiss.omp_set_num_threads(threads)
            fn()
        return run

    # The runs form (LMI's path) on faiss's own lists: the base laid out list by list, each query's
    # nprobe lists handed over as (start, length) runs, so both scan the very same vectors.
    order = np.argsort(quantizer.assign(base, 1).ravel(), kind="stable")
    list_offsets = np.concatenate([[0], np.cumsum([ivf.get_list_size(b) for b in range(a.B)])]).astype(np.int64)
    runs = (np.arange(0, coarse.size + 1, ivf.nprobe, dtype=np.int64), list_offsets[coarse].astype(np.int32).ravel(),
            np.diff(list_offsets)[coarse].astype(np.int32).ravel())
    base_by_list = np.ascontiguousarray(base[order])
    hits, _, _ = host.rerank_topk(queries, base_by_list, runs, a.k)
    _, faiss_ids = ivf.search_preassigned(queries, a.k, coarse, coarse_d)
    agree = np.mean(order[hits] == faiss_ids)
    assert agree > 0.99, f"runs form and faiss disagree on {1 - agree:.1%} of the top-k"
    rerank = {  # name: (callable, vectors scanned per call)
        "C++ 1 thread": (lambda: host.rerank_topk(queries, base, cands, a.k, n_threads=1), scanned),
        f"C++ {n_cpu} threads": (lambda: host.rerank_topk(queries, base, cands, a.k), scanned),
        "C++ runs on faiss's lists, 1 thread": (
            lambda: host.rerank_topk(queries, base_by_list, runs, a.k, n_threads=1), ndis),
        f"C++ runs on faiss's lists, {n_cpu} threads": (
            lambda: host.rerank_topk(queries, base_by_list, runs, a.k), ndis),
    }
    for t in (1, n_cpu):
        rerank[f"faiss {t} thread(s), search"] = (faiss_call(t, lambda: ivf.search(queries, a.k)), ndis)
        rerank[f"faiss {t} thread(s), scan only"] = (
            faiss_call(t, lambda: ivf.search_preassigned(queries, a.k, coarse, coarse_d)), ndis)
    best = interleaved_best({name: fn for name, (fn, _) in rerank.items()}, a.repeats)
    rows += [{"kernel": "rerank_topk", "impl": name, "us_per_query": 1e6 * best[name] / a.Q,
              "ns_per_vector": 1e9 * best[name] / n} for name, (_, n) in rerank.items()]

    merge_us = {r["impl"]: r["us_per_query"] for r in rows if r["kernel"] == "merge_topk"}
    rerank_ns = {r["impl"]: r["ns_per_vector"] for r in rows if r["kernel"] == "rerank_topk"}
    ratios = {
        "merge: NumPy / C++ 1 thread": merge_us["NumPy reference"] / merge_us["C++ 1 thread"],
        "merge: JAX / C++ 1 thread": merge_us["JAX jit (CPU)"] / merge_us["C++ 1 thread"],
    }
    for t in (1, n_cpu):
        ours = rerank_ns["C++ 1 thread" if t == 1 else f"C++ {n_cpu} threads"]
        for what in ("search", "scan only"):
            ratios[f"rerank ns/vector: C++ / faiss {what}, {t} thread(s)"] = ours / rerank_ns[
                f"faiss {t} thread(s), {what}"]
        runs_ns = rerank_ns[f"C++ runs on faiss's lists, {'1 thread' if t == 1 else f'{n_cpu} threads'}"]
        ratios[f"rerank ns/vector: C++ runs / faiss scan only, {t} thread(s)"] = runs_ns / rerank_ns[
            f"faiss {t} thread(s), scan only"]
    result = {
        "config": vars(a), "cpu": cpu_model(), "n_cpu": n_cpu, "max_bucket_size": S,
        "rerank_vectors_per_query": scanned / a.Q, "faiss_nprobe": ivf.nprobe,
        "faiss_vectors_per_query": ndis / a.Q, "rows": rows, "ratios": ratios,
    }
    print(f"{'kernel':<12} {'implementation':<40} {'us/query':>10} {'ns/vector':>10}")
    for r in rows:
        nsv = f"{r['ns_per_vector']:.2f}" if "ns_per_vector" in r else ""
        print(f"{r['kernel']:<12} {r['impl']:<40} {r['us_per_query']:>10.2f} {nsv:>10}")
    print(f"re-rank vectors per query: {scanned / a.Q:.1f}; faiss nprobe {ivf.nprobe}, "
          f"vectors per query {ndis / a.Q:.1f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
