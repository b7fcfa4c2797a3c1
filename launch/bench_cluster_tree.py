"""ELIAS's cluster routing per query: the flat classifier against the two-level cluster tree, by C.

    python3 launch/bench_cluster_tree.py --out=benchmarks/cluster_tree_route.json

For each C (clusters), width H and beam b, random classifier weights and phi (routing cost does not depend on
training): the flat route (`route_clusters` without a tree, jitted: phi @ W [H, C], log softmax, top b) against
the tree's (G = the power of two near sqrt C groups; `route_groups` in JAX, then the C++ `tree_beam` over the
clusters of the top `group_beam` = b groups), on one core, timed per query in a batch of --batch queries and one
query at a time (p50), best of --repeats. Only the cluster routing: the encoder before it and the label merge and
ranking after it are the same for both. Prints a table and writes --out (JSON).
"""
from jaxidx.bench import pin_threads_from_argv

if __name__ == "__main__":
    pin_threads_from_argv(default=1)

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxidx import bench  # noqa: E402
from jaxidx.config import pow2_near  # noqa: E402
from jaxidx.evaluate import format_results  # noqa: E402
from jaxidx.methods.elias.maths import cluster_beam, cluster_log_probs, group_log_probs, log_cluster_scores  # noqa: E402
from jaxidx.search import host  # noqa: E402


def _best(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(C: int, H: int, beam: int, batch: int, repeats: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    G = pow2_near(math.sqrt(C))
    params = {"clusters": {"kernel": jnp.asarray(rng.standard_normal((H, C)) / math.sqrt(H), jnp.float32),
                           "bias": jnp.zeros(C, jnp.float32)},
              "groups": {"kernel": jnp.asarray(rng.standard_normal((H, G)) / math.sqrt(H), jnp.float32),
                         "bias": jnp.zeros(G, jnp.float32)}}
    flat_params = {"clusters": params["clusters"]}
    rows = np.ascontiguousarray(np.asarray(params["clusters"]["kernel"]).T)
    bias = np.asarray(params["clusters"]["bias"])
    group_beam = min(beam, G)

    @jax.jit
    def flat(phi):
        log_p = cluster_log_probs(flat_params, phi)
        return cluster_beam(log_p, log_cluster_scores(log_p, 10.0), beam)

    @jax.jit
    def groups(phi):
        return jax.lax.top_k(group_log_probs(params, phi), group_beam)

    def tree(phi):
        log_g, top = groups(phi)
        return host.tree_beam(np.asarray(phi), np.asarray(top, np.int32), np.asarray(log_g), rows, bias, G, beam, 1)

    phi = jnp.asarray(rng.standard_normal((batch, H)), jnp.float32)
    one = [phi[i:i + 1] for i in range(min(batch, 200))]
    out = []
    for name, fn in (("flat", lambda x: jax.block_until_ready(flat(x))), ("tree", tree)):
        per_query = _best(lambda: fn(phi), repeats) / batch * 1e6
        fn(one[0])
        lat = []
        for x in one:
            t0 = time.perf_counter()
            fn(x)
            lat.append(time.perf_counter() - t0)
        out.append({"C": C, "H": H, "beam": beam, "route": name, "groups": G if name == "tree" else 0,
                    "rows_read_per_query": C if name == "flat" else G + group_beam * (C // G),
                    "us_per_query_batch": per_query, "latency_us_p50": float(np.median(lat)) * 1e6})
    flat_row, tree_row = out
    tree_row["speedup_batch"] = flat_row["us_per_query_batch"] / tree_row["us_per_query_batch"]
    tree_row["speedup_latency"] = flat_row["latency_us_p50"] / tree_row["latency_us_p50"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", default="256,1024,4096,16384,65536")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="cores (pinned before JAX starts)")
    ap.add_argument("--out", default="benchmarks/cluster_tree_route.json")
    args = ap.parse_args()
    rows = [r for C in map(int, args.clusters.split(",")) for r in measure(C, args.hidden, args.beam, args.batch,
                                                                         args.repeats)]
    print(format_results(rows), flush=True)
    bench.write_json(args.out, {"machine": bench.machine(), "command": bench.command(), "rows": rows})


if __name__ == "__main__":
    main()
