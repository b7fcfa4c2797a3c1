"""Exact (brute-force) search with the JAX `exact_knn`: the reference every index is measured against.

    PYTHONPATH=. python3 launch/eval_exact.py --data=glove-6b-50d [--k=10] [--batch=N] [--out=result.json]

Loads an ANN data set, times exact search of all queries against the base
(after compiling on one chunk), checks it against the stored ground truth
(recall@k by id and by distance; by distance it must be 1.0, by id only ties
may lower it) and prints queries/s.
"""
from __future__ import annotations

import json
import os
import platform
import time

import jax
from absl import flags

from jaxidx import cli
from jaxidx.data import ANNData, exact_knn, knn_chunk_sizes, load
from jaxidx.metrics import knn_recall, knn_recall_distance

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "data spec, e.g. glove-6b-50d (see jaxidx.data.SPEC_FORMS)")
flags.DEFINE_integer("k", 10, "neighbours per query")
flags.DEFINE_integer("batch", 0, "queries per jitted step; 0: chosen from the memory budget")
flags.DEFINE_string("out", None, "write the result as JSON to this path")
flags.mark_flag_as_required("data")


def main(argv):
    del argv
    t0 = time.perf_counter()
    data = load(FLAGS.data)
    load_s = time.perf_counter() - t0
    if not isinstance(data, ANNData):
        raise SystemExit(f"{FLAGS.data} is an XMC data set; exact search applies to ANN data only")
    k = FLAGS.k
    if k > data.gt_ids.shape[1]:
        raise SystemExit(f"--k={k} exceeds the {data.gt_ids.shape[1]} stored true neighbours")
    n_q = data.queries.shape[0]
    qc, bc = knn_chunk_sizes(n_q, data.n_items, k)
    chunks = (FLAGS.batch or qc, bc)

    t0 = time.perf_counter()
    exact_knn(data.queries[:chunks[0]], data.base, k, data.metric, chunk_size=chunks)  # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids, dist = exact_knn(data.queries, data.base, k, data.metric, chunk_size=chunks)
    search_s = time.perf_counter() - t0

    result = {
        "data": data.name, "metric": data.metric, "n_base": data.n_items, "n_queries": n_q, "dim": data.dim,
        "k": k, "query_chunk": chunks[0], "base_chunk": chunks[1],
        f"recall@{k}": knn_recall(ids, data.gt_ids, k),
        f"recall@{k}_distance": knn_recall_distance(dist, data.gt_dist, k),
        "queries_per_s": n_q / search_s, "search_s": search_s, "compile_s": compile_s, "load_s": load_s,
        "jax": jax.__version__, "backend": jax.default_backend(), "devices": len(jax.devices()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": _cpu_count(),
    }
    print(f"data {data.name}: {data.n_items} base x {n_q} queries, d={data.dim}, {data.metric}")
    print(f"chunks: {chunks[0]} queries x {chunks[1]} base rows; load {load_s:.1f} s, compile {compile_s:.1f} s")
    print(f"recall@{k} by id:       {result[f'recall@{k}']:.6f}")
    print(f"recall@{k} by distance: {result[f'recall@{k}_distance']:.6f}")
    print(f"search {search_s:.2f} s, {result['queries_per_s']:.0f} queries/s "
          f"({result['backend']}, {result['cpus']} cpus, jax {result['jax']})")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {FLAGS.out}")
    if result[f"recall@{k}_distance"] < 1.0:
        raise SystemExit("exact search disagrees with the stored ground truth")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    cli.run(main)
