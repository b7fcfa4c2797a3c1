"""Where an LMI search spends its time, per query on one core: routing, the re-rank kernel and the
rest (Python, id mapping), timed apart on a saved index, best of 5 warm passes over the data's queries.

    python3 launch/lmi_search_breakdown.py --index=runs/suite/<run>-lmi --data=<spec> --n_probe=1
"""
from jaxidx.bench import pin_threads_from_argv

pin_threads_from_argv()

from absl import app, flags  # noqa: E402

import jaxidx  # noqa: E402
from jaxidx.data import load  # noqa: E402
from jaxidx.evaluate import timed  # noqa: E402
from jaxidx.index import kernel_metric  # noqa: E402
from jaxidx.methods.lmi import candidate_runs, select_leaves  # noqa: E402
from jaxidx.search import host  # noqa: E402

flags.DEFINE_string("index", None, "A saved LMI index or training run directory.", required=True)
flags.DEFINE_string("data", None, "The data spec whose queries are searched.", required=True)
flags.DEFINE_integer("n_probe", 1, "Leaves probed per query.")
flags.DEFINE_integer("threads", 1, "Cores used (pinned before JAX starts).")
FLAGS = flags.FLAGS


def us_per_query(fn, n: int, repeats: int = 5) -> float:
    """Best of `repeats` warm runs of `fn`, in microseconds per query."""
    fn()
    return 1e6 * min(timed(fn, warm=False)[1] for _ in range(repeats)) / n


def main(_):
    index, data = jaxidx.load(FLAGS.index), load(FLAGS.data)
    q, p = data.queries, FLAGS.n_probe
    prepared = index._prepare(q)
    leaves = index._leaves(prepared, p)
    cand = candidate_runs(index.arrays["offsets"][0], leaves, select_leaves(index.sizes(), leaves))
    vectors, metric = index.arrays["vectors"], kernel_metric(index.metric)
    parts = {
        "search": us_per_query(lambda: index.search(q, 10, n_probe=p), len(q)),
        "routing (learned)": us_per_query(lambda: index._leaves(prepared, p), len(q)),
        "routing (centroids)": us_per_query(lambda: index._leaves(prepared, p, "centroids"), len(q)),
        "re-rank kernel": us_per_query(lambda: host.rerank_topk(prepared, vectors, cand, 10, metric, 1), len(q)),
    }
    parts["rest"] = parts["search"] - parts["routing (learned)"] - parts["re-rank kernel"]
    n_cand = cand[2].sum() / len(q)
    print(f"{FLAGS.data}: {len(q)} queries, n_probe {p}, {n_cand:.0f} candidates / query")
    for name, us in parts.items():
        print(f"  {name:<20} {us:8.2f} us / query")
    print(f"  kernel per candidate {1e3 * parts['re-rank kernel'] / n_cand:8.2f} ns")


if __name__ == "__main__":
    app.run(main)
