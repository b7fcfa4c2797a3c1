"""LMI, the learned metric index: a tree of k-means + MLP nodes over ANN base vectors.

Each node of level l splits its points into `levels[l]` children: k-means
gives the children's training labels, an MLP learns to predict them (hard
labels as in the original, or soft targets softmax(k-means score / T) that
also rank the runner-up children), and in the end every base vector goes to
the leaf the networks predict (the leaf of largest path probability, the
product of the children's softmax probabilities along the path). A one-level
tree with hard labels and top-1 search is the seed's starter LMI.

Training is one `fit`: the params hold every node, stacked per level
(`RepeatedMLP` with one net per node), and each step trains all levels at
once: level 0 on a batch of the epoch's permutation, and each node of a
deeper level on its own batch of the points k-means put under it (drawn with
replacement, so every node gets the same number of updates). The k-means tree
is built before training, so every node's labels are known up front and all
levels train together in one jitted step, with one checkpoint and one resume;
a fit per level would only be needed to train children on the points their
parent's network (rather than k-means) routes to them.

Search visits leaves in descending path probability (empty leaves skipped)
until `n_probe` leaves are visited or `max_candidates` are gathered, then
re-ranks the candidates exactly (inner product for angular data) with
`rerank_topk`. Base vectors are stored contiguous per leaf, so a probe is a
contiguous scan, passed to the kernel as a run of rows; results are original ids.
A quantized index (`LMIIndex.quantize`, or `index.pq4_dims` in the config) also
holds 4-bit PQ codes of its rows (`jaxidx.pq4`); the setting `reorder` > 0 then
scores the probed leaves from the codes (`pq4_search`, fast scan) and re-ranks
only the `reorder` best exactly. 8-bit codes (`LMIIndex.quantize_sq8`, `index.sq8`;
`jaxidx.sq8`) do the same with codes='sq8' in the setting (`sq8_search`).
"""
from __future__ import annotations

import logging
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse
from jax.sharding import PartitionSpec as P

from jaxidx import kmeans as km
from jaxidx import pq4, sq8
from jaxidx import search as kernels
from jaxidx.data.types import ANNData
from jaxidx.data.ann import normalize_rows
from jaxidx.index import Index, dense_rows, is_int, kernel_metric, query_blocks, rows_of_ids
from jaxidx.methods.common import SearchResult, input_standardizer, standardize, validate_common
from jaxidx.models.router import MLP, RepeatedMLP
from jaxidx.partition import Partition, bucket_stats
from jaxidx.search.sharded import ShardedLayout, default_mesh
from jaxidx.train import batches as B_
from jaxidx.train import mesh as mesh_lib

log = logging.getLogger(__name__)

RERANK_QUERIES = 4096  # queries per re-rank kernel call (its scan is leaf-major: see kernels/rerank.cpp)

KMEANS_KINDS = ("auto", "l2", "spherical")


# --- pure model maths ------------------------------------------------------------------------------
def apply_nodes(mlp: MLP, nets: dict, x: jax.Array) -> jax.Array:
    """Each node's MLP on its own inputs: stacked params [n, ...], x [b, n, d] -> logits [b, n, C]."""
    return jax.vmap(lambda p, xi: mlp.apply({"params": p}, xi)[1], in_axes=(0, 1), out_axes=1)(nets, x)


def centroid_targets(x: jax.Array, centroids: jax.Array, temperature: float, spherical: bool) -> jax.Array:
    """Soft targets [b, n, C]: softmax over each node's children of the k-means score (inner product if
    spherical, else -squared distance up to a per-point constant) divided by the temperature.
    x [b, n, d], centroids [n, C, d]; all-zero centroids (children without points) get no mass."""
    ip = jnp.einsum("bnd,ncd->bnc", x, centroids)
    score = ip if spherical else 2.0 * ip - jnp.sum(centroids * centroids, -1)[None]
    valid = jnp.any(centroids != 0, axis=-1)[None]
    return jax.nn.softmax(jnp.where(valid, score / temperature, -jnp.inf), axis=-1)


def node_loss(logits: jax.Array, labels: jax.Array, weight: jax.Array,
              targets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy of each node on its children's k-means labels, or on soft `targets`
    when given: (weighted mean loss, accuracy of the argmax against the labels)."""
    if targets is None:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    else:
        ce = optax.softmax_cross_entropy(logits, targets)
    denom = jnp.maximum(weight.sum(), 1.0)
    acc = ((logits.argmax(-1) == labels) * weight).sum() / denom
    return (ce * weight).sum() / denom, acc


def leaf_log_probs(level_logits: list[jax.Array]) -> jax.Array:
    """Path log-probabilities of every leaf [b, L] from each level's logits [b, n_l, C_l].

    Node j of level l+1 is child j % C_l of node j // C_l, so a leaf's id is its
    path read as mixed-radix digits and log p(leaf) = sum of log-softmaxes on the path.
    """
    logp = jnp.zeros((level_logits[0].shape[0], 1), jnp.float32)
    for logits in level_logits:
        logp = (logp[:, :, None] + jax.nn.log_softmax(logits, axis=-1)).reshape(logp.shape[0], -1)
    return logp


def select_leaves(sizes: np.ndarray, leaves: np.ndarray, max_candidates: int = 0) -> np.ndarray:
    """Which of each query's ranked leaves [Q, P] (-1 = none) are visited: all of them, or, with
    a budget, leaves in order while fewer than `max_candidates` candidates are gathered
    (the first leaf always). Returns the visited leaves' sizes [Q, P] (0 = not visited)."""
    lens = np.where(leaves >= 0, sizes[np.maximum(leaves, 0)], 0).astype(np.int64)
    if max_candidates:
        before = np.cumsum(lens, axis=1) - lens
        lens[:, 1:] *= before[:, 1:] < max_candidates
    return lens


def candidate_runs(offsets: np.ndarray, leaves: np.ndarray, lens: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR runs (run_offsets [Q+1] int64, run_starts int32, run_lens int32) of the layout rows of each
    query's visited leaves for `rerank_topk`: leaf b's rows are offsets[b]:offsets[b+1], one run per
    ranked leaf (length 0 where not visited), so no candidate id list is ever built."""
    q, p = lens.shape
    run_offsets = np.arange(0, q * p + 1, p, dtype=np.int64)
    return run_offsets, offsets[np.maximum(leaves, 0)].astype(np.int32).ravel(), lens.astype(np.int32).ravel()


def repair_empty(leaf: np.ndarray, kmeans_leaf: np.ndarray, n_leaves: int) -> tuple[np.ndarray, int]:
    """A leaf the networks give no points takes back the points k-means put in it.
    Returns (new leaf of every point, number of points moved)."""
    empty = np.bincount(leaf, minlength=n_leaves) == 0
    move = empty[kmeans_leaf]
    return np.where(move, kmeans_leaf, leaf).astype(np.int32), int(move.sum())


# --- k-means tree ----------------------------------------------------------------------------------
def kmeans_tree(x: np.ndarray, levels, *, spherical: bool, n_iter: int, init: str, max_points_per_centroid: int,
                init_points_per_centroid: int, seed: int, balance: float = 0.0,
                mesh=None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Hierarchical k-means: each node's points are clustered into `levels[l]` children (each child
    holding at most `balance` x the node's mean child size, when balance > 0).

    Returns labels [depth, N] (each point's node id at depth l+1, mixed-radix as in
    `leaf_log_probs`) and the centroids of each level [n_l, C_l, d]. A node with
    fewer points than children gives one point per child and leaves the rest empty.
    """
    n, d = x.shape
    node = np.zeros(n, np.int64)
    labels, centroids = [], []
    for lvl, C in enumerate(levels):
        n_nodes = math.prod(levels[:lvl])
        cents = np.zeros((n_nodes, C, d), np.float32)
        child = np.zeros(n, np.int64)
        order = np.argsort(node, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(node, minlength=n_nodes))])
        for j in range(n_nodes):
            idx = order[bounds[j]:bounds[j + 1]]
            if len(idx) < C:
                child[idx] = np.arange(len(idx))
                cents[j, :len(idx)] = x[idx]
                continue
            r = km.kmeans(x[idx], C, n_iter=n_iter, init=init, spherical=spherical,
                          sample=max_points_per_centroid * C, init_sample=init_points_per_centroid * C,
                          seed=(seed * 1_000_003 + lvl * 10_007 + j) % (2**31), balance=balance, mesh=mesh)
            child[idx] = r.labels
            cents[j] = r.centroids
        node = node * C + child
        labels.append(node.astype(np.int32))
        centroids.append(cents)
    return np.stack(labels), centroids


def validate_config(config, data) -> None:
    m, t = config.model, config.train
    validate_common(config)
    if not isinstance(data, ANNData):
        raise TypeError(f"LMI indexes ANN data; got {type(data).__name__}")
    levels = tuple(m.levels)
    if not levels or min(levels) < 2:
        raise ValueError(f"model.levels: need at least one level and >= 2 children per node, got {levels}")
    if len(m.hidden) != len(levels):
        raise ValueError(f"model.hidden: one tuple of widths per level ({len(levels)}), got {len(m.hidden)}")
    if config.kmeans.kind not in KMEANS_KINDS:
        raise ValueError(f"kmeans.kind: unknown {config.kmeans.kind!r}; valid: {', '.join(KMEANS_KINDS)}")
    if config.kmeans.init not in km.INITS:
        raise ValueError(f"kmeans.init: unknown {config.kmeans.init!r}; valid: {', '.join(km.INITS)}")
    for name in ("n_iter", "max_points_per_centroid", "init_points_per_centroid"):
        if config.kmeans[name] < 0:
            raise ValueError(f"kmeans.{name}: must be >= 0, got {config.kmeans[name]}")
    if config.kmeans.balance and config.kmeans.balance < 1:
        raise ValueError(f"kmeans.balance: must be 0 (unbounded) or >= 1 (max leaf / mean leaf size), "
                         f"got {config.kmeans.balance}")
    if t.target_temperature < 0:
        raise ValueError(f"train.target_temperature: must be >= 0 (0 = hard labels), got {t.target_temperature}")
    if t.node_batch_size < 0:
        raise ValueError(f"train.node_batch_size: must be >= 0 (0 = auto), got {t.node_batch_size}")
    pq4.check_config(config)
    sq8.check_config(config)
    n_leaves = math.prod(levels)
    for s in config.search.settings:
        if not 1 <= s.get("n_probe", 0) <= n_leaves:
            raise ValueError(f"search.settings: n_probe={s.get('n_probe')} must be in [1, {n_leaves} leaves]")
        if s.get("max_candidates", 0) < 0:
            raise ValueError(f"search.settings: max_candidates={s['max_candidates']} must be >= 0 (0 = no budget)")


class LMI:
    """Trainable LMI tree on ANN data; `index(params, aux)` gives the searchable index."""

    name, task = "lmi", "ann"

    def __init__(self, config, data, mesh):
        validate_config(config, data)
        self.config, self.data, self.mesh = config, data, mesh
        m, t = config.model, config.train
        self.levels = tuple(int(c) for c in m.levels)
        self.n_nodes = [math.prod(self.levels[:lvl]) for lvl in range(len(self.levels))]
        self.n_leaves = math.prod(self.levels)
        self.mlps = [MLP(tuple(h), c, 0, m.init_std) for h, c in zip(m.hidden, self.levels)]
        self.models = router_models(config)
        kind = config.kmeans.kind
        self.spherical = kind == "spherical" or (kind == "auto" and data.metric == "angular")
        n_data = mesh_lib.data_size(mesh)
        self.batch_size = t.batch_size
        # Per-node batch of the deeper levels: given, or the level's share of the batch (a multiple of the
        # data-parallel devices, as every batch array is split over them).
        self.node_batch = [t.batch_size] + [
            t.node_batch_size or n_data * max(1, math.ceil(t.batch_size / n / n_data)) for n in self.n_nodes[1:]]
        for lvl, bs in enumerate(self.node_batch):
            if bs % n_data:
                raise ValueError(f"train.node_batch_size: {bs} (level {lvl}) is not divisible by the {n_data} "
                                 f"data-parallel devices")
        # k-means, the networks and their soft targets see standardised vectors; the index re-ranks raw ones.
        self.input_center, self.input_scale = input_standardizer(data.base, data.metric, m.standardize)
        identity = not self.input_center.any() and self.input_scale == 1
        self.x = data.base if identity else standardize(data.base, self.input_center, self.input_scale)
        self.steps_per_epoch = B_.steps_per_epoch(data.n_items, self.batch_size)
        self._tree = None  # k-means tree labels the batches are drawn from (set by init / device_aux)

    # --- Trainable ---------------------------------------------------------------------------------
    def init(self, rng):
        if self._tree is None:
            k = self.config.kmeans
            labels, cents = kmeans_tree(self.x, self.levels, spherical=self.spherical, n_iter=k.n_iter, init=k.init,
                                        max_points_per_centroid=k.max_points_per_centroid,
                                        init_points_per_centroid=k.init_points_per_centroid, seed=self.config.seed,
                                        balance=k.balance, mesh=self.mesh)
            self._set_tree(labels)
            self._centroids = cents
            log.info("k-means tree %s: leaf sizes %s", list(self.levels), _size_stats(self._sizes[-1]))
        params = {f"level{lvl}": jax.jit(model.init)(jax.random.fold_in(rng, lvl), self.x[:1])["params"]
                  for lvl, model in enumerate(self.models)}
        aux = {"labels": self._tree, "leaf": np.full(self.data.n_items, -1, np.int32),
               "input_center": self.input_center, "input_scale": self.input_scale}
        aux.update({f"centroids{lvl}": c for lvl, c in enumerate(self._centroids)})
        return params, aux

    def optimizer(self, total_steps):
        return optax.adam(self.config.train.learning_rate)

    def loss(self, params, batch, aux, rng):
        total, metrics = 0.0, {}
        tau = self.config.train.target_temperature
        for lvl, mlp in enumerate(self.mlps):
            x = batch[f"x{lvl}"]
            logits = apply_nodes(mlp, params[f"level{lvl}"]["nets"], x)
            targets = centroid_targets(x, aux[f"centroids{lvl}"], tau, self.spherical) if tau > 0 else None
            loss, acc = node_loss(logits, batch[f"y{lvl}"], batch[f"w{lvl}"], targets)
            total = total + loss
            metrics[f"loss{lvl}"], metrics[f"accuracy{lvl}"] = loss, acc
        return total, metrics

    def batch(self, epoch, index):
        order = B_.epoch_order(self.data.n_items, self.config.seed, epoch)
        shard = mesh_lib.process_shard(self.mesh)
        rows, weight = B_.batch_rows(order, index, self.batch_size, shard)
        out = {"x0": self.x[rows][:, None], "y0": self._tree[0][rows][:, None], "w0": weight[:, None]}
        rng = np.random.default_rng([self.config.seed, 11, epoch, index])
        for lvl in range(1, len(self.levels)):
            sizes, start = self._sizes[lvl - 1], self._starts[lvl - 1]
            u = B_.shard_block(rng.random((self.node_batch[lvl], self.n_nodes[lvl])), shard)
            pos = start + np.minimum((u * sizes).astype(np.int64), np.maximum(sizes - 1, 0))
            rows = self._members[lvl - 1][np.minimum(pos, self.data.n_items - 1)]
            out[f"x{lvl}"] = self.x[rows]
            out[f"y{lvl}"] = self._tree[lvl][rows] % self.levels[lvl]
            out[f"w{lvl}"] = np.broadcast_to(sizes > 0, u.shape).astype(np.float32)
        return out

    def device_aux(self, aux):
        """The centroids, for soft targets; the host-side per-node rows follow the (restored) tree labels."""
        if not np.array_equal(aux["labels"], self._tree):
            self._set_tree(np.asarray(aux["labels"]))
        if self.config.train.target_temperature > 0:
            return {k: v for k, v in aux.items() if k.startswith("centroids")}
        return {}

    def end_of_epoch(self, epoch, params, aux):
        """After the last epoch, place every base vector in its predicted leaf (saved with the params)."""
        if epoch < self.config.train.epochs:
            return aux, {}
        leaf = self.assign_leaves(params, aux["labels"])
        return dict(aux, leaf=leaf), _size_stats(np.bincount(leaf, minlength=self.n_leaves))

    def leaf_spec(self, leaf):
        return P()

    def shapes(self):
        return {"n_items": self.data.n_items, "dim": self.data.dim, "levels": list(self.levels),
                "hidden": [list(h) for h in self.config.model.hidden]}

    # --- routing and bucket layout -----------------------------------------------------------------
    def leaf_logp(self, params, x: jax.Array) -> jax.Array:
        """Path log-probability of every leaf [b, L] for queries x [b, d] (pure; jitted by the callers)."""
        return leaf_log_probs_of(self.models, params, x)

    def assign_leaves(self, params, tree_labels: np.ndarray) -> np.ndarray:
        """Leaf of largest path probability for every base vector (see `place_vectors`)."""
        return place_vectors(self.leaf_logp, params, self.x, self.config.search.query_batch,
                             tree_labels[-1] if self.config.index.repair_empty else None, self.n_leaves,
                             leaf_capacity(self.config, len(self.x)))

    def index(self, params, aux) -> "LMIIndex":
        return LMIIndex.from_training(self.config, params, aux, self.data.base,
                                      {"metric": self.data.metric, "data_fingerprint": self.data.fingerprint()})

    def _set_tree(self, labels: np.ndarray) -> None:
        self._tree = labels
        self._members, self._starts, self._sizes = [], [], []
        for lvl in range(len(self.levels)):
            n = self.n_nodes[lvl + 1] if lvl + 1 < len(self.levels) else self.n_leaves
            sizes = np.bincount(labels[lvl], minlength=n)
            self._members.append(np.argsort(labels[lvl], kind="stable"))
            self._starts.append(np.cumsum(sizes) - sizes)
            self._sizes.append(sizes)


def router_models(config) -> list[RepeatedMLP]:
    """The stacked node MLPs of every level of the tree (the index's router)."""
    m = config.model
    levels = tuple(int(c) for c in m.levels)
    return [RepeatedMLP(math.prod(levels[:lvl]), tuple(h), c, 0, m.init_std)
            for lvl, (h, c) in enumerate(zip(m.hidden, levels))]


def leaf_log_probs_of(models, params, x: jax.Array) -> jax.Array:
    """Path log-probability of every leaf [b, L] for x [b, d] from the levels' node MLPs."""
    return leaf_log_probs([model.apply({"params": params[f"level{lvl}"]}, x)[1] for lvl, model in enumerate(models)])


def leaf_capacity(config, n: int) -> int:
    """Most base vectors a leaf may hold when placed (`kmeans.balance` x the mean; 0 = unbounded)."""
    return km.capacity_of(n, math.prod(int(c) for c in config.model.levels), config.kmeans.balance)


def place_vectors(logp_fn, params, x: np.ndarray, block: int, kmeans_leaf=None, n_leaves: int = 0,
                  capacity: int = 0) -> np.ndarray:
    """Leaf of largest path probability for every vector of x, or with a `capacity`, its most probable
    leaf that is not full (`kmeans.capped_assign` over its 16 most probable); with `kmeans_leaf`, a leaf
    nobody is routed to takes back the points k-means put in it (`repair_empty`)."""
    if not len(x):
        return np.zeros(0, np.int32)
    m = min(16, n_leaves) if capacity else 1
    top = [tuple(np.asarray(a)[:n] for a in _best_leaves(logp_fn, params, c, m)) for c, n in query_blocks(x, block)]
    prefs, margin = np.concatenate([t[0] for t in top]), np.concatenate([t[1] for t in top])
    leaf = km.capped_assign(prefs, margin, n_leaves, capacity)
    if kmeans_leaf is not None:
        leaf, moved = repair_empty(leaf, np.asarray(kmeans_leaf), n_leaves)
        if moved:
            log.info("repaired empty leaves by moving %d points back to their k-means leaf", moved)
    return leaf


class LMIIndex(Index):
    """LMI networks with the vectors laid out contiguously per leaf.

    arrays: `offsets` [1, L+1] int32 (leaf b's rows are offsets[b]:offsets[b+1]), `ids` [N] int64 (the
    item id of each row), `vectors` [N, d] float32 (rows in leaf order; L2-normalised for angular data),
    `input_center` [d] and `input_scale` [] (the networks see (x - center) / scale; absent: x as is).
    """

    method, task = "lmi", "ann"
    setting_keys = ("n_probe", "max_candidates", "route", "reorder", "codes")
    ROUTES = ("learned", "centroids")

    def __init__(self, config, params, arrays, info):
        super().__init__(config, params, arrays, info)
        self.models = router_models(self.config)
        self.n_leaves = math.prod(int(c) for c in self.config.model.levels)
        self._logp = partial(leaf_log_probs_of, tuple(self.models))
        self.params = jax.device_put(self.params)
        self._centroids = None  # leaf means, for route="centroids" (computed on first use)
        self._blocks = None     # the PQ codes in the fast-scan kernel's block layout (built on first use)

    @classmethod
    def from_training(cls, config, params, aux, vectors: np.ndarray, info: dict) -> "LMIIndex":
        """The index of a training run's params and aux (`leaf`, or the tree's `labels` when the run
        stopped before the leaves were placed) over its base vectors."""
        n_leaves = math.prod(int(c) for c in config.model.levels)
        leaf = np.asarray(aux["leaf"])
        scaling = {k: np.asarray(aux[k], np.float32) for k in ("input_center", "input_scale") if k in aux}
        if (leaf < 0).any():  # not trained to the end (or epochs = 0): place the points now
            logp = partial(leaf_log_probs_of, tuple(router_models(config)))
            x = standardize(vectors, scaling["input_center"], scaling["input_scale"]) if scaling else vectors
            leaf = place_vectors(logp, jax.device_put(params), x, config.search.query_batch,
                                 np.asarray(aux["labels"])[-1] if config.index.repair_empty else None, n_leaves,
                                 leaf_capacity(config, len(x)))
        part = Partition.from_assignment(leaf[None], n_leaves)
        arrays = {"offsets": part.offsets, "ids": part.members[0].astype(np.int64),
                  "vectors": np.ascontiguousarray(vectors[part.members[0]], np.float32), **scaling}
        n = len(vectors)
        index = cls(config, params, arrays, dict(info, dim=vectors.shape[1], n_items=n, next_id=n))
        log.info("LMI bucket sizes over %d leaves: %s", n_leaves, index.leaf_stats())
        if config.index.get("pq4_dims", 0):
            index.quantize("auto" if config.index.pq4_dims == -1 else config.index.pq4_dims,
                           config.index.pq4_residual, seed=config.seed,
                           anisotropic=config.index.get("pq4_anisotropic", 0.0))
        if config.index.get("sq8", False):
            index.quantize_sq8()
        return index

    @property
    def quantized(self) -> bool:
        return "pq4_codes" in self.arrays

    def quantize(self, dims: int | str = 2, residual: bool = True, sample: int = 65536, seed: int = 0,
                 anisotropic: float = 0.0) -> "LMIIndex":
        """Add 4-bit PQ codes of every row (`jaxidx.pq4`: `dims` dimensions per sub-space, 16 centroids
        each, trained on a seeded sample of `sample` rows; residual = codes of x minus its leaf's mean),
        which the setting `reorder` > 0 searches. dims="auto": `pq4.choose_dims`, from a simulated search
        on the data. anisotropic = T > 0 (angular and dot only): ScaNN's score-aware loss with threshold
        T (`pq4.anisotropic_eta`). Returns the index; `save` keeps the codes."""
        offsets, x = self.arrays["offsets"][0], self.arrays["vectors"]
        metric = kernel_metric(self.metric)
        eta = pq4.eta_of(metric, self.dim, anisotropic)
        if dims == "auto":
            dims = pq4.choose_dims(x, offsets, metric, residual=residual, seed=seed, eta=eta)
            log.info("PQ codes: %d dims per sub-space (pq4.choose_dims)", dims)
        centres = pq4.leaf_means(x, offsets) if residual else None
        r = x - np.repeat(centres, self.sizes(), axis=0) if residual else x
        pq4.store_codes(self.arrays, *pq4.fit_codes(r, dims, sample=sample, seed=seed, directions=x, eta=eta), eta)
        self.arrays.pop("pq4_centres", None)
        if residual:
            self.arrays["pq4_centres"] = centres
        self._blocks = None
        return self

    def quantize_sq8(self) -> "LMIIndex":
        """Add 8-bit codes of every row (`jaxidx.sq8`: one byte per dimension over each dimension's range),
        which settings with `reorder` > 0 and codes='sq8' search. Returns the index; `save` keeps them."""
        sq8.store(self.arrays, self.arrays["vectors"], kernel_metric(self.metric))
        return self

    def sizes(self) -> np.ndarray:
        return np.diff(self.arrays["offsets"][0])

    def leaf_stats(self) -> dict:
        return _size_stats(self.sizes())

    def _check_setting(self, setting: dict) -> None:
        n_probe = setting.get("n_probe")
        if not is_int(n_probe) or not 1 <= n_probe <= self.n_leaves:
            raise ValueError(f"search: n_probe={n_probe!r} must be an integer in [1, {self.n_leaves}] (the leaves)")
        budget = setting.get("max_candidates", 0)
        if not is_int(budget) or budget < 0:
            raise ValueError(f"search: max_candidates={budget!r} must be an integer >= 0 (0 = no budget)")
        if setting.get("route", "learned") not in self.ROUTES:
            raise ValueError(f"search: route={setting['route']!r} must be one of {', '.join(self.ROUTES)}")
        if sq8.codes_of(setting) == "sq8":
            pq4.check_reorder(setting, "sq8_codes" in self.arrays,
                              "call index.quantize_sq8() (or train with --config.index.sq8=True)")
        else:
            pq4.check_reorder(setting, self.quantized)

    def _prepare(self, queries, what: str = "queries") -> np.ndarray:
        x = dense_rows(queries, self.dim, what)
        return normalize_rows(x, what) if self.metric == "angular" else x

    def route(self, queries, n_probe: int, route: str = "learned") -> np.ndarray:
        """The n_probe non-empty leaves of largest path probability per query (or, route="centroids",
        nearest leaf mean, as IVF routes), best first, [Q, n_probe] (-1 where fewer leaves are non-empty)."""
        self._check_setting({"n_probe": n_probe, "route": route})
        return self._leaves(self._prepare(queries), n_probe, route)

    def leaf_means(self) -> np.ndarray:
        """Mean of each leaf's vectors [L, d] (unit-normalised for angular data; 0 for empty leaves): the
        centroids of route="centroids", which compares the learned router with k-means routing."""
        if self._centroids is None:
            sizes = self.sizes()
            row_leaf = np.repeat(np.arange(self.n_leaves), sizes)
            members = scipy.sparse.csr_matrix((np.ones(len(row_leaf), np.float32), (row_leaf, np.arange(len(row_leaf)))),
                                              shape=(self.n_leaves, len(row_leaf)))
            c = np.asarray(members @ self.arrays["vectors"]) / np.maximum(sizes, 1)[:, None]
            if self.metric == "angular":
                c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
            self._centroids = np.ascontiguousarray(c, np.float32)
        return self._centroids

    def _leaves(self, queries: np.ndarray, n_probe: int, route: str = "learned") -> np.ndarray:
        """The routed leaves [Q, n_probe] (-1 = none): the networks in `query_batch` blocks on the device;
        the leaf means on the host (`nearest_leaves`: one matrix product, where a jitted call costs a single
        query more than the product)."""
        if route == "centroids":
            return nearest_leaves(self.leaf_means(), self.sizes() > 0, n_probe, queries)
        nonempty = jnp.asarray(self.sizes() > 0)
        out = []
        for chunk, n in query_blocks(queries, self.config.search.query_batch):
            logp, ids = _top_leaves(self._logp, self.params, nonempty, n_probe, self.router_input(chunk))
            out.append(np.where(np.isfinite(np.asarray(logp)), np.asarray(ids), -1)[:n].astype(np.int32))
        return np.concatenate(out) if out else np.zeros((0, n_probe), np.int32)

    def _query(self, queries, setting: dict, k: int) -> SearchResult:
        """Visit each query's leaves best first (`n_probe`, optional `max_candidates` budget), re-rank
        their vectors exactly. Routing runs in `query_batch` blocks; the re-rank takes RERANK_QUERIES
        queries per kernel call, so a leaf probed by several of them is read from memory once."""
        sizes, offsets = self.sizes(), self.arrays["offsets"][0]
        metric, ids_of = kernel_metric(self.metric), self.arrays["ids"]
        leaves = self._leaves(queries, setting["n_probe"], setting.get("route", "learned"))
        reorder, threads = setting.get("reorder", 0), self.config.search.n_threads
        if reorder and reorder < k:
            raise ValueError(f"search: reorder={reorder} must be at least k={k} (the candidates re-ranked exactly)")
        ids, dist, n_cand = [], [], []
        for s in range(0, len(queries), RERANK_QUERIES):
            lv, q = leaves[s:s + RERANK_QUERIES], queries[s:s + RERANK_QUERIES]
            lens = select_leaves(sizes, lv, setting.get("max_candidates", 0))
            if reorder and setting.get("codes", "pq4") == "sq8":
                a = self.arrays
                rows, d, n = kernels.sq8_search(q, a["vectors"], a["sq8_codes"], a["sq8_lo"], a["sq8_scale"],
                                                a.get("sq8_terms"), offsets, lv, lens.astype(np.int32), reorder, k,
                                                metric, threads)
            elif reorder:
                codes, block_offsets, terms = self.pq4_blocks()
                rows, d, n = kernels.pq4_search(q, self.arrays["vectors"], codes, self.arrays["pq4_codebooks"],
                                                self.arrays.get("pq4_centres"), offsets, block_offsets, lv,
                                                lens.astype(np.int32), reorder, k, metric, threads, terms)
            else:
                rows, d, n = kernels.rerank_topk(q, self.arrays["vectors"], candidate_runs(offsets, lv, lens), k,
                                                 metric, threads)
            ids.append(np.where(rows >= 0, ids_of[np.maximum(rows, 0)], -1))
            dist.append(d)
            n_cand.append(n)
        return SearchResult(ids=np.concatenate(ids), scores=np.concatenate(dist), n_candidates=np.concatenate(n_cand))

    def pq4_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The PQ codes in the fast-scan kernel's layout (`pq4.block_layout`) and, for l2 with residual
        codes, each row's term (`pq4.row_terms`), built once per change."""
        if self._blocks is None:
            a, offsets = self.arrays, self.arrays["offsets"][0]
            centres = a.get("pq4_centres")
            terms = (pq4.row_terms(a["pq4_codes"], a["pq4_codebooks"], centres, offsets)
                     if centres is not None and kernel_metric(self.metric) == "l2" else None)
            self._blocks = (*pq4.block_layout(a["pq4_codes"], offsets), terms)
        return self._blocks

    # --- device backend -------------------------------------------------------------------------
    def shard(self, mesh=None) -> "LMIIndex":
        self._sharded = ShardedLayout(self.arrays["offsets"][0], self.arrays["vectors"], self.arrays["ids"], mesh)
        self._sharded_params = {}
        return self

    def _query_device(self, queries, setting: dict, k: int) -> SearchResult:
        """Routing, the leaves' rows and the exact top-k in one jitted function per query block, over
        the shards of `shard(mesh)` (default: the first device); see `search.sharded`."""
        if self._sharded is None:
            self.shard(default_mesh(jax.devices()[:1]))
        layout, route = self._sharded, setting.get("route", "learned")
        n_probe, budget = setting["n_probe"], setting.get("max_candidates", 0)
        if route not in self._sharded_params:  # the router's inputs, replicated on the mesh once
            self._sharded_params[route] = layout.replicate(
                (self.leaf_means() if route == "centroids" else self.params, self.sizes() > 0))
        params, nonempty = self._sharded_params[route]
        route_fn = mean_scores if route == "centroids" else self._logp
        capacity = layout.capacity(n_probe, budget)
        ids, dist, n_cand = [], [], []
        for chunk, n in query_blocks(queries, layout.block_size(capacity, self.config.search.query_batch)):
            x_route = chunk if route == "centroids" else self.router_input(chunk)
            out = layout.search(route_fn, params, nonempty, x_route, chunk, n_probe=n_probe, budget=budget, k=k,
                                metric=kernel_metric(self.metric), capacity=capacity)
            for acc, a in zip((ids, dist, n_cand), out):
                acc.append(np.asarray(a)[:n])
        return SearchResult(ids=np.concatenate(ids).astype(np.int64), scores=np.concatenate(dist),
                            n_candidates=np.concatenate(n_cand))

    # --- add / remove ---------------------------------------------------------------------------
    def add(self, vectors) -> np.ndarray:
        """Place new vectors in the leaves the trained networks give them (no retraining); returns their
        ids, which continue after the largest id the index has held."""
        x = self._prepare(vectors, "vectors")
        leaf = place_vectors(self._logp, self.params, self.router_input(x), self.config.search.query_batch)
        new_ids = np.arange(self.info["next_id"], self.info["next_id"] + len(x), dtype=np.int64)
        offsets = self.arrays["offsets"][0]
        order = np.argsort(leaf, kind="stable")
        at = offsets[leaf[order] + 1]  # each goes after its leaf's last row, in id order
        if self.quantized:  # codes of the new rows with the index's codebooks (and leaf centres)
            centres = self.arrays.get("pq4_centres")
            r = x[order] - centres[leaf[order]] if centres is not None else x[order]
            codes = pq4.codes_of(self.arrays, r, x[order])
            self.arrays["pq4_codes"] = np.insert(self.arrays["pq4_codes"], at, codes, axis=0)
        if "sq8_codes" in self.arrays:
            sq8.insert(self.arrays, at, x[order])
        self.arrays["vectors"] = np.ascontiguousarray(np.insert(self.arrays["vectors"], at, x[order], axis=0))
        self.arrays["ids"] = np.insert(self.arrays["ids"], at, new_ids[order])
        self.arrays["offsets"] = _offsets_of(self.sizes() + np.bincount(leaf, minlength=self.n_leaves))
        self.info.update(n_items=len(self.arrays["ids"]), next_id=int(new_ids[-1]) + 1 if len(x) else
                         self.info["next_id"])
        self._drop_device_state()
        return new_ids

    def remove(self, ids) -> None:
        """Remove items by id: they are never returned again (their rows are dropped from the layout)."""
        drop = rows_of_ids(self.arrays["ids"], ids)
        keep = np.ones(len(self.arrays["ids"]), bool)
        keep[drop] = False
        row_leaf = np.repeat(np.arange(self.n_leaves), self.sizes())
        self.arrays["vectors"] = np.ascontiguousarray(self.arrays["vectors"][keep])
        self.arrays["ids"] = self.arrays["ids"][keep]
        if self.quantized:
            self.arrays["pq4_codes"] = np.ascontiguousarray(self.arrays["pq4_codes"][keep])
        if "sq8_codes" in self.arrays:
            sq8.keep(self.arrays, keep)
        self.arrays["offsets"] = _offsets_of(np.bincount(row_leaf[keep], minlength=self.n_leaves))
        self.info["n_items"] = len(self.arrays["ids"])
        self._drop_device_state()

    def _drop_device_state(self) -> None:
        """After add / remove: the leaf means are recomputed, and a sharded layout rebuilds the shards
        whose items changed; the PQ blocks are rebuilt on next use (the codebooks and centres stay)."""
        self._centroids = None
        self._blocks = None
        if self._sharded is not None:
            self._sharded.update(self.arrays["offsets"][0], self.arrays["vectors"], self.arrays["ids"])
            self._sharded_params = {}


LMI.index_type = LMIIndex


def _offsets_of(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)[None]


@partial(jax.jit, static_argnums=(0, 3))
def _best_leaves(route, params, x, m):
    """The m most probable leaves of each row, best first, and the log-probability margin of the first."""
    return km.top_k_margin(route(params, x), m)


def mean_scores(means, x):
    """Leaf scores of route="centroids" [b, L]: -|x - mean|^2 up to a per-row constant (unit means of
    angular data: 2 cos - 1). NumPy arrays on the host (`nearest_leaves`), jax arrays on the device."""
    return 2.0 * x @ means.T - (means * means).sum(-1)


def nearest_leaves(means: np.ndarray, nonempty: np.ndarray, n_probe: int, x: np.ndarray) -> np.ndarray:
    """route="centroids" on the host: per row of x the n_probe non-empty leaves of highest `mean_scores`,
    best first, ties to the lower leaf (as `lax.top_k`), -1 past the non-empty ones; int32 [Q, n_probe]."""
    scores = mean_scores(means, x)
    scores[:, ~nonempty] = -np.inf
    n_leaves = scores.shape[1]
    top = (np.argpartition(-scores, n_probe - 1, axis=1)[:, :n_probe] if n_probe < n_leaves
           else np.broadcast_to(np.arange(n_leaves), scores.shape))
    best = np.take_along_axis(scores, top, 1)
    order = np.lexsort((top, -best))
    top, best = np.take_along_axis(top, order, 1), np.take_along_axis(best, order, 1)
    return np.where(np.isfinite(best), top, -1).astype(np.int32)


@partial(jax.jit, static_argnums=(0, 3))
def _top_leaves(route, params, nonempty, n_probe, x):
    logp = jnp.where(nonempty, route(params, x), -jnp.inf)
    return jax.lax.top_k(logp, n_probe)


def _size_stats(sizes: np.ndarray) -> dict:
    """Bucket-size distribution (empty buckets counted): bucket_stats plus quantiles."""
    stats = bucket_stats(np.asarray(sizes)[None])
    q = np.percentile(sizes, [0, 50, 90, 99])
    stats.update(min=float(q[0]), p50=float(q[1]), p90=float(q[2]), p99=float(q[3]),
                 n_empty=int((np.asarray(sizes) == 0).sum()))
    return stats
