"""Single-query latency: trained jaxidx indexes searched one query per call (a block of 1, one core)
beside hnswlib, faiss IVF-Flat and ScaNN searched the same way, in one run; p50 / p99 microseconds
and each setting's recall@10 over the same queries.

    python3 launch/bench_latency.py --workdir=runs/suite/glove-6b-50d-lmi \
        --workdir=runs/suite/glove-6b-50d-irli --queries=1000 --out=benchmarks/bench_latency.json

A batch benchmark (`bench_ann.py`) lets a method share work between queries (LMI's re-rank reads a
leaf once per block of queries); a caller that searches as requests arrive gets none of that, and
pays every call's fixed cost (Python, JAX dispatch of the router). This measures that caller. Each
contender's calls are timed one at a time after one untimed pass over the same queries. The summary
gives, per method, the lowest p50 among its settings with recall@10 (by distance) >= 0.90 and 0.95,
that setting's p99, and the p50 ratio to ScaNN's and hnswlib's (above 1: slower).
"""

from jaxidx.bench import pin_threads

if __name__ == "__main__":  # one core for every contender, before jax / faiss start their thread pools
    pin_threads(1)

import json  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

import jaxidx  # noqa: E402
from jaxidx import bench, cli  # noqa: E402
from jaxidx.config import apply_overrides  # noqa: E402
from jaxidx.data import load  # noqa: E402
from jaxidx.data.types import benchmark_distance  # noqa: E402
from jaxidx.evaluate import format_results  # noqa: E402
from jaxidx.metrics import knn_recall, knn_recall_distance  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "Trained runs or saved indexes (one or more).")
flags.DEFINE_multi_string("settings", [], "Search settings per --workdir, in the same order, JSON list "
                          "(default: the index's config settings).")
flags.DEFINE_string("data", None, "Data spec override (default: the first index's own).")
flags.DEFINE_integer("queries", 1000, "Test queries searched one by one (the first ones of the data set).")
flags.DEFINE_list("ef", "10,20,40,80,160", "hnswlib ef sweep.")
flags.DEFINE_list("nprobe", "4,8,16,24,32,48", "faiss IVF-Flat nprobe sweep (those <= nlist); nlist = the first "
                  "index's bucket count.")
flags.DEFINE_bool("scann", True, "Include ScaNN (tree with the first index's bucket count); skipped with a message "
                  "when not installed.")
flags.DEFINE_list("leaves", "8,16,24,32,48", "ScaNN leaves-to-search sweep (those <= its leaves).")
flags.DEFINE_list("reorder", "30,100,200", "ScaNN reorder sweep.")
flags.DEFINE_string("out", "out/bench_latency.json", "JSON result path.")


def latency_row(method: str, setting: dict, search, queries: np.ndarray, data) -> dict:
    """`search(q [1, d]) -> (ids [k], benchmark distances [k])` timed per query (`bench.one_by_one`)."""
    times, out = bench.one_by_one(search, [queries[i:i + 1] for i in range(len(queries))])
    ids = np.stack([np.asarray(i, np.int64).reshape(-1)[:10] for i, _ in out])
    dist = np.stack([np.asarray(d, np.float32).reshape(-1)[:10] for _, d in out])
    us = 1e6 * np.asarray(times)
    n = len(queries)
    return {"method": method, "setting": setting, "recall@10": knn_recall(ids, data.gt_ids[:n], 10),
            "recall@10_distance": knn_recall_distance(dist, data.gt_dist[:n], 10),
            "latency_us_p50": float(np.median(us)), "latency_us_p99": float(np.quantile(us, 0.99)),
            "latency_us_mean": float(us.mean())}


def index_rows(queries, data):
    rows, nlist = [], None
    for i, wd in enumerate(FLAGS.workdir):
        index = jaxidx.load(wd)
        apply_overrides(index.config, {"search.n_threads": 1})
        if index.info["data_fingerprint"] != data.fingerprint():
            raise ValueError(f"--workdir {wd}: trained on other data than {data.name}")
        settings = json.loads(FLAGS.settings[i]) if i < len(FLAGS.settings) else index.config.search.settings
        n_buckets = index.stats()["n_buckets"]
        nlist = nlist or n_buckets
        for s in settings:
            s = {k: v for k, v in dict(s).items() if k != "max_candidates" or v}
            rows.append(latency_row(f"{index.method} (B {n_buckets})", s,
                                    lambda q, s=s: index.search(q, 10, **s), queries, data))
            print(rows[-1], flush=True)
    return rows, nlist


def peer_rows(queries, data, nlist: int):
    import faiss
    faiss.omp_set_num_threads(1)
    ip = data.kernel_metric == "ip"
    rows = []
    hnsw, _ = bench.build_hnsw(data, build_threads=0)
    hnsw.set_num_threads(1)
    for ef in map(int, FLAGS.ef):
        hnsw.set_ef(max(ef, 10))

        def search(q):
            ids, dist = hnsw.knn_query(q, k=10)
            return ids, bench.hnsw_distance(dist, data)
        rows.append(latency_row("hnswlib (M 16)", {"ef": ef}, search, queries, data))
    ivf, _ = bench.build_ivf_flat(data, nlist)
    for nprobe in [p for p in map(int, FLAGS.nprobe) if p <= nlist]:
        ivf.nprobe = nprobe

        def search(q):
            score, ids = ivf.search(q, 10)
            return ids, benchmark_distance(-score if ip else score, data.metric)
        rows.append(latency_row(f"faiss-ivf-flat (nlist {nlist})", {"nprobe": nprobe}, search, queries, data))
    leaves = [p for p in map(int, FLAGS.leaves) if p <= nlist]
    reorders = list(map(int, FLAGS.reorder))
    searcher, _ = bench.build_scann(data, nlist, leaves, reorders) if FLAGS.scann else (None, 0.0)
    for n_leaves in leaves if searcher is not None else []:
        for reorder in reorders:
            def search(q):
                ids, score = searcher.search(q[0], final_num_neighbors=10, leaves_to_search=n_leaves,
                                             pre_reorder_num_neighbors=reorder)
                return ids, benchmark_distance(-score if ip else score, data.metric)
            rows.append(latency_row(bench.SCANN_NAME.format(nlist), {"leaves": n_leaves, "reorder": reorder}, search,
                                    queries, data))
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per method and target recall (by distance): the setting of lowest p50, its p99, p50 ratios to peers."""
    best = {}
    for r in rows:
        for target in (0.90, 0.95):
            key = (r["method"], target)
            if r["recall@10_distance"] >= target and (key not in best or
                                                       r["latency_us_p50"] < best[key]["latency_us_p50"]):
                best[key] = r
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        entry = {"method": m}
        for target in (0.90, 0.95):
            tag, b = f"{target:.2f}", best.get((m, target))
            if b is None:
                entry[f"p50_us@{tag}"] = "not reached"
                continue
            entry.update({f"p50_us@{tag}": round(b["latency_us_p50"], 1), f"p99_us@{tag}": round(b["latency_us_p99"], 1),
                          f"setting@{tag}": json.dumps(b["setting"])})
            for peer in ("scann", "hnswlib"):
                ref = next((v for (pm, t), v in best.items() if pm.startswith(peer) and t == target), None)
                if ref is not None:
                    entry[f"p50_vs_{peer}@{tag}"] = round(b["latency_us_p50"] / ref["latency_us_p50"], 2)
        out.append(entry)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if not FLAGS.workdir:
        raise ValueError("--workdir: at least one trained run or saved index is needed")
    data = load(FLAGS.data or jaxidx.load(FLAGS.workdir[0]).config.data)
    queries = np.ascontiguousarray(data.queries[:FLAGS.queries], np.float32)
    rows, nlist = index_rows(queries, data)
    rows += peer_rows(queries, data, nlist)
    table = summary(rows)
    out = {"machine": bench.machine(), "command": bench.command(), "data": data.name, "threads": 1,
           "n_queries": int(len(queries)), "rows": rows, "summary": table}
    bench.write_json(FLAGS.out, out)
    print(out["machine"])
    print(format_results([{"method": r["method"], **r["setting"], **{k: round(v, 4) if isinstance(v, float) else v
                                                                      for k, v in r.items()
                                                                      if k not in ("method", "setting")}}
                          for r in rows]))
    print("\nlowest p50 at recall@10 (by distance) >= 0.90 and 0.95, microseconds (ratio > 1: slower than the peer):")
    print(format_results(table))
    print(f"results: {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
