"""XMC benchmark: trained jaxidx indexes beside PECOS XR-Linear and a one-vs-rest linear
model, measured in the same run on the same split.

    python launch/bench_xmc.py --workdir=runs/irli-bibtex --workdir=runs/elias-bibtex --peers=pecos,ovr

Each --workdir is evaluated from its checkpoint (its best search setting by P@1
is reported, with queries/s for all test queries in batches and the latency of
single queries, median and 99th percentile over --latency_queries). The whole
process is pinned to --threads cores (default 1), peers included. PECOS runs in
its own virtualenv under $JAXIDX_CACHE (created on first use: libpecos pins numpy < 2). The one-vs-rest peer is scikit-learn
logistic regression per label (liblinear), skipped above --ovr_max_labels.
Both peers live in `jaxidx.bench` (`run_pecos`, `run_ovr`).
Writes --out (JSON) and prints a table.
"""
from jaxidx.bench import pin_threads_from_argv

if __name__ == "__main__":  # pin before jax starts its thread pools
    pin_threads_from_argv()

import collections  # noqa: E402
import json  # noqa: E402

from absl import flags, logging  # noqa: E402

from jaxidx import bench, cli  # noqa: E402
from jaxidx.data import load  # noqa: E402
from jaxidx.evaluate import format_results  # noqa: E402
from jaxidx.metrics import xmc_report  # noqa: E402
import jaxidx  # noqa: E402
from jaxidx.runner import evaluate_checkpoint  # noqa: E402

flags.DEFINE_multi_string("workdir", [], "Run directories of trained XMC indexes.")
flags.DEFINE_list("data", [], "Data specs to run the peers on (default: those of the workdirs).")
flags.DEFINE_list("peers", ["pecos", "ovr"], "Peers: pecos, ovr.")
flags.DEFINE_integer("ovr_max_labels", 2000, "Skip the one-vs-rest peer on data with more labels.")
flags.DEFINE_integer("threads", 1, "Cores for everything, peers included (the process is pinned).")
flags.DEFINE_integer("latency_queries", 300, "Test queries searched one at a time for the latency figures.")
flags.DEFINE_string("out", "out/bench_xmc.json", "JSON result path.")
FLAGS = flags.FLAGS
_KEYS = ("P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5", "R@10", "R@100")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    rows = []
    specs = list(FLAGS.data)
    for wd in FLAGS.workdir:
        out = evaluate_checkpoint(wd, filename="eval_bench.json")
        best = max(out["results"], key=lambda r: r["P@1"])
        setting = {k: v for k, v in best.items() if k not in _KEYS + ("candidates_per_query", "queries_per_second")}
        rows.append({"data": out["data"], "method": out["method"], "setting": json.dumps(setting),
                     **{k: best[k] for k in _KEYS}, "train_seconds": out["train_seconds"],
                     "queries_per_second": best["queries_per_second"],
                     **bench.latency_ms(jaxidx.load(wd), load(out["data"]), setting, FLAGS.latency_queries)})
        if out["data"] not in specs:
            specs.append(out["data"])
    peers = {"pecos": bench.run_pecos, "ovr": bench.run_ovr}
    for spec in specs:
        data = load(spec)
        for peer in FLAGS.peers:
            if peer == "ovr" and data.n_labels > FLAGS.ovr_max_labels:
                print(f"skip ovr on {spec}: {data.n_labels} labels > --ovr_max_labels")
                continue
            pred, timing = peers[peer](data)
            rep = xmc_report(pred, data.Y_test, train_Y=data.Y_train)
            rows.append({"data": spec, "method": {"pecos": "PECOS XR-Linear", "ovr": "one-vs-rest logreg"}[peer],
                         "setting": "", **{k: rep[k] for k in _KEYS}, "train_seconds": timing["train_seconds"],
                         "queries_per_second": data.X_test.shape[0] / timing["predict_seconds"]})
    rows.sort(key=lambda r: (r["data"], r["method"]))
    bench.write_json(FLAGS.out, {"machine": bench.machine(), "command": bench.command(), "rows": rows})
    print(bench.machine())
    print(format_results(rows))
    by = collections.defaultdict(dict)
    for r in rows:
        by[r["data"]][r["method"]] = r["P@1"]
    for spec, m in by.items():
        if "PECOS XR-Linear" in m:
            ref = m["PECOS XR-Linear"]
            print(spec, {k: f"P@1 {v:.4f} ({v / ref:.3f}x PECOS)" for k, v in m.items()})


if __name__ == "__main__":
    cli.run(main)
