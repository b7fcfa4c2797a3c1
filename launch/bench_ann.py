"""ANN benchmark: a trained jaxidx index against faiss IVF-Flat (nlist = the index's
bucket count), hnswlib and brute force, on the same base and queries, in one run.

    python launch/bench_ann.py --workdir=runs/irli-glove [--workdir=runs/lmi-glove] --threads=1

Queries are searched in one batch on `--threads` cores (the whole process is
pinned). Prints a table and the best figures at recall 0.90, writes
`--out` (JSON) and a PNG of recall@10 vs candidates/query and vs queries/s.
"""

from jaxidx.bench import pin_threads_from_argv

if __name__ == "__main__":  # pin before jax / faiss start their thread pools
    pin_threads_from_argv()

import json  # noqa: E402
import os  # noqa: E402

from absl import flags, logging  # noqa: E402

from jaxidx import bench, cli  # noqa: E402
from jaxidx.evaluate import evaluate, format_results  # noqa: E402
import jaxidx  # noqa: E402
from jaxidx.config import apply_overrides  # noqa: E402
from jaxidx.data import load  # noqa: E402

flags.DEFINE_multi_string("workdir", None, "Run directories of trained indexes (one or more).")
flags.DEFINE_string("data", None, "Data spec override (default: each checkpoint's own).")
flags.DEFINE_multi_string("settings", [], 'Search settings override per --workdir, in the same order, JSON, '
                          'e.g. \'[{"m": 8, "min_count": 2}]\' (missing: the checkpoint\'s own).')
flags.DEFINE_integer("threads", 1, "Cores for every method's search (the process is pinned).")
flags.DEFINE_list("nprobe", "1,2,4,8,16,32,64,128", "faiss IVF-Flat nprobe sweep.")
flags.DEFINE_list("ef", "10,20,40,80,160,320", "hnswlib ef sweep.")
flags.DEFINE_bool("hnsw", True, "Include hnswlib (its build is the slowest part).")
flags.DEFINE_integer("hnsw_build_threads", 0, "Threads for the hnswlib build only (0 = all cores of the machine).")
flags.DEFINE_string("out", "out/bench_ann.json", "JSON result path; the plot goes beside it (.png).")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    rows, builds, data, nlist = [], {}, None, None
    for i, wd in enumerate(FLAGS.workdir):
        index = jaxidx.load(wd)
        overrides = {"search.n_threads": FLAGS.threads}
        if i < len(FLAGS.settings):
            overrides["search.settings"] = json.loads(FLAGS.settings[i])
        apply_overrides(index.config, overrides)
        data_i = load(FLAGS.data or index.config.data)
        if data_i.fingerprint() != index.info["data_fingerprint"]:
            raise ValueError(f"--workdir {wd}: trained on other data than {FLAGS.data or index.config.data}")
        data = data_i
        n_buckets = index.stats()["n_buckets"]
        nlist = nlist or n_buckets
        builds[f"{index.method} ({wd})"] = float(index.info.get("train_seconds", 0.0))
        for r in evaluate(index, data, index.config.search.settings, 10):
            setting = {k: v for k, v in r.items() if k not in
                       ("recall@10", "recall@10_distance", "candidates_per_query", "queries_per_second")}
            rows.append({"method": f"{index.method} (B {n_buckets}, {os.path.basename(os.path.normpath(wd))})",
                         "setting": setting,
                         **{k: r[k] for k in ("recall@10", "recall@10_distance", "candidates_per_query",
                                              "queries_per_second")}})
    frows, fb, _ = bench.bench_faiss(data, nlist, [int(x) for x in FLAGS.nprobe], FLAGS.threads)
    rows += frows
    builds.update(fb)
    if FLAGS.hnsw:
        hrows, hb, _ = bench.bench_hnsw(data, [int(x) for x in FLAGS.ef], FLAGS.threads, FLAGS.hnsw_build_threads)
        rows += hrows
        builds.update(hb)
    summary = [bench.best_at(rows, m, 0.90) for m in dict.fromkeys(r["method"] for r in rows)]
    out = {"machine": bench.machine(), "command": bench.command(), "data": data.name, "threads": FLAGS.threads,
           "n_queries": int(len(data.queries)), "build_seconds": builds, "rows": rows, "at_recall_0.90": summary}
    bench.write_json(FLAGS.out, out)
    bench.plot_ann_curves(rows, FLAGS.out.rsplit(".", 1)[0] + ".png", f"{data.name}, {FLAGS.threads} thread(s)")
    flat = [{"method": r["method"], **r["setting"], **{k: r[k] for k in r if k not in ("method", "setting")}}
            for r in rows]
    print(out["machine"])
    print(format_results(flat))
    print("\nat recall@10 >= 0.90:")
    print(format_results(summary))
    print("build seconds:", {k: round(v, 1) for k, v in builds.items()})


if __name__ == "__main__":
    cli.run(main)
