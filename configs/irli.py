"""IRLI presets: `--config=configs/irli.py:NAME` with NAME one of the keys of PRESETS.

Published settings (DESIGN.md): BLISS ANN B=4096, R=4, K=2, hidden 512, 20
epochs; IRLI XMC B=3000, R=16-32, K=10. The presets here are scaled to run on
a 2-core CPU; override any field with `--config.model.n_buckets=4096` etc.
"""
import math

import ml_collections

from jaxidx.config import base_config, budget_epochs, pow2_near, preset, probe_sweep
from jaxidx.data.synthetic import scaling_ann_spec, scaling_xmc_rows, scaling_xmc_spec


def _irli(data: str) -> ml_collections.ConfigDict:
    c = base_config("irli", data)
    c.model = ml_collections.ConfigDict()
    c.model.n_reps = 4          # R independent networks
    c.model.n_buckets = 256     # B
    c.model.hidden = (256,)     # d -> hidden (ReLU) -> B
    c.model.init_std = 0.05     # truncated-normal std of the original; 0 = lecun normal
    c.model.dense_input_max_features = 4096  # XMC: densify inputs up to this width, else embedding bag
    c.model.standardize = True  # ANN: the routers see (x - mean) / RMS scale of the base (angular: as is)
    c.model.loss = "softmax"    # 'softmax' (CE on normalised targets) or 'bce' (the original per-bucket
                                # sigmoid); softmax measured better on GloVe and XMC (BENCHMARKS.md)
    c.partition = ml_collections.ConfigDict()
    c.partition.init = "hash"           # the start: 'hash' (the paper's) or, ANN, 'kmeans' (per repetition)
    c.partition.kmeans_iter = 10        # with init 'kmeans': Lloyd iterations
    c.partition.kmeans_points_per_bucket = 256  # with init 'kmeans': fitted on a sample of this x B points
    c.partition.top_k = 2               # K candidate buckets per item in the load-balanced pass
    c.partition.repartition_every = 5   # epochs; 0 = never
    c.partition.final_repartition = False  # also re-partition after the last epoch
    c.partition.order = "random"        # item order of the greedy pass: 'index' or 'random'
    c.partition.capacity_factor = 0.0   # > 0: cap buckets at factor * N / B items
    c.partition.fallback_candidates = 32  # with a cap: ranked buckets an item may fall back to
    c.partition.center_scores = True    # rank buckets by logit minus the bucket's mean logit over items
    c.partition.center_sample = 0       # > 0: that mean over a seeded sample of this many items (0 = all)
    c.train.knn_k = 10                  # ANN: neighbours per training point (its labels)
    c.train.max_train_points = 0        # ANN: train on a seeded sample of the base (0 = all)
    c.index = ml_collections.ConfigDict()
    c.index.pq4_dims = 0  # ANN, > 0: also store a 4-bit PQ code of every vector, this many dimensions per
                          # sub-space, which search settings with reorder > 0 scan (-1 = chosen from the data)
    c.index.pq4_anisotropic = 0.0  # > 0 (angular, dot): ScaNN's score-aware loss, threshold T (pq4.py)
    return c


def _ann(c):
    """ANN partitions: cap loads at 1.5x the mean, falling back along each item's ranking."""
    c.partition.update(capacity_factor=1.5, top_k=2)
    return c


def tiny():
    c = _ann(_irli("synthetic-ann:n=3000,q=200,d=16,clusters=30,seed=0"))
    c.model.update(n_reps=2, n_buckets=16, hidden=(32,))
    c.train.update(epochs=4, batch_size=128, log_every=10, learning_rate=0.01)
    c.partition.repartition_every = 2
    c.search.settings = [{"m": 1, "min_count": 1}, {"m": 2, "min_count": 1}, {"m": 4, "min_count": 2}]
    return c


def tiny_xmc():
    c = _irli("synthetic-xmc:n=2000,test=300,features=300,labels=100,seed=0")
    c.model.update(n_reps=3, n_buckets=16, hidden=(32,))
    c.train.update(epochs=6, batch_size=128, log_every=10, learning_rate=0.01)
    c.partition.update(repartition_every=2, top_k=4)
    c.search.settings = [{"m": 2, "min_count": 1}, {"m": 4, "min_count": 2}, {"mode": "mach"}]
    return c


def glove_small():
    """The README's main job: 100K GloVe base vectors, about 10 minutes on 2 cores."""
    c = _ann(_irli("glove-6b-50d:base=100000,queries=2000"))
    c.model.update(n_reps=4, n_buckets=256, hidden=(256,))
    c.train.update(epochs=8, batch_size=512, log_every=50)
    c.partition.repartition_every = 2
    c.search.settings = [{"m": m, "min_count": mc} for m in (2, 4, 8, 16) for mc in (1, 2)]
    return c


def glove():
    """Full canonical GloVe 6B 50d split (390K base, 10K queries)."""
    c = _ann(_irli("glove-6b-50d"))
    c.model.update(n_reps=4, n_buckets=1024, hidden=(256,))
    c.train.update(epochs=10, batch_size=1024, log_every=50, max_train_points=200000)
    c.partition.repartition_every = 2
    c.search.settings = [{"m": m, "min_count": mc} for m in (4, 8, 16, 32, 64) for mc in (1, 2)]
    return c


def _xmc(data, n_reps, n_buckets, top_k, hidden=256, epochs=20):
    c = _irli(data)
    c.model.update(n_reps=n_reps, n_buckets=n_buckets, hidden=(hidden,))
    c.train.update(epochs=epochs, batch_size=256)
    c.partition.update(top_k=top_k, repartition_every=5)
    c.search.settings = [{"m": m, "min_count": 1} for m in (2, 5, 10)] + [{"mode": "mach"}]
    return c


def scaling_xmc(n_labels: int, steps: int = 128, n_test: int = 1000):
    """XMC scaling study (launch/bench_scaling.py) on `scaling_xmc_spec(n_labels)`: B = the power of two
    near 2 sqrt(L), which balances routing (R H B per query) against candidates (R m L / B); about `steps`
    steps of 256, rounded up to an even number of epochs (at least 2), re-partitioned once, halfway."""
    c = _xmc(scaling_xmc_spec(n_labels, n_test), n_reps=4, n_buckets=pow2_near(2 * math.sqrt(n_labels)), top_k=10,
             hidden=128)
    epochs = budget_epochs(scaling_xmc_rows(n_labels), c.train.batch_size, steps, multiple=2)
    c.train.epochs = epochs
    c.partition.repartition_every = epochs // 2
    c.search.settings = [{"m": 5, "min_count": 1}]  # the exhaustive MACH mode is O(L) per query: left out
    return c


def scaling_ann(n_base: int, epochs: int = 8, n_queries: int = 1000):
    """ANN scaling study on `scaling_ann_spec(n_base)`: B = the power of two near sqrt(N), R 4, hidden 128,
    trained on a 50K-point sample (its exact neighbours cost O(sample x N)), re-partitioned halfway."""
    c = _ann(_irli(scaling_ann_spec(n_base, n_queries)))
    c.model.update(n_reps=4, n_buckets=pow2_near(math.sqrt(n_base)), hidden=(128,))
    c.train.update(epochs=epochs, batch_size=512, max_train_points=50000)
    c.partition.repartition_every = max(1, epochs // 2)
    c.search.settings = ([{"m": m, "min_count": 1} for m in (1, 2, 4, 8, 16)]
                         + [{"m": m, "min_count": 2} for m in (2, 4, 8)])
    return c


def repetition_sweep(n_reps: int, probes: list[int]) -> list[dict]:
    """ANN search settings over m in `probes`, on the float rows (min_count 1, 2) and on the codes (reorder
    30, 100, 300), for all R repetitions (first, without `reps`, so that a setting a user passes inherits
    none) and for the first 1 and 2 (`reps`): where a bucket scan costs little beside R routers and
    merging R x m buckets, fewer repetitions are faster at equal recall (the sweep measures it per data)."""
    out = []
    for reps in sorted({n_reps, 2, 1} & set(range(1, n_reps + 1)), key=lambda r: r != n_reps):
        tag = {} if reps == n_reps else {"reps": reps}
        out += [{"m": m, "min_count": mc, **tag} for m in probes for mc in (1, 2) if mc <= reps]
        out += [{"m": m, "reorder": r, **tag} for m in probes for r in (30, 100, 300)]
    return out


def auto(data) -> ml_collections.ConfigDict:
    """Sized from the data (`jaxidx.fit("irli", data)`), by rules that follow its sizes only.

    ANN (N vectors of d): B = the power of two near sqrt(N) (2..4096), R 4, hidden the power of two near
    max(d, B) within 64..256, trained on at most 50K sampled points, fewer past N = 500K so that their
    exact neighbours (O(sample x N)) stay under 2.5e10 distances (at least 20K points), for 8 epochs,
    each repetition started from its own k-means (256 B points, 10 iterations) and re-partitioned every 2
    epochs (every 4 past N = 500K: each pass routes all N items) to its router's first choice (top_k 1)
    with bucket centres from 64K items, loads capped at 1.5x the mean; a 4-bit PQ code per vector with the
    dims per sub-space `pq4.choose_dims` picks from a simulated search; m swept in steps of at most 1.5x
    (`probe_sweep`, as IVF's nprobe) up to min(32, B / 2), each on the float rows with min_count 1 and 2,
    and on the codes with reorder 30, 100 and 300 (codes of the vectors, not residuals: coarser than
    LMI's, so one more step), searching all 4 repetitions or the first 1 or 2 (`repetition_sweep`).
    XMC (L labels, D features): B = the power of two near 2 sqrt(L) (the scaling rule: routing R H B
    against candidates R m L / B), R 16 below 10K labels else 8, K 4 up to 64 buckets else 10, hidden
    512 for dense inputs (D <= 4096) else 256, 20 epochs re-partitioned every 5; m swept, MACH up to 100K labels.
    """
    if data.task == "ann":
        n, d = data.n_items, data.dim
        B = min(4096, pow2_near(math.sqrt(n)))
        train = min(n, 50000, max(20000, int(2.5e10 // n)))
        c = _ann(_irli(data.name))
        c.model.update(n_reps=4, n_buckets=B, hidden=(min(256, max(64, pow2_near(max(d, B)))),))
        c.train.update(epochs=8, batch_size=min(512, max(64, pow2_near(train / 100))),
                       max_train_points=train if train < n else 0)
        # Each re-partition routes all N items through the R networks (about 50 s at N = 1M on 2 cores).
        # Each repetition starts from its own k-means, and an item then follows its router's first choice
        # unless that bucket is full (top_k 1: the 1.5x cap balances; K = 2's least-filled-of-two spreads
        # every cluster of the start over two buckets).
        c.partition.update(repartition_every=2 if n <= 500000 else 4, center_sample=65536, init="kmeans", top_k=1)
        c.index.pq4_dims = -1
        c.search.settings = repetition_sweep(4, probe_sweep(max(1, min(32, B // 2))))
    else:
        L = data.n_labels
        B = max(2, pow2_near(2 * math.sqrt(L)))
        c = _xmc(data.name, n_reps=16 if L < 10000 else 8, n_buckets=B, top_k=min(B, 4 if B <= 64 else 10),
                 hidden=512 if data.n_features <= 4096 else 256)
        c.search.settings = ([{"m": m, "min_count": 1} for m in (2, 5, 10) if m <= B]
                             + ([{"mode": "mach"}] if L <= 100000 else []))
    c.lock()
    return c


PRESETS = {
    "tiny": tiny,
    "tiny-xmc": tiny_xmc,
    "glove-small": glove_small,
    "glove": glove,
    "bibtex": lambda: _xmc("bibtex", n_reps=16, n_buckets=64, top_k=4, hidden=512),
    "delicious": lambda: _xmc("delicious", n_reps=16, n_buckets=128, top_k=5, hidden=512),
    "debian-depends": lambda: _xmc("debian-depends", n_reps=8, n_buckets=1000, top_k=10),
    **{f"scaling-xmc-{name}": (lambda n=n: scaling_xmc(n)) for name, n in (("10k", 10**4), ("100k", 10**5),
                                                                           ("1m", 10**6))},
    **{f"scaling-ann-{name}": (lambda n=n: scaling_ann(n)) for name, n in (("100k", 100000), ("390k", 390000),
                                                                           ("1m", 10**6))},
}


def get_config(arg=None):
    return preset(PRESETS, arg, "tiny", auto)
