"""ELIAS presets: `--config=configs/elias.py:NAME` with NAME one of the keys of PRESETS.

Published settings (DESIGN.md): max_leaf 100, alpha 10, beta 150, beam 20,
kappa 1000, K 2000, lambda 0.05, AdamW (weight decay 0.01), warmup 10% then
linear decay, encoder lr 2e-4 / classifier lr 5e-3 for a fine-tuned
transformer. Here the encoder is an MLP over tf-idf / bag-of-words trained
from scratch, kappa is 128-256 for small data, and epochs are scaled to a
2-core CPU. Stage 1 trains for train.epochs, stage 2 for train.stage2_epochs.
"""
import math

import ml_collections

from jaxidx.clustering import n_leaves_for
from jaxidx.config import base_config, budget_epochs, pow2_near, preset
from jaxidx.data.synthetic import scaling_xmc_rows, scaling_xmc_spec


def _elias(data: str) -> ml_collections.ConfigDict:
    c = base_config("elias", data)
    c.model = ml_collections.ConfigDict()
    c.model.input = "sparse"          # 'sparse': embedding-bag first layer; 'dense': densified features;
                                      # 'text': transformer over the rows' token ids (data sets with text)
    c.model.transformer = ml_collections.ConfigDict(
        {"dim": 128, "heads": 4, "layers": 2, "mlp_ratio": 4})  # for input 'text'; then hidden layers on top
    c.model.hidden = (512,)           # encoder widths; phi has width hidden[-1]
    c.model.dropout = 0.5             # on phi, as in the original
    c.model.init_std = 0.0            # encoder init: 0 = lecun normal, > 0 = truncated normal std
    c.model.max_leaf = 100            # C = 2^ceil(log2(L / max_leaf)) clusters
    c.model.cluster_groups = 0        # G > 0: a two-level cluster tree (G groups of C / G sibling clusters, beam at
                                      # each level: search reads G + group_beam x C / G classifier rows, not C);
                                      # 0: one flat classifier
    c.model.alpha = 10.0              # s_c = min(1, alpha * softmax)
    c.model.beta = 150.0              # a_cl = min(1, beta * row softmax)  (stage 2)
    c.model.beam = 20                 # b: clusters kept per example (also for the approximate adjacency)
    c.model.teacher_extra = 5         # training beam = b + this, the positives' clusters first
    c.model.kappa = 256               # labels per cluster row of the stage-2 adjacency
    c.model.keep_best_edge = True     # every label keeps its best row in A (else rare labels can lose all edges)
    c.model.shortlist = 2000          # K: labels scored per example in training
    c.model.lam = 0.05                # weight of the shortlist (path) loss
    c.model.layout = "dense"          # training arrays: 'dense' [batch, L] (fast on CPU for L up to ~1e5)
                                      # or 'sparse' [batch, K] (sort-based; no [batch, L] array, for huge L)
    c.model.label_multiple = 128      # label rows padded to a multiple of this (so 'model' sharding divides it)
    c.train.epochs = 10               # stage 1
    c.train.stage2_epochs = 10
    c.train.learning_rate = 5e-3      # classifiers (cluster, label, edge)
    c.train.encoder_learning_rate = 1e-3
    c.train.weight_decay = 0.01
    c.train.warmup = 0.1
    c.train.stage2_reinit_labels = True  # stage 2 starts the label classifiers afresh (as the original)
    c.train.label_optimizer = "auto"  # 'dense': AdamW over all L label rows each step; 'lazy': over the rows
                                      # in the step's shortlists only (O(batch K H), lazy Adam); 'auto': lazy
                                      # with the sparse layout
    c.ranker = ml_collections.ConfigDict()  # ELIAS++'s sparse ranker, trained as stage 3 (0 steps: none)
    c.ranker.steps = 0                # full-batch Adam steps over all (example, label) pairs
    c.ranker.negatives = 32           # ELIAS's top labels per training row paired with it (its hard negatives)
    c.ranker.rerank = 32              # default search setting rerank: ELIAS's top labels re-scored per query
    c.ranker.c = 4.0                  # per-label L2 regularisation 1 / (2C) |w_l|^2 beside C x the pairs' log loss
    c.ranker.learning_rate = 0.3
    c.ranker.prune = 1e-3             # weights with |w| at most this are dropped from the index
    c.ranker.weight = 0.5             # default search setting ranker_weight: the ranker's share of the log score
    c.search.query_batch = 256
    c.search.settings = [{"beam": 10, "shortlist": 200}, {"beam": 20, "shortlist": 500}]
    return c


RANKER_STEPS = 300  # full-batch steps of the sparse ranker where it is on (converged on bibtex / debian-depends)
TREE_MIN_CLUSTERS = 4096  # from here a two-level cluster tree routes faster than the flat classifier (measured:
                          # launch/bench_cluster_tree.py, 1.3x per query at C = 4096, 4x at 16384, 0.8x at 1024)


def tree_groups(n_clusters: int) -> int:
    """model.cluster_groups for C clusters: the power of two near sqrt(C) from TREE_MIN_CLUSTERS on (both levels
    about sqrt(C) wide), else 0 (the flat classifier)."""
    return pow2_near(math.sqrt(n_clusters)) if n_clusters >= TREE_MIN_CLUSTERS else 0


def tiny():
    """Synthetic, seconds: for tests and smoke runs."""
    c = _elias("synthetic-xmc:n=2000,test=300,features=300,labels=100,seed=0")
    c.model.update(hidden=(32,), max_leaf=10, beam=4, teacher_extra=2, kappa=16, shortlist=40, dropout=0.1)
    c.train.update(epochs=2, stage2_epochs=2, batch_size=128, log_every=10)
    c.search.settings = [{"beam": 4, "shortlist": 40}, {"beam": 4, "shortlist": 40, "backend": "device"}]
    return c


def bibtex():
    c = _elias("bibtex")
    c.model.update(input="dense", max_leaf=10, beam=8, kappa=64)
    c.train.update(epochs=20, stage2_epochs=20, batch_size=128)
    c.search.settings = [{"beam": 8, "shortlist": 159}, {"beam": 16, "shortlist": 159}]
    return c


def delicious():
    c = _elias("delicious")
    c.model.update(input="dense", max_leaf=32, beam=12, kappa=256)
    c.train.update(epochs=15, stage2_epochs=15, batch_size=256)
    c.search.settings = [{"beam": 12, "shortlist": 500}, {"beam": 32, "shortlist": 983}]
    return c


def debian_depends():
    """17860 long-tailed labels over sparse tf-idf: a wide embedding bag (hidden 1024 and dropout 0.2 beat
    512 / 0.5 by 2.5 points of P@1), stage 2 keeping stage 1's label classifiers (+1.5 points over
    re-initialising them) and the sparse ranker (+1.2 points; see BENCHMARKS.md, ELIAS)."""
    c = _elias("debian-depends")
    c.model.update(max_leaf=100, beam=20, kappa=256, hidden=(1024,), dropout=0.2)
    c.train.update(epochs=10, stage2_epochs=10, batch_size=256, stage2_reinit_labels=False)
    c.ranker.steps = RANKER_STEPS
    c.search.settings = [{"beam": 10, "shortlist": 200}, {"beam": 20, "shortlist": 500},
                         {"beam": 20, "shortlist": 500, "backend": "device"}]
    return c


def debian_depends_text():
    """debian-depends read as text (package name and short description) by a small transformer."""
    c = debian_depends()
    c.model.input = "text"
    return c


def auto(data) -> ml_collections.ConfigDict:
    """Sized from XMC data (`jaxidx.fit("elias", (X, Y))`), by rules that follow its sizes only (they give
    the tuned bibtex / delicious / debian-depends presets' values within a factor of two):
    leaves of max_leaf = the power of two near sqrt(L) within 8..100 labels (C ~ L / max_leaf clusters);
    beam C / 2 within 4..20; kappa 4 x max_leaf within 16..256; dense input, hidden 512 and dropout 0.5
    up to 4096 features, else an embedding bag, hidden 1024, dropout 0.2 and stage 2 keeping stage 1's
    label classifiers (the long-tail setting); the sparse training layout (shortlist arrays [batch, K] and
    lazy label-row updates, train.label_optimizer 'auto') above 65536 labels, where the dense layout's
    [batch, L] arrays pass 64 MB each; batch 128 below 8000 rows else 256; about 1000 steps per stage
    (epochs within 10..20); with the embedding bag (the long-tail setting) the sparse ranker as stage 3
    (it gave +1.2 points of P@1 on debian-depends, +0.3 on bibtex and nothing on delicious); a two-level
    cluster tree from C = 4096 clusters (`tree_groups`)."""
    L, n, D = data.n_labels, data.X_train.shape[0], data.n_features
    c = _elias(data.name)
    max_leaf = min(100, max(8, pow2_near(math.sqrt(L))))
    C = n_leaves_for(L, max_leaf)
    beam = min(20, max(4, C // 2), C)
    dense = D <= 4096
    c.model.update(input="dense" if dense else "sparse", max_leaf=max_leaf, beam=beam,
                   kappa=min(256, max(16, 4 * max_leaf)), hidden=(512,) if dense else (1024,),
                   dropout=0.5 if dense else 0.2, shortlist=min(2000, L),
                   layout="sparse" if L > 65536 else "dense", cluster_groups=tree_groups(C))
    batch = 128 if n < 8000 else 256
    epochs = min(20, max(10, round(1000 * batch / max(n, 1))))
    c.train.update(epochs=epochs, stage2_epochs=epochs, batch_size=batch, stage2_reinit_labels=dense)
    c.ranker.steps = 0 if dense else RANKER_STEPS
    c.search.settings = [{"beam": beam, "shortlist": min(500, L)},
                         {"beam": min(C, 2 * beam), "shortlist": min(1000, L)}]
    c.lock()
    return c


SCALING_MAX_CLUSTERS = 1024


def scaling_xmc(n_labels: int, steps: int = 128, max_clusters: int = SCALING_MAX_CLUSTERS, n_test: int = 1000,
                tree: bool | None = None):
    """XMC scaling study (launch/bench_scaling.py) on `scaling_xmc_spec(n_labels)`; sparse training layout
    (no [batch, L] array). C = 2^ceil(log2(L / max_leaf)) is capped at `max_clusters` by raising max_leaf
    (0: no cap, C ~ L / 100, whose cluster scoring per query grows linearly with L unless a tree routes
    them); the stage-2 rows hold kappa labels whatever L. A two-level cluster tree by `tree_groups` (tree
    None) or always / never (True / False). About `steps` steps of 256 per stage, rounded up to whole epochs."""
    c = _elias(scaling_xmc_spec(n_labels, n_test))
    max_leaf = max(100, -(-n_labels // max_clusters)) if max_clusters else 100
    C = n_leaves_for(n_labels, max_leaf)
    groups = tree_groups(C) if tree is None else pow2_near(math.sqrt(C)) if tree else 0
    c.model.update(hidden=(128,), dropout=0.2, max_leaf=max_leaf, beam=10, kappa=256, shortlist=500, layout="sparse",
                   cluster_groups=groups)
    epochs = budget_epochs(scaling_xmc_rows(n_labels), c.train.batch_size, steps)
    c.train.update(epochs=epochs, stage2_epochs=epochs)
    c.search.settings = [{"beam": 10, "shortlist": 200}]
    return c


PRESETS = {
    "tiny": tiny,
    "bibtex": bibtex,
    "delicious": delicious,
    "debian-depends": debian_depends,
    "debian-depends-text": debian_depends_text,
    **{f"scaling-xmc-{name}": (lambda n=n: scaling_xmc(n)) for name, n in (("10k", 10**4), ("100k", 10**5),
                                                                           ("1m", 10**6))},
}


def get_config(arg=None):
    return preset(PRESETS, arg, "tiny", auto)
