"""LMI presets: `--config=configs/lmi.py:NAME` with NAME one of the keys of PRESETS.

`starter` is the seed's starter pack (one level of B buckets, L2 k-means labels,
MLP d -> 512 -> 384 -> B, 10 epochs, batch 256, top-1 bucket); the others are
the full variant (a tree of `model.levels`, about sqrt(N) leaves, spherical
k-means for angular data, soft targets, n_probe and candidate-budget sweeps);
on GloVe one level beats a two-level tree (BENCHMARKS.md, "LMI"). Override any
field, e.g. `--config.model.levels='(64, 64)' --config.model.hidden='((512,), (128,))'`.
"""
import math

import ml_collections

from jaxidx.config import base_config, pow2_near, preset, probe_sweep
from jaxidx.data.synthetic import scaling_ann_spec


def _lmi(data: str) -> ml_collections.ConfigDict:
    c = base_config("lmi", data)
    c.model = ml_collections.ConfigDict()
    c.model.levels = (32, 32)               # children per node, per level; leaves = product
    c.model.hidden = ((512,), (128,))       # MLP widths of the nodes of each level: d -> widths (ReLU) -> children
    c.model.init_std = 0.0                  # 0 = lecun normal; > 0: truncated normal with this std
    c.model.standardize = True              # k-means and the MLPs see (x - mean) / RMS scale of the base (angular:
                                            # as is), so a preset trains the same on any scale; re-rank: raw vectors
    c.kmeans = ml_collections.ConfigDict()
    c.kmeans.kind = "auto"                  # 'auto' (spherical for angular data), 'l2' or 'spherical'
    c.kmeans.init = "kmeans++"              # or 'random'
    c.kmeans.n_iter = 20
    c.kmeans.max_points_per_centroid = 256  # each node's k-means fits a seeded sample of this x children (0 = all)
    c.kmeans.init_points_per_centroid = 32  # k-means++ seeds come from a sample of this x children (0 = all)
    c.kmeans.balance = 0.0                  # > 0: a leaf holds at most this x the mean leaf size, in the k-means
                                            # labels and when the networks place the base (0 = unbounded)
    c.train.node_batch_size = 0             # per-node batch below the root (0 = batch_size / nodes of the level)
    c.train.target_temperature = 0.02       # > 0: soft targets softmax(k-means score / T) over a node's children,
                                            # which teach the ranking of the runner-up buckets; 0 = hard labels
    c.index = ml_collections.ConfigDict()
    c.index.repair_empty = True             # a leaf the networks leave empty takes back its k-means points
    c.index.pq4_dims = 0                    # > 0: also store 4-bit PQ codes, this many dimensions per sub-space,
                                            # which search settings with reorder > 0 scan (0 = float rows only;
                                            # -1 = dims chosen from the data, pq4.choose_dims)
    c.index.pq4_residual = True             # codes of x minus its leaf's mean (finer than codes of x)
    c.index.pq4_anisotropic = 0.0           # > 0 (angular, dot): ScaNN's score-aware loss, threshold T (pq4.py)
    c.index.sq8 = False                     # also store 8-bit codes (one byte per dimension, sq8.py), which
                                            # settings with reorder > 0 and codes='sq8' scan
    c.search.query_batch = 256              # queries per routing block (the re-rank takes lmi.RERANK_QUERIES)
    c.search.settings = [{"n_probe": p} for p in (1, 2, 4, 8, 16, 32, 64, 128)]
    return c


def tiny():
    """Synthetic clusters, seconds on one core."""
    c = _lmi("synthetic-ann:n=3000,q=200,d=16,clusters=30,seed=0")
    c.model.update(levels=(4, 4), hidden=((32,), (16,)))
    c.kmeans.n_iter = 10
    c.train.update(epochs=4, batch_size=64, log_every=10)
    c.search.settings = [{"n_probe": 1}, {"n_probe": 2}, {"n_probe": 4}, {"n_probe": 4, "max_candidates": 300}]
    return c


def starter():
    """The seed's starter LMI (its example: 100K vectors, 320 buckets) on 100K GloVe vectors."""
    c = _lmi("glove-6b-50d:base=100000,queries=2000")
    c.model.update(levels=(320,), hidden=((512, 384),))
    c.kmeans.update(kind="l2", max_points_per_centroid=0)  # L2 k-means on the whole data
    c.train.update(epochs=10, batch_size=256, learning_rate=1e-3, target_temperature=0.0)  # hard labels
    c.index.repair_empty = False                           # empty / uneven buckets allowed
    c.search.settings = [{"n_probe": 1}, {"n_probe": 2}, {"n_probe": 4}, {"n_probe": 8}]
    return c


def glove_small():
    """100K GloVe base vectors, 256 leaves in one level (the tree: --config.model.levels='(16, 16)'
    --config.model.hidden='((512,), (128,))')."""
    c = _lmi("glove-6b-50d:base=100000,queries=2000")
    c.model.update(levels=(256,), hidden=((512,),))
    c.train.update(epochs=10, batch_size=512)
    c.search.settings = ([{"n_probe": p} for p in (1, 2, 4, 8, 16, 32, 64)]
                         + [{"n_probe": 32, "max_candidates": b} for b in (2000, 4000, 8000)])
    return c


def glove():
    """Full canonical GloVe 6B 50d split (390K base, 10K queries), 1024 leaves in one level: on GloVe a
    one-level tree keeps the flat k-means partition, which a [32, 32] tree loses recall to (BENCHMARKS.md)."""
    c = _lmi("glove-6b-50d")
    c.model.update(levels=(1024,), hidden=((512,),))
    c.train.update(epochs=10, batch_size=1024)
    # n_probe sweep, then candidate budgets: leaves best first until the budget is spent, which
    # evens out the work per query and gains recall per candidate over a fixed n_probe.
    c.search.settings = ([{"n_probe": p} for p in (1, 2, 4, 8, 16, 32, 64, 128)]
                         + [{"n_probe": 64, "max_candidates": b} for b in (4000, 8000, 10000, 12000, 16000)])
    return c


def scaling_ann(n_base: int, examples: int = 2 * 10**6, n_queries: int = 1000):
    """ANN scaling study (launch/bench_scaling.py) on `scaling_ann_spec(n_base)`: one level of B leaves, B =
    the power of two near sqrt(N), MLP d -> 128 -> B, trained on about `examples` vectors (whole epochs, at
    least one); searched at fixed candidate budgets."""
    c = _lmi(scaling_ann_spec(n_base, n_queries))
    leaves = pow2_near(math.sqrt(n_base))
    c.model.update(levels=(leaves,), hidden=((128,),))
    c.train.update(epochs=max(1, round(examples / n_base)), batch_size=1024)
    # Leaves best first until the budget is spent; n_probe (4x the leaves a budget needs on average) bounds
    # the routing's top-k, which over all 2048 leaves cost 5.7x the queries/s at 4M (BENCHMARKS.md, "Scaling").
    c.search.settings = [{"n_probe": min(leaves, max(8, math.ceil(4 * b * leaves / n_base))), "max_candidates": b}
                         for b in (250, 500, 1000, 2000, 4000, 8000, 16000) if b <= n_base // 2]
    return c


def auto(data) -> ml_collections.ConfigDict:
    """Sized from an ANN data set (`jaxidx.fit("lmi", x)`), by rules that follow N and d only:
    one level of B = the power of two near sqrt(N) leaves (2..4096), each holding at most 2x the mean
    (balanced k-means and capacity-bounded placement: plain k-means leaves reach 14-44x the mean on
    bag-of-words and tf-idf rows, BENCHMARKS.md); MLP d -> W -> B with W the power of two near
    max(d, B), within 64..512; about 2M training examples (epochs = round(2e6 / N), within 3..20), batch
    the power of two near N / 100 (64..1024); soft targets; n_probe swept 1, 2, 3, 4, 6, ... up to
    every leaf (and candidate budgets), which covers recall@10 0.8-0.99 on the sets measured. Rows also
    get residual 4-bit PQ codes with the dims per sub-space `pq4.choose_dims` picks from a simulated search
    on the data, and 8-bit codes (`sq8`, one byte per dimension); every n_probe is searched on the float
    rows, on the 4-bit codes with reorder 30 and 100 and on the 8-bit ones with reorder 10 and 20 (the
    re-ranks that won at recall 0.90 and 0.95 on the suite, BENCHMARKS.md): a short scan favours the float
    rows or the 8-bit codes, a long one the 4-bit codes. Inner-product data (angular, dot) get anisotropic
    4-bit codes, ScaNN's threshold 0.2 (on GloVe they make 2 dims per sub-space the fastest, 1.05x plain
    PQ's best, BENCHMARKS.md)."""
    n, d = data.n_items, data.dim
    leaves = min(4096, pow2_near(math.sqrt(n)))
    c = _lmi(data.name)
    c.model.update(levels=(leaves,), hidden=((min(512, max(64, pow2_near(max(d, leaves)))),),))
    c.kmeans.balance = 2.0
    c.index.pq4_dims = -1
    c.index.pq4_anisotropic = 0.2 if data.metric in ("angular", "dot") else 0.0
    c.index.sq8 = True
    c.train.update(epochs=min(20, max(3, round(2e6 / n))), batch_size=min(1024, max(64, pow2_near(n / 100))))
    probes = probe_sweep(leaves)
    budget_probe = max(p for p in probes if p <= max(1, leaves // 2))
    codes = [{}, {"reorder": 30}, {"reorder": 100}, {"reorder": 10, "codes": "sq8"}, {"reorder": 20, "codes": "sq8"}]
    c.search.settings = ([{"n_probe": p, **code} for p in probes for code in codes]
                         + [{"n_probe": budget_probe, "max_candidates": b} for b in (1000, 2000, 4000, 8000)
                            if b < n // 4])
    c.lock()
    return c


SCALING_ANN_SIZES = (("100k", 100000), ("390k", 390000), ("1m", 1000000), ("4m", 4000000))
PRESETS = {"tiny": tiny, "starter": starter, "glove-small": glove_small, "glove": glove,
           **{f"scaling-ann-{name}": (lambda n=n: scaling_ann(n)) for name, n in SCALING_ANN_SIZES}}


def get_config(arg=None):
    return preset(PRESETS, arg, "tiny", auto)
