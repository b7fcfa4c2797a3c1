"""Where an LMI or IRLI search spends its time, per query on one core: routing, the host kernels and the
rest (Python, id mapping), timed apart on a saved index, best of 5 warm passes over the data's queries.

    python3 launch/search_breakdown.py --index=runs/suite/<run>-lmi --data=<spec> --setting='{"n_probe": 1}'
    python3 launch/search_breakdown.py --index=runs/suite/<run>-irli --data=<spec> --setting='{"m": 16, "min_count": 2}'
    python3 launch/search_breakdown.py --index=runs/suite/<run>-lmi --data=<spec> --quantize=2 \
        --setting='{"n_probe": 24, "route": "centroids", "reorder": 100}'

An LMI setting with `reorder` times the 4-bit PQ kernel twice: at its reorder and at reorder 10, whose
difference is what re-ranking `reorder` candidates costs (the reservoir of the best and their exact
distances) over the fast scan itself.

IRLI's kernel is timed fused (`merge_rerank_topk`, what search runs) and as its two halves
(`merge_candidates`, then `rerank_topk` on the candidate lists), to show what the fusion saves.
"""
from jaxidx.bench import pin_threads_from_argv

pin_threads_from_argv()

import json  # noqa: E402

from absl import app, flags  # noqa: E402

import jaxidx  # noqa: E402
from jaxidx.data import load  # noqa: E402
from jaxidx.evaluate import timed  # noqa: E402
from jaxidx.index import kernel_metric  # noqa: E402
from jaxidx.methods.lmi import candidate_runs, select_leaves  # noqa: E402
from jaxidx.search import host  # noqa: E402

flags.DEFINE_string("index", None, "A saved LMI or IRLI index or training run directory.", required=True)
flags.DEFINE_string("data", None, "The data spec whose queries are searched.", required=True)
flags.DEFINE_string("setting", '{"n_probe": 1}', "The search setting, JSON (LMI: n_probe; IRLI: m, min_count, reps).")
flags.DEFINE_integer("threads", 1, "Cores used (pinned before JAX starts).")
flags.DEFINE_integer("quantize", 0, "> 0: give the LMI index 4-bit PQ codes of this many dims per sub-space first.")
FLAGS = flags.FLAGS


def us_per_query(fn, n: int, repeats: int = 5) -> float:
    """Best of `repeats` warm runs of `fn`, in microseconds per query."""
    fn()
    return 1e6 * min(timed(fn, warm=False)[1] for _ in range(repeats)) / n


def lmi_parts(index, prepared, setting: dict):
    """(timed parts, the parts search runs, candidates per query) of an LMI search."""
    p, route, reorder = setting["n_probe"], setting.get("route", "learned"), setting.get("reorder", 0)
    leaves = index._leaves(prepared, p, route)
    lens = select_leaves(index.sizes(), leaves, setting.get("max_candidates", 0))
    offsets, vectors = index.arrays["offsets"][0], index.arrays["vectors"]
    cand = candidate_runs(offsets, leaves, lens)
    metric, n = kernel_metric(index.metric), len(prepared)
    parts = {
        "routing (learned)": us_per_query(lambda: index._leaves(prepared, p), n),
        "routing (centroids)": us_per_query(lambda: index._leaves(prepared, p, "centroids"), n),
        "re-rank kernel": us_per_query(lambda: host.rerank_topk(prepared, vectors, cand, 10, metric, 1), n),
    }
    kernel = "re-rank kernel"
    if reorder:
        codes, block_offsets, terms = index.pq4_blocks()
        a = index.arrays

        def pq4(r):
            return lambda: host.pq4_search(prepared, vectors, codes, a["pq4_codebooks"], a.get("pq4_centres"),
                                           offsets, block_offsets, leaves, lens.astype("int32"), r, 10, metric, 1,
                                           terms)
        kernel = f"pq4 kernel (reorder {reorder})"
        parts[kernel] = us_per_query(pq4(reorder), n)
        parts["pq4 kernel (reorder 10)"] = us_per_query(pq4(10), n)
    return parts, (f"routing ({route})", kernel), cand[2].sum() / n


def irli_parts(index, prepared, setting: dict):
    """(timed parts, the parts search runs, candidates per query) of an IRLI search."""
    m, mc, reps = setting["m"], setting.get("min_count", 1), setting.get("reps", index.n_reps)
    ids, _ = index.route(prepared, m, reps)
    off, mem, vectors = index.arrays["offsets"][:reps], index.arrays["members"][:reps], index.arrays["vectors"]
    metric, n = kernel_metric(index.metric), len(prepared)
    cand = host.merge_candidates(ids, off, mem, mc, 10, len(vectors), 1)
    parts = {
        "routing": us_per_query(lambda: index.route(prepared, m, reps), n),
        "merge + re-rank, fused": us_per_query(
            lambda: host.merge_rerank_topk(prepared, vectors, ids, off, mem, 10, mc, metric, 1), n),
        "merge_candidates": us_per_query(lambda: host.merge_candidates(ids, off, mem, mc, 10, len(vectors), 1), n),
        "rerank_topk (ids)": us_per_query(lambda: host.rerank_topk(prepared, vectors, cand[:2], 10, metric, 1), n),
    }
    return parts, ("routing", "merge + re-rank, fused"), cand[2].sum() / n


def main(_):
    index, data = jaxidx.load(FLAGS.index), load(FLAGS.data)
    if FLAGS.quantize:
        index.quantize(FLAGS.quantize)
    setting, q = json.loads(FLAGS.setting), data.queries
    prepared = index._prepare(q)
    parts_of = {"lmi": lmi_parts, "irli": irli_parts}[index.method]
    parts, searched, n_cand = parts_of(index, prepared, setting)
    parts = {"search": us_per_query(lambda: index.search(q, 10, **setting), len(q)), **parts}
    parts["rest"] = parts["search"] - sum(parts[p] for p in searched)
    print(f"{FLAGS.data} ({index.method}): {len(q)} queries, {setting}, {n_cand:.0f} candidates / query")
    for name, us in parts.items():
        print(f"  {name:<24} {us:8.2f} us / query")
    print(f"  kernel per candidate     {1e3 * parts[searched[1]] / n_cand:8.2f} ns")


if __name__ == "__main__":
    app.run(main)
