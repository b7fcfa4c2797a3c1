"""IRLI: R router networks over B buckets, items iteratively re-partitioned to the
buckets the networks prefer, load-balanced (Gupta et al., IRLI; BLISS for ANN).

Items are labels (XMC) or base vectors (ANN; each base vector is a label whose
positives are the training points it is a true neighbour of).

A quantized ANN index (`IRLIIndex.quantize`, or `index.pq4_dims` in the config)
also holds one 4-bit PQ code per vector (`jaxidx.pq4`); the setting `reorder` > 0
then scores every member of the m routed buckets of each repetition from the
codes (`pq4_search` with row_ids: a vector found in several repetitions is scored
once), in place of counting hits, and re-ranks the `reorder` best exactly.
"""
from __future__ import annotations

import functools
import logging
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp
from jax.sharding import PartitionSpec as P

from jaxidx import pq4
from jaxidx import search as kernels
from jaxidx.data.types import ANNData, XMCData
from jaxidx.data.ann import normalize_rows
from jaxidx.index import Index, dense_rows, is_int, kernel_metric, n_rows, query_blocks, rows_of_ids, sparse_rows
from jaxidx.kmeans import kmeans
from jaxidx.methods.common import SearchResult, input_standardizer, route_topm, standardize, validate_common
from jaxidx.models.router import RepeatedMLP, affine_head
from jaxidx.partition import Partition, bucket_stats, hash_assignment
from jaxidx.search.sharded import ShardedPartition, default_mesh
from jaxidx.train import batches as B_
from jaxidx.train import mesh as mesh_lib

log = logging.getLogger(__name__)


def bucket_targets(assign: jax.Array, labels: jax.Array, n_buckets: int) -> jax.Array:
    """Multi-hot bucket targets [b, R, B]: bucket is 1 if it holds a true label of the example.

    `assign` [R, N] int32, `labels` [b, Lmax] int32 padded with -1.
    """
    mask = labels >= 0
    buckets = jnp.take(assign, jnp.where(mask, labels, 0), axis=1)  # [R, b, Lmax]
    b, _ = labels.shape
    R = assign.shape[0]
    bi = jnp.arange(b)[None, :, None]
    ri = jnp.arange(R)[:, None, None]
    t = jnp.zeros((b, R, n_buckets), jnp.float32)
    return t.at[bi, ri, buckets].max(jnp.broadcast_to(mask[None], buckets.shape).astype(jnp.float32))


def bucket_loss(logits: jax.Array, targets: jax.Array, weight: jax.Array, kind: str) -> jax.Array:
    """Per-example weighted loss, averaged over examples (and buckets for BCE), summed over R.

    bce: per-bucket sigmoid BCE averaged over B (the original IRLI loss);
    softmax: cross-entropy against the normalised multi-hot target.
    """
    if kind == "bce":
        per = optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)  # [b, R]
    elif kind == "softmax":
        norm = targets / jnp.maximum(targets.sum(-1, keepdims=True), 1.0)
        per = optax.softmax_cross_entropy(logits, norm)
    else:
        raise ValueError(f"model.loss: unknown {kind!r}; valid: bce, softmax")
    return (per.sum(-1) * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def validate_config(config, n_items: int) -> None:
    m, p = config.model, config.partition
    validate_common(config)
    if m.n_buckets < 2:
        raise ValueError(f"model.n_buckets: must be >= 2, got {m.n_buckets}")
    if m.n_reps < 1:
        raise ValueError(f"model.n_reps: must be >= 1, got {m.n_reps}")
    if not 1 <= p.top_k <= m.n_buckets:
        raise ValueError(f"partition.top_k: must be in [1, model.n_buckets={m.n_buckets}], got {p.top_k}")
    if p.order not in ("index", "random"):
        raise ValueError(f"partition.order: must be 'index' or 'random', got {p.order!r}")
    if p.capacity_factor and p.capacity_factor * (n_items / m.n_buckets) * m.n_buckets < n_items:
        raise ValueError(f"partition.capacity_factor: {p.capacity_factor} < 1 cannot hold all {n_items} items")
    if p.repartition_every < 0:
        raise ValueError(f"partition.repartition_every: must be >= 0, got {p.repartition_every}")
    if p.init not in ("hash", "kmeans"):
        raise ValueError(f"partition.init: unknown {p.init!r}; valid: hash, kmeans")
    if m.loss not in ("bce", "softmax"):
        raise ValueError(f"model.loss: unknown {m.loss!r}; valid: bce, softmax")
    pq4.check_config(config)
    for s in config.search.settings:
        if s.get("mode", "topk") not in ("topk", "mach"):
            raise ValueError(f"search.settings: mode={s['mode']!r} unknown; valid: topk, mach")
        if s.get("mode") == "mach":
            continue
        if "m" not in s:
            raise ValueError(f"search.settings: {dict(s)} needs m (buckets probed per repetition)")
        if not 1 <= s["m"] <= m.n_buckets:
            raise ValueError(f"search.settings: m={s['m']} must be in [1, model.n_buckets={m.n_buckets}]")
        reps = s.get("reps", m.n_reps)
        if not 1 <= reps <= m.n_reps:
            raise ValueError(f"search.settings: reps={reps} must be in [1, model.n_reps={m.n_reps}]")
        if not 1 <= s.get("min_count", 1) <= reps:
            raise ValueError(f"search.settings: min_count={s['min_count']} must be in [1, reps={reps}] (the "
                             "repetitions searched)")
        if s.get("reorder", 0) and s.get("min_count", 1) > 1:
            raise ValueError(f"search.settings: {dict(s)}: reorder > 0 ranks the routed buckets' members by their "
                             "codes instead of counting hits; min_count must be 1")


class IRLI:
    """Trainable IRLI on XMC or ANN data; `index(params, aux)` gives the searchable index."""

    name = "irli"

    def __init__(self, config, data, mesh):
        self.config, self.data, self.mesh = config, data, mesh
        self.task = data.task
        if isinstance(data, XMCData):
            # Narrow inputs train faster as dense matmuls; wide sparse ones as an embedding bag.
            dense = data.n_features <= config.model.dense_input_max_features
            self.inputs = data.X_train.toarray() if dense else B_.pad_sparse_rows(data.X_train)
            self._labels = lambda: B_.pad_label_lists(data.Y_train)
            self.n_items, self.in_dim = data.n_labels, data.n_features
            self.n_features = 0 if dense else data.n_features
        elif isinstance(data, ANNData):
            from jaxidx.data import knn_labels
            rows = _train_points(data, config)
            # The routers see standardised vectors, so training does not depend on the data's scale.
            self.input_center, self.input_scale = input_standardizer(data.base, data.metric, config.model.standardize)
            self.inputs = standardize(data.base[rows], self.input_center, self.input_scale)

            def labels():
                """Each training point's k true neighbours among the base (itself included). Euclidean
                neighbours are found among the standardised vectors (the same neighbours, fewer float
                cancellations at large magnitudes); inner-product ones among the raw vectors."""
                base = self._euclidean_base()
                return B_.pad_label_lists(knn_labels(base[rows], base, config.train.knn_k, data.metric),
                                          config.train.knn_k)
            self._labels = labels
            self.n_items, self.n_features, self.in_dim = data.n_items, 0, data.dim
        else:
            raise TypeError(f"IRLI: unsupported data {type(data).__name__}")
        validate_config(config, self.n_items)
        if self.task == "xmc" and config.get("index", {}).get("pq4_dims", 0):
            raise ValueError("index.pq4_dims: PQ codes quantize vectors; an XMC index holds labels (set it to 0)")
        if self.task == "xmc" and config.partition.init != "hash":
            raise ValueError("partition.init: 'kmeans' clusters base vectors; an XMC index partitions labels "
                             "(set it to 'hash')")
        self.model = router_model(config, self.n_features)
        self.n_train = n_rows(self.inputs)
        self.batch_size = config.train.batch_size
        self.steps_per_epoch = B_.steps_per_epoch(self.n_train, self.batch_size)
        self._hidden_fn = jax.jit(lambda p, x: self.model.apply(p, x)[0])

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Padded label lists of the training points [n, Lmax]; computed on first use (training only)."""
        return self._labels()

    # --- Trainable -------------------------------------------------------------------------------
    def init(self, rng):
        params = self.model.init(rng, B_.take(self.inputs, np.arange(1)))
        aux = {"assign": self._initial_assignment()}
        if self.task == "ann":
            aux.update(input_center=self.input_center, input_scale=self.input_scale)
        return params, aux

    def optimizer(self, total_steps):
        return optax.adam(self.config.train.learning_rate)

    def _euclidean_base(self) -> np.ndarray:
        """The ANN base where distances are taken during training (neighbour labels, k-means start):
        euclidean data in the routers' standardised space (the same neighbours and clusters, fewer float
        cancellations at large magnitudes), other metrics as is. Built per call, not kept."""
        if self.data.metric == "euclidean" and self.config.model.standardize:
            return standardize(self.data.base, self.input_center, self.input_scale)
        return self.data.base

    def _initial_assignment(self) -> np.ndarray:
        """[R, N] buckets the repetitions start from: hashed (`partition.init='hash'`, the paper's), or, for
        ANN, 'kmeans': each repetition a k-means of the base with its own seed (k-means++ seeds and fitting
        sample), capped at `capacity_factor` x the mean load, in the space the routers see. From a hashed
        start the routers do not find clustered data's clusters through re-partitions (synthetic d64,
        2000 clusters, B 256: one repetition's top bucket held 0.39 of a query's 10 neighbours where
        k-means' nearest centroid held 0.96); from k-means they start there, and re-partitioning refines
        the buckets towards what the networks learn (BENCHMARKS.md)."""
        m, p = self.config.model, self.config.partition
        if p.init == "hash":
            return hash_assignment(self.n_items, m.n_reps, m.n_buckets)
        x = self._euclidean_base()
        return np.stack([kmeans(x, m.n_buckets, n_iter=p.kmeans_iter, spherical=self.data.metric != "euclidean",
                                sample=p.kmeans_points_per_bucket * m.n_buckets,
                                init_sample=32 * m.n_buckets, balance=max(1.0, p.capacity_factor) if
                                p.capacity_factor else 0.0, seed=(self.config.seed * 1_000_003 + r) % 2**31,
                                mesh=self.mesh).labels
                         for r in range(m.n_reps)]).astype(np.int32)

    def loss(self, params, batch, aux, rng):
        _, logits = self.model.apply(params, batch["x"])
        targets = bucket_targets(aux["assign"], batch["labels"], self.config.model.n_buckets)
        loss = bucket_loss(logits, targets, batch["weight"], self.config.model.loss)
        return loss, {}

    def batch(self, epoch, index):
        order = B_.epoch_order(self.n_train, self.config.seed, epoch)
        rows, weight = B_.batch_rows(order, index, self.batch_size, mesh_lib.process_shard(self.mesh))
        return {"x": B_.take(self.inputs, rows), "labels": self.labels[rows], "weight": weight}

    def device_aux(self, aux):
        return {"assign": aux["assign"]}

    def leaf_spec(self, leaf):
        mp = self.mesh.shape[mesh_lib.MODEL]
        if mp > 1 and getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] == self.config.model.n_reps:
            return P(mesh_lib.MODEL)
        return P()

    def shapes(self):
        m = self.config.model
        return {"n_items": self.n_items, "in_dim": self.in_dim, "n_reps": m.n_reps,
                "n_buckets": m.n_buckets, "hidden": list(m.hidden)}

    def end_of_epoch(self, epoch, params, aux):
        p, epochs = self.config.partition, self.config.train.epochs
        if not p.repartition_every or epoch % p.repartition_every or (epoch >= epochs and not p.final_repartition):
            return aux, {}
        assign = self.repartition(params, aux["assign"], epoch)
        stats = bucket_stats(Partition.from_assignment(assign, self.config.model.n_buckets).sizes())
        moved = float((assign != aux["assign"]).mean())
        log.info("epoch %d re-partition: moved %.3f of items; bucket sizes %s", epoch, moved, stats)
        if moved > 0.9 and epoch > p.repartition_every:  # the first re-partition leaves the hash partition
            log.warning("epoch %d re-partition moved %.0f%% of the items again: the routers are not converging "
                        "(check the input scale and the learning rate)", epoch, 100 * moved)
        return dict(aux, assign=assign), dict(stats, moved=moved)

    # --- re-partitioning -------------------------------------------------------------------------
    def repartition(self, params, assign: np.ndarray, epoch: int) -> np.ndarray:
        """Top-K buckets per item's representative, then one greedy load-balanced pass: each
        item goes to the least-filled of its top-K buckets that are not full."""
        p, m = self.config.partition, self.config.model
        K = p.top_k
        # With a capacity, an item whose top-K are full falls back to its next preferences.
        ranked = min(m.n_buckets, max(K, p.fallback_candidates)) if p.capacity_factor else K
        if self.task == "xmc":
            cand, seen = self._label_topk(params, ranked)
        else:
            cand, seen = self._item_topk(params, ranked), np.ones(self.n_items, bool)
        # Items with no representative (labels never seen in training) stay where they are.
        cand[:, ~seen, 0] = assign[:, ~seen]
        cand[:, ~seen, 1:] = -1
        order = None
        if p.order == "random":
            rng = np.random.default_rng([self.config.seed, epoch, 1])
            order = np.stack([rng.permutation(self.n_items) for _ in range(m.n_reps)]).astype(np.int64)
        capacity = int(np.ceil(p.capacity_factor * self.n_items / m.n_buckets)) if p.capacity_factor else 0
        return kernels.balanced_assign(cand, m.n_buckets, order=order, capacity=capacity, n_choices=K)

    def _label_topk(self, params, K):
        """XMC representatives: sum of router logits over each label's training examples.

        The head is affine, so this is (sum of hidden activations) @ W + n_l * b:
        hidden sums are accumulated per batch over the labels the batch touches
        (O(nnz x R x H) work), only for labels seen in training (the others keep their
        bucket), so memory is O(seen labels x R x H); logits are formed only for chunks
        of labels, so no [L, B] matrix is ever stored. With `partition.center_scores` each bucket's
        mean logit over the training examples is subtracted (n_l times, i.e. the
        hidden sums are centred), so a bucket's overall popularity does not decide
        where labels go.
        """
        R, H = self.config.model.n_reps, self.config.model.hidden[-1]
        L, bs = self.n_items, self.config.search.query_batch
        Y = self.data.Y_train.tocsr()
        seen = np.asarray(Y.getnnz(axis=0)) > 0
        Y = Y[:, np.flatnonzero(seen)].tocsr()
        h_sum = np.zeros((Y.shape[1], R * H), np.float32)
        h_total = np.zeros(R * H, np.float64)
        for s in range(0, self.n_train, bs):  # every example, the last partial batch included
            rows = np.arange(s, min(s + bs, self.n_train))
            h = np.asarray(self._hidden_fn(params, B_.take(self.inputs, rows))).reshape(len(rows), R * H)
            Yb = Y[rows]
            touched = np.unique(Yb.indices)
            Yb = sp.csr_matrix((Yb.data, np.searchsorted(touched, Yb.indices), Yb.indptr),
                               shape=(len(rows), len(touched)))
            h_sum[touched] += np.asarray(Yb.T @ h, np.float32)
            h_total += h.sum(0)
        counts = np.asarray(Y.getnnz(axis=0), np.float32)
        if self.config.partition.center_scores:
            h_sum -= counts[:, None] * (h_total / self.n_train).astype(np.float32)[None, :]
        with_bias = not self.config.partition.center_scores

        @jax.jit
        def topk(hs, n):
            logits = affine_head(params, jnp.moveaxis(hs.reshape(-1, R, H), 1, 0), n * with_bias)
            return jax.lax.top_k(logits, K)[1]

        chunk = max(1, (1 << 24) // (R * self.config.model.n_buckets))
        cand = np.zeros((R, L, K), np.int32)
        parts = [np.asarray(topk(h_sum[s:s + chunk], counts[s:s + chunk])) for s in range(0, len(counts), chunk)]
        if parts:
            cand[:, seen] = np.concatenate(parts, axis=1)
        return cand, seen

    def _item_topk(self, params, K):
        """ANN representatives: the router's top-K buckets for each base vector itself.

        With `partition.center_scores`, each bucket's mean logit over the items (`center_rows`) is
        subtracted first (see `_label_topk`).
        """
        bs, base = self.config.search.query_batch, self.data.base
        logits = jax.jit(lambda p, x: self.model.apply(p, x)[1])
        routed = partial(standardize, center=self.input_center, scale=self.input_scale)
        center = 0.0
        if self.config.partition.center_scores:
            rows = center_rows(self.n_items, self.config)
            center = sum(np.asarray(logits(params, routed(x)), np.float64)[:n].sum(0)
                         for x, n in query_blocks(base[rows], bs))
            center = jnp.asarray(center / len(rows), jnp.float32)
        topk = jax.jit(lambda p, x, c: jax.lax.top_k(logits(p, x) - c, K)[1])
        out = [np.asarray(topk(params, routed(x), center))[:n] for x, n in query_blocks(base, bs)]
        return np.ascontiguousarray(np.concatenate(out, axis=0).transpose(1, 0, 2)).astype(np.int32)

    # --- search ----------------------------------------------------------------------------------
    def index(self, params, aux) -> "IRLIIndex":
        info = {"data_fingerprint": self.data.fingerprint()}
        if self.task == "ann":
            info["metric"] = self.data.metric
        return IRLIIndex.from_training(self.config, params, aux, self.task, self.in_dim, self.n_features,
                                       self.data.base if self.task == "ann" else None, info)


def router_model(config, n_features: int) -> RepeatedMLP:
    """R stacked MLPs d -> hidden -> B (an embedding bag first layer when n_features > 0)."""
    m = config.model
    return RepeatedMLP(m.n_reps, tuple(m.hidden), m.n_buckets, n_features, m.init_std)


class IRLIIndex(Index):
    """A trained IRLI router with the partition it was trained against.

    arrays: `offsets` [R, B+1] and `members` [R, M] (CSR per repetition). XMC: members are label ids,
    and `assign` [R, L] (each label's bucket, for the MACH estimator). ANN: members are rows of `vectors`
    [N, d] (laid out in repetition 0's bucket order, so its buckets are contiguous), `ids` [N] int64 the
    item id of each row, `input_center` [d] and `input_scale` [] (the routers see (x - center) / scale),
    and `center` [R, B] (each bucket's mean logit over the items, once `add` has needed it). Bytes per
    vector: 4 d + 8 + 4 R, as faiss IVF-Flat's 4 d + 8 plus R memberships. Quantized (`quantize`):
    `pq4_codebooks` [M, 16, dims] and `pq4_codes` [N, ceil(M / 2)] (rows as `vectors`), plus, in memory
    only, the codes laid out per repetition's bucket (R ceil(M / 2) bytes per vector, `pq4_blocks`).

    Settings: `m` buckets per repetition, `min_count` hits, `reorder` (the codes' best re-ranked
    exactly), `reps` (the first reps of the R repetitions searched, default all: each is a partition of
    every item, so fewer run fewer networks and merge fewer buckets, for more candidates per hit; where a
    bucket scan costs little against a router, as in low dimensions, that is faster at equal recall).
    """

    method = "irli"
    setting_keys = ("m", "min_count", "mode", "reorder", "reps")

    def __init__(self, config, params, arrays, info):
        super().__init__(config, params, arrays, info)
        self.task = self.info["task"]
        self.model = router_model(self.config, int(self.info["n_features"]))
        m = self.config.model
        self.n_buckets, self.n_reps = m.n_buckets, m.n_reps
        self.params = jax.device_put(self.params)
        self._routers = {}  # reps -> (route_fn, its jitted form, params) of the first reps networks
        self._blocks = None  # the PQ codes in the fast-scan kernel's layout (built on first use)

    @classmethod
    def from_training(cls, config, params, aux, task: str, in_dim: int, n_features: int,
                      vectors: Optional[np.ndarray], info: dict) -> "IRLIIndex":
        assign = np.asarray(aux["assign"])
        info = dict(info, task=task, dim=in_dim, n_features=n_features, n_items=assign.shape[1])
        if task == "xmc":
            return cls(config, params, dict(_csr(assign, config.model.n_buckets), assign=assign), info)
        order = np.argsort(assign[0], kind="stable")
        scaling = {k: np.asarray(aux[k], np.float32) for k in ("input_center", "input_scale") if k in aux}
        arrays = {"vectors": np.ascontiguousarray(vectors[order], np.float32), "ids": order.astype(np.int64),
                  **_csr(np.ascontiguousarray(assign[:, order]), config.model.n_buckets), **scaling}
        index = cls(config, params, arrays, dict(info, next_id=len(order)))
        dims = config.get("index", {}).get("pq4_dims", 0)
        if dims:
            index.quantize("auto" if dims == -1 else dims, seed=config.seed,
                           anisotropic=config.index.get("pq4_anisotropic", 0.0))
        return index

    @property
    def quantized(self) -> bool:
        return "pq4_codes" in self.arrays

    def quantize(self, dims: int | str = "auto", sample: int = 65536, seed: int = 0,
                 anisotropic: float = 0.0) -> "IRLIIndex":
        """Add a 4-bit PQ code of every vector (`jaxidx.pq4`: `dims` dimensions per sub-space, 16 centroids
        each, trained on a seeded sample of `sample` rows), which the setting `reorder` > 0 searches. The
        codes are of the vectors themselves, not residuals: a vector sits in R buckets (one per
        repetition) and keeps one code, so it scores the same wherever it is found. dims="auto":
        `pq4.choose_dims` on repetition 0's buckets. anisotropic = T > 0 (angular and dot only): ScaNN's
        score-aware loss (`pq4.anisotropic_eta`). Returns the index; `save` keeps the codes."""
        if self.task != "ann":
            raise TypeError("quantize: PQ codes quantize vectors; an XMC index holds labels")
        x, metric = self.arrays["vectors"], kernel_metric(self.metric)
        eta = pq4.eta_of(metric, self.dim, anisotropic)
        if dims == "auto":
            dims = pq4.choose_dims(x, self.arrays["offsets"][0], metric, residual=False, seed=seed, eta=eta)
            log.info("PQ codes: %d dims per sub-space (pq4.choose_dims)", dims)
        pq4.store_codes(self.arrays, *pq4.fit_codes(x, dims, sample=sample, seed=seed, directions=x, eta=eta), eta)
        self._blocks = None
        return self

    def pq4_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The codes in the fast-scan kernel's layout, one leaf per (repetition r, bucket b), leaf r B + b:
        (codes blocks, block_offsets, slot_offsets [R B + 1], row_ids [R N]: the rows of each leaf's
        slots, repetition r's members), built once per change."""
        if self._blocks is None:
            offsets, members = self.arrays["offsets"], self.arrays["members"]
            n = members.shape[1]
            slots = np.concatenate([offsets[0]] + [offsets[r, 1:] + r * n for r in range(1, self.n_reps)])
            slots = slots.astype(np.int32)
            row_ids = np.ascontiguousarray(members.ravel(), np.int32)
            self._blocks = (*pq4.block_layout(self.arrays["pq4_codes"][row_ids], slots), slots, row_ids)
        return self._blocks

    def resolve_setting(self, setting: dict) -> dict:
        """As `Index.resolve_setting`; a setting that asks for codes (reorder > 0) without naming min_count
        gets min_count 1 (the codes rank the members in place of the hit count)."""
        out = super().resolve_setting(setting)
        if setting.get("reorder", 0) and "min_count" not in setting:
            out["min_count"] = 1
        return out

    def _check_setting(self, setting: dict) -> None:
        mode = setting.get("mode", "topk")
        if mode not in ("topk", "mach"):
            raise ValueError(f"search: mode={mode!r} unknown; valid: topk, mach")
        if mode == "mach":
            if self.task != "xmc":
                raise ValueError("search: mode='mach' scores every label; it is for XMC indexes only")
            if setting.get("reps", self.n_reps) != self.n_reps:
                raise ValueError("search: mode='mach' sums all R repetitions' scores; reps must be left out")
            return
        m, min_count, reps = setting.get("m"), setting.get("min_count", 1), setting.get("reps", self.n_reps)
        if not is_int(m) or not 1 <= m <= self.n_buckets:
            raise ValueError(f"search: m={m!r} must be an integer in [1, {self.n_buckets}] (the buckets)")
        if not is_int(reps) or not 1 <= reps <= self.n_reps:
            raise ValueError(f"search: reps={reps!r} must be an integer in [1, {self.n_reps}] (the repetitions "
                             "searched)")
        if not is_int(min_count) or not 1 <= min_count <= reps:
            raise ValueError(f"search: min_count={min_count!r} must be an integer in [1, {reps}] "
                             "(the repetitions searched)")
        if self.task == "xmc" and setting.get("reorder", 0):
            raise ValueError("search: reorder > 0 scans PQ codes of vectors; an XMC index holds labels")
        if pq4.check_reorder(setting, self.quantized) and min_count > 1:
            raise ValueError(f"search: min_count={min_count} with reorder > 0: the codes rank the routed buckets' "
                             "members in place of the hit count; min_count must be 1")

    def _prepare(self, queries, what: str = "queries"):
        if self.task == "xmc":
            return sparse_rows(queries, self.dim)
        x = dense_rows(queries, self.dim, what)
        return normalize_rows(x, what) if self.metric == "angular" else x

    def model_input(self, x):
        """Queries as the router takes them: padded sparse rows are densified for a dense-input router;
        vectors are standardised as in training."""
        if isinstance(x, dict):
            x = {k: x[k] for k in ("idx", "val")}
            return B_.densify_rows(x, self.dim) if not self.info["n_features"] else x
        return self.router_input(x)

    def _router(self, reps: int):
        """(route_fn, jitted route_fn, params) of the first `reps` of the R networks: the partitions of the
        others are not searched, so neither are their networks run (a setting's `reps`)."""
        if reps not in self._routers:
            model = self.model if reps == self.n_reps else self.model.clone(n_reps=reps)
            params = self.params if reps == self.n_reps else jax.tree.map(lambda a: a[:reps], self.params)
            fn = partial(route_topm, model.apply, kind=self.config.model.loss)
            self._routers[reps] = (fn, jax.jit(fn, static_argnames="m"), params)
        return self._routers[reps]

    def route(self, queries, m: int, reps: int | None = None):
        """Top-m buckets per repetition and their probabilities, [Q, reps, m] each (batched on device), of
        the first `reps` repetitions (default all R)."""
        _, route, params = self._router(self.n_reps if reps is None else reps)
        ids, scores = [], []
        for batch, n in query_blocks(queries, self.config.search.query_batch):
            i, p = route(params, self.model_input(batch), m=m)
            ids.append(np.asarray(i)[:n])
            scores.append(np.asarray(p)[:n])
        return np.concatenate(ids), np.concatenate(scores)

    def _query(self, queries, setting: dict, k: int) -> SearchResult:
        if setting.get("mode", "topk") == "mach":
            return self._search_mach(queries, k)
        reps = setting.get("reps", self.n_reps)
        ids, scores = self.route(queries, setting["m"], reps)
        min_count = setting.get("min_count", 1)
        n_threads = self.config.search.n_threads
        members, offsets = self.arrays["members"][:reps], self.arrays["offsets"][:reps]
        if self.task == "xmc":
            top, score, _, n_cand = kernels.merge_topk(ids, scores, offsets, members, None, k, min_count, "sum",
                                                       len(self), n_threads)
            return SearchResult(ids=top, scores=score, n_candidates=n_cand)
        reorder, metric = setting.get("reorder", 0), kernel_metric(self.metric)
        if reorder:  # the routed buckets' members ranked by their codes, the `reorder` best re-ranked exactly
            if reorder < k:
                raise ValueError(f"search: reorder={reorder} must be at least k={k} (the candidates re-ranked exactly)")
            codes, block_offsets, slots, row_ids = self.pq4_blocks()
            leaves = (ids + self.n_buckets * np.arange(reps)[:, None]).reshape(len(ids), -1).astype(np.int32)
            rows, dist, n_cand = kernels.pq4_search(queries, self.arrays["vectors"], codes, self.arrays["pq4_codebooks"],
                                                    None, slots, block_offsets, leaves,
                                                    np.diff(slots)[leaves].astype(np.int32), reorder, k, metric,
                                                    n_threads, None, row_ids)
        else:  # every item hit in >= min_count repetitions (relaxed until k exist) is re-ranked exactly
            rows, dist, n_cand = kernels.merge_rerank_topk(queries, self.arrays["vectors"], ids, offsets, members, k,
                                                           min_count, metric, n_threads)
        top = np.where(rows >= 0, self.arrays["ids"][np.maximum(rows, 0)], -1)
        return SearchResult(ids=top, scores=dist, n_candidates=n_cand)

    def shard(self, mesh=None) -> "IRLIIndex":
        self._sharded = ShardedPartition(self._row_buckets(), self.n_buckets, self._item_ids(),
                                           self.arrays.get("vectors"), mesh)
        self._sharded_params = {}  # reps -> the first reps networks' params, replicated on the mesh
        return self

    def _item_ids(self) -> np.ndarray:
        """The item id of each member row: ANN rows of `vectors`, XMC labels (their own ids)."""
        return self.arrays["ids"] if self.task == "ann" else np.arange(len(self), dtype=np.int64)

    def _query_device(self, queries, setting: dict, k: int) -> SearchResult:
        """Routing, the hit counts with their threshold, and the exact re-rank (ANN) or the summed bucket
        probabilities' top k (XMC) as one jitted function per query block over the shards of
        `shard(mesh)` (default: the first device); see `search.sharded.ShardedPartition`. mode='mach'
        runs on the device on either backend."""
        if setting.get("mode", "topk") == "mach":
            return self._search_mach(queries, k)
        if self._sharded is None:
            self.shard(default_mesh(jax.devices()[:1]))
        part, m, reps = self._sharded, setting["m"], setting.get("reps", self.n_reps)
        route_fn, _, params = self._router(reps)
        if reps not in self._sharded_params:
            self._sharded_params[reps] = part.replicate(params)
        ann = self.task == "ann"
        block = part.block_size(m, reps, self.dim if ann else 4, self.config.search.query_batch)
        top, score, n_cand = [], [], []
        for batch, n in query_blocks(queries, block):
            out = part.search(route_fn, self._sharded_params[reps], self.model_input(batch), batch if ann else None,
                              m=m, reps=reps, min_count=setting.get("min_count", 1), k=k,
                              metric=kernel_metric(self.metric) if ann else None)
            for acc, a in zip((top, score, n_cand), out):
                acc.append(np.asarray(a)[:n])
        ids = np.concatenate(top)
        return SearchResult(ids=ids.astype(np.int64) if ann else ids, scores=np.concatenate(score),
                            n_candidates=np.concatenate(n_cand))

    @functools.cached_property
    def _mach_scores(self):
        """Jitted (params, x, k) -> top-k (scores, labels) by the sum over r of the logit of each label's bucket."""
        assign = jnp.asarray(self.arrays["assign"])
        apply = self.model.apply

        @partial(jax.jit, static_argnames="k")
        def scores_topk(params, x, k):
            _, logits = apply(params, x)  # [b, R, B]
            per_rep = jax.vmap(lambda lg, a: jnp.take(lg, a, axis=-1), in_axes=(1, 0))(logits, assign)
            return jax.lax.top_k(per_rep.sum(0), k)

        return scores_topk

    def _search_mach(self, queries, k: int) -> SearchResult:
        """Exhaustive MACH estimator: every label scored by the sum over r of its bucket's logit."""
        k_eff = min(k, len(self))
        tops, ids = [], []
        for batch, n in query_blocks(queries, self.config.search.query_batch):
            score, top = self._mach_scores(self.params, self.model_input(batch), k_eff)
            tops.append(np.asarray(score)[:n])
            ids.append(np.asarray(top)[:n])
        top, score = np.concatenate(ids).astype(np.int32), np.concatenate(tops)
        if k > k_eff:
            pad = ((0, 0), (0, k - k_eff))
            top, score = np.pad(top, pad, constant_values=-1), np.pad(score, pad, constant_values=-np.inf)
        return SearchResult(ids=top, scores=score, n_candidates=np.full(len(top), len(self), np.int32))

    # --- add / remove (ANN) ---------------------------------------------------------------------
    @functools.cached_property
    def _logits_fn(self):
        """Jitted (params, x) -> router logits, compiled once per index (not once per `add`)."""
        return jax.jit(lambda p, b: self.model.apply(p, b)[1])

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """Router logits [n, R, B] of vectors x."""
        out = [np.asarray(self._logits_fn(self.params, self.model_input(b)))[:n]
               for b, n in query_blocks(x, self.config.search.query_batch)]
        return np.concatenate(out) if out else np.zeros((0, self.n_reps, self.n_buckets), np.float32)

    def add(self, vectors) -> np.ndarray:
        """Place new vectors by the trained routers (no retraining), each repetition by the rule of the
        re-partition: the least filled of the item's top-K buckets (scores centred per bucket when the
        config centres them), within the capacity cap. Returns the new ids."""
        if self.task != "ann":
            return super().add(vectors)
        x = self._prepare(vectors, "vectors")
        p = self.config.partition
        if len(x) == 0:
            return np.zeros(0, np.int64)
        scores = self._logits(x)
        if p.center_scores:
            if "center" not in self.arrays:  # each bucket's mean logit over the items, as in training
                rows = center_rows(len(self.arrays["vectors"]), self.config)
                self.arrays["center"] = self._logits(self.arrays["vectors"][rows]).mean(0).astype(np.float32)
            scores = scores - self.arrays["center"][None]
        n_total = len(self.arrays["ids"]) + len(x)
        K = p.top_k
        ranked = min(self.n_buckets, max(K, p.fallback_candidates)) if p.capacity_factor else K
        cand = np.ascontiguousarray(np.argsort(-scores, axis=-1, kind="stable")[..., :ranked].transpose(1, 0, 2),
                                    np.int32)
        capacity = int(np.ceil(p.capacity_factor * n_total / self.n_buckets)) if p.capacity_factor else 0
        counts = np.diff(self.arrays["offsets"], axis=1).astype(np.int64)
        new_assign = kernels.balanced_assign(cand, self.n_buckets, capacity=capacity, initial_counts=counts,
                                             n_choices=K)
        new_ids = np.arange(self.info["next_id"], self.info["next_id"] + len(x), dtype=np.int64)
        codes = (np.concatenate([self.arrays["pq4_codes"], pq4.codes_of(self.arrays, x, x)])
                 if self.quantized else None)  # the new vectors' codes with the index's codebooks
        self._relayout(np.concatenate([self.arrays["vectors"], x]), np.concatenate([self.arrays["ids"], new_ids]),
                       np.concatenate([self._row_buckets(), new_assign], axis=1), codes)
        self.info["next_id"] = int(new_ids[-1]) + 1
        return new_ids

    def remove(self, ids) -> None:
        """Remove items by id: they are never returned again (their rows leave every repetition)."""
        if self.task != "ann":
            return super().remove(ids)
        keep = np.ones(len(self.arrays["ids"]), bool)
        keep[rows_of_ids(self.arrays["ids"], ids)] = False
        self._relayout(self.arrays["vectors"][keep], self.arrays["ids"][keep], self._row_buckets()[:, keep],
                       self.arrays["pq4_codes"][keep] if self.quantized else None)

    def _row_buckets(self) -> np.ndarray:
        """The bucket of every row in every repetition [R, N], read off the CSR."""
        offsets, members = self.arrays["offsets"], self.arrays["members"]
        out = np.empty(members.shape, np.int32)
        for r in range(self.n_reps):
            out[r, members[r]] = np.repeat(np.arange(self.n_buckets, dtype=np.int32), np.diff(offsets[r]))
        return out

    def _relayout(self, vectors, ids, assign, codes=None) -> None:
        """The arrays of rows `vectors`, `ids`, `codes` (quantized) in repetition 0's bucket order, the CSR of
        their buckets `assign` [R, N]; the PQ blocks are rebuilt on next use."""
        order = np.argsort(assign[0], kind="stable")
        self.arrays.update(vectors=np.ascontiguousarray(vectors[order]), ids=ids[order],
                           **_csr(np.ascontiguousarray(assign[:, order]), self.n_buckets))
        if codes is not None:
            self.arrays["pq4_codes"] = np.ascontiguousarray(codes[order])
        self._blocks = None
        self.info["n_items"] = len(ids)
        if self._sharded is not None:  # the shards whose items changed follow
            self._sharded.update(self._row_buckets(), self.arrays["ids"], self.arrays["vectors"])


IRLI.index_type = IRLIIndex


def _csr(assign: np.ndarray, n_buckets: int) -> dict:
    part = Partition.from_assignment(assign, n_buckets)
    return {"offsets": part.offsets, "members": part.members}


def _train_points(data: ANNData, config) -> np.ndarray:
    """Base rows used as training points (all, or a seeded sample of train.max_train_points)."""
    return sample_rows(data.n_items, config.train.max_train_points, [config.seed, 7])


def sample_rows(n: int, cap: int, seed) -> np.ndarray:
    """Rows 0..n-1 (all when cap is 0 or >= n, else a seeded sample of cap), ascending."""
    if not cap or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def center_rows(n: int, config) -> np.ndarray:
    """The items whose mean logit centres each bucket's scores (`partition.center_sample`: a seeded
    sample, since a bucket's mean over 64K items is as good as over millions at a fraction of the pass)."""
    return sample_rows(n, config.partition.get("center_sample", 0), [config.seed, 11])
