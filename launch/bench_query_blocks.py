"""Single-query latency at an index's own `search.query_batch` against query_batch 1, one core.

    python3 launch/bench_query_blocks.py --workdir=runs/suite/glove-6b-50d-lmi \
        --settings='[{"n_probe": 16, "route": "centroids", "reorder": 30}, {"n_probe": 18, "reorder": 30}]' \
        --out=benchmarks/bench_query_blocks.json

A caller searching one query per call should pay for one query, not for a block of `query_batch` (256:
the size that amortises the routers' dispatch in batch search). Every search path cuts queries into blocks
(`jaxidx.index.query_blocks`), which used to pad a short block to `query_batch` rows; it now pads to the next
power of two, and sparse XMC queries to a power-of-two width, so a jitted router compiles once per size.
Run against an older checkout (PYTHONPATH) to see the difference. Per index and setting: p50 / p99
microseconds of --queries single searches, timed one at a time after one untimed pass over them.
"""
from jaxidx.bench import pin_threads

if __name__ == "__main__":
    pin_threads(1)

import json  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import jaxidx  # noqa: E402
from jaxidx import bench  # noqa: E402
from jaxidx.data import load  # noqa: E402
from jaxidx.evaluate import format_results, test_queries  # noqa: E402
from jaxidx.train.batches import take  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "Trained runs or saved indexes.")
flags.DEFINE_multi_string("settings", [], "Search settings per --workdir, JSON list (default: the config's first).")
flags.DEFINE_integer("queries", 300, "Test queries searched one by one.")
flags.DEFINE_string("out", "out/bench_query_blocks.json", "JSON result path.")


def main(_):
    rows = []
    for i, wd in enumerate(FLAGS.workdir):
        index = jaxidx.load(wd)
        index.config.search.n_threads = 1
        data = load(index.config.data)
        queries = test_queries(data)
        one = [take(queries, np.arange(j, j + 1)) for j in range(FLAGS.queries)]
        settings = json.loads(FLAGS.settings[i]) if i < len(FLAGS.settings) else [index.config.search.settings[0]]
        own = index.config.search.query_batch
        for setting in settings:
            for block in (own, 1):
                index.config.search.query_batch = block
                times, _ = bench.one_by_one(lambda q: index.search(q, k=10, **setting), one)
                rows.append({"index": wd, "setting": json.dumps(setting), "query_batch": block,
                             "p50_us": 1e6 * float(np.median(times)), "p99_us": 1e6 * float(np.quantile(times, 0.99))})
                print(format_results(rows[-1:]), flush=True)
            index.config.search.query_batch = own
    print(format_results(rows))
    bench.write_json(FLAGS.out, {"machine": bench.machine(), "command": bench.command(), "rows": rows})


if __name__ == "__main__":
    app.run(main)
