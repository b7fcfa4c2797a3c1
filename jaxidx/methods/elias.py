"""ELIAS: end-to-end learning to index and search (Gupta et al., NeurIPS 2022).

An encoder phi(x) feeds a cluster classifier over C label clusters and one
binary classifier per label. Labels hang off clusters by a sparse weighted
adjacency A [C, L] (each cluster row holds at most `width` labels):

  cluster score   s_c  = min(1, alpha * softmax(W_C phi + b_C)_c)
  edge weight     a_cl = 1 on the initial clustering (stage 1), or
                         min(1, beta * softmax over row c of the learnable edge logits) (stage 2)
  path score      p_l  = max over beam clusters c of s_c * a_cl   (the best path)
  label score     p_l * sigmoid(w_l . phi + b_l)   for the top-K labels by path score

Stage 1 trains on the fixed balanced clustering of PIFA label features.
From its model the approximate adjacency is built (each cluster row keeps the
kappa labels that the training points routed to it most strongly) and stage 2
learns the edge weights on that sparsity pattern, starting from stage 1's
encoder and cluster classifier. The loss in both stages: BCE on the K
shortlisted labels (positives outside the shortlist are ignored) plus
lambda * BCE on the path scores of the positives. Training adds the clusters
of the positive labels to the beam (teacher forcing).

Search: encoder -> top-b clusters -> `merge_topk(agg="max")` over A as a soft
partition with R = 1 (the K best paths) -> label classifiers on that
shortlist -> top k. The host (C++) and device (JAX) merge give identical results.

All path maths runs in log space (log s_c = min(0, log alpha + log_softmax)),
so no score underflows to a log of zero; -1e30 marks an absent edge or label.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp
from jax.sharding import PartitionSpec as P

from jaxidx import clustering
from jaxidx import search as kernels
from jaxidx.data.types import XMCData
from jaxidx.methods.common import SearchResult, check_queries, check_tokens, validate_common
from jaxidx.models.encoder import MLPEncoder, TransformerEncoder
from jaxidx.partition import Partition
from jaxidx.train import batches as B_
from jaxidx.train import mesh as mesh_lib

log = logging.getLogger(__name__)

NEG = -1e30  # log score of an absent edge / label: finite, so no inf or NaN reaches a gradient
_BIG_ID = np.iinfo(np.int32).max  # sorts padding after every label id
STAGES = ("stage1", "stage2")
INPUTS = ("sparse", "dense", "text")  # embedding bag over features | densified features | transformer over tokens


# --- model maths (pure) ------------------------------------------------------------------------------

def log_cluster_scores(logits: jax.Array, alpha: float) -> jax.Array:
    """log s_c = log min(1, alpha * softmax(logits)_c), [b, C]."""
    return jnp.minimum(0.0, math.log(alpha) + jax.nn.log_softmax(logits, axis=-1))


def log_edge_weights(edge_logits: Optional[jax.Array], members: jax.Array, beta: float) -> jax.Array:
    """log a_cj for the adjacency table `members` [C, width] (-1 = no edge).

    `edge_logits` None: every edge has weight 1 (the fixed clustering of stage 1);
    else log min(1, beta * softmax over the row's edges). Absent edges get NEG.
    """
    valid = members >= 0
    if edge_logits is None:
        return jnp.where(valid, 0.0, NEG)
    logp = jax.nn.log_softmax(jnp.where(valid, edge_logits, NEG), axis=-1)
    return jnp.where(valid, jnp.minimum(0.0, math.log(beta) + logp), NEG)


def cluster_beam(logits: jax.Array, log_s: jax.Array, width: int, forced: Optional[jax.Array] = None):
    """The `width` best clusters per row by softmax probability: (ids [b, width], log s_c [b, width]).

    `forced` [b, P] cluster ids (-1 = none) are put in the beam first (teacher
    forcing: the clusters of the positive labels); the rest of the beam is the
    best remaining clusters. If there are more forced clusters than `width`,
    the best-scored of them are kept.
    """
    key = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    if forced is not None:
        rows = jnp.arange(logits.shape[0])[:, None]
        hit = jnp.zeros(logits.shape, jnp.float32).at[rows, jnp.where(forced >= 0, forced, 0)].max(
            (forced >= 0).astype(jnp.float32))
        key = key + 2.0 * hit
    _, ids = jax.lax.top_k(key, width)
    return ids, jnp.take_along_axis(log_s, ids, axis=1)


def expand_paths(beam_ids: jax.Array, beam_log_s: jax.Array, members: jax.Array, log_a: jax.Array):
    """Every (label, log path score) reachable from the beam: [b, W * width] each (label -1 = none)."""
    b = beam_ids.shape[0]
    labels = members[beam_ids].reshape(b, -1)
    log_path = (beam_log_s[..., None] + log_a[beam_ids]).reshape(b, -1)
    return labels, jnp.where(labels >= 0, log_path, NEG)


def best_paths(labels: jax.Array, log_path: jax.Array):
    """Each label once per row, with its best path: (sorted labels, best log path), [b, n] each.

    Rows are sorted by (label, path descending) with padding last; the first
    entry of each label keeps its path and repeats get NEG, so a label's best
    path is at the first position `searchsorted` finds for it.
    """
    key = jnp.where(labels >= 0, labels, _BIG_ID)
    pos = jax.lax.broadcasted_iota(jnp.int32, labels.shape, 1)
    key, _, perm = jax.lax.sort((key, -jax.lax.stop_gradient(log_path), pos), dimension=1, num_keys=2)
    first = jnp.concatenate([jnp.ones_like(key[:, :1], bool), key[:, 1:] != key[:, :-1]], axis=1)
    best = jnp.where(first & (key != _BIG_ID), jnp.take_along_axis(log_path, perm, axis=1), NEG)
    return key, best


def shortlist(sorted_labels: jax.Array, best: jax.Array, k: int):
    """The k labels with the best paths: (ids [b, k] (-1 = none), log path [b, k])."""
    vals, pos = jax.lax.top_k(best, k)
    ids = jnp.take_along_axis(sorted_labels, pos, axis=1)
    return jnp.where(vals > NEG / 2, ids, -1), vals


def lookup(sorted_labels: jax.Array, values: jax.Array, queries: jax.Array):
    """values at each query label [b, P] in rows sorted by label: (values, found); -1 queries are not found."""
    pos = jax.vmap(partial(jnp.searchsorted, side="left"))(sorted_labels, jnp.where(queries >= 0, queries, 0))
    pos = jnp.minimum(pos, sorted_labels.shape[1] - 1)
    found = (jnp.take_along_axis(sorted_labels, pos, axis=1) == queries) & (queries >= 0)
    return jnp.where(found, jnp.take_along_axis(values, pos, axis=1), NEG), found


def is_positive(ids: jax.Array, labels: jax.Array) -> jax.Array:
    """[b, k] bool: ids[i, j] is among the positives labels[i] (ascending, -1 padded at the end)."""
    sorted_pos = jnp.where(labels >= 0, labels, _BIG_ID)
    _, found = lookup(sorted_pos, jnp.zeros(labels.shape, jnp.float32), ids)
    return found


def dense_best_paths(labels: jax.Array, log_path: jax.Array, n_rows: int) -> jax.Array:
    """Best log path of every label [b, n_rows] (NEG: not reachable from the beam), by scatter-max."""
    rows = jnp.arange(labels.shape[0])[:, None]
    return jnp.full((labels.shape[0], n_rows), NEG, log_path.dtype).at[rows, jnp.where(labels >= 0, labels, 0)].max(
        jnp.where(labels >= 0, log_path, NEG))


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 keys ordered like the float32 values x."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def top_k_mask(x: jax.Array, k: int) -> jax.Array:
    """[b, n] bool: x is among the k largest of its row (every entry tied with the k-th is kept).

    The k-th largest value is found exactly by bisection on order-preserving
    integer keys (32 passes of compare-and-count): unlike a sort or top_k,
    this costs O(n) per pass on a CPU.
    """
    key = _order_key(x)

    def body(_, bounds):
        lo, hi = bounds  # invariant: at least k keys >= lo
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)
        ok = jnp.sum(key >= mid[:, None], axis=1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    b = x.shape[0]
    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros(b, jnp.uint32), jnp.full(b, 0xFFFFFFFF, jnp.uint32)))
    return key >= lo[:, None]


def multi_hot(labels: jax.Array, n_rows: int) -> jax.Array:
    """[b, n_rows] bool targets from padded label lists [b, P] (-1 = none)."""
    rows = jnp.arange(labels.shape[0])[:, None]
    return jnp.zeros((labels.shape[0], n_rows), bool).at[rows, jnp.where(labels >= 0, labels, 0)].max(labels >= 0)


def label_logits(labels_params: dict, phi: jax.Array, ids: jax.Array, dense: bool) -> jax.Array:
    """w_l . phi + b_l for the labels `ids` [b, k] (-1 rows read label 0 and are masked by the caller).

    dense: all labels' logits phi @ W^T, then a gather (cheapest while L is
    below about batch * k); else gather the k classifier rows per example
    (memory b * k * d, independent of L).
    """
    W, bias = labels_params["kernel"], labels_params["bias"]
    safe = jnp.where(ids >= 0, ids, 0)
    if dense:
        return jnp.take_along_axis(phi @ W.T + bias, safe, axis=1)
    return jnp.einsum("bd,bkd->bk", phi, jnp.take(W, safe, axis=0)) + jnp.take(bias, safe)


def elias_loss(log_path: jax.Array, logits: jax.Array, valid: jax.Array, target: jax.Array,
               pos_log_path: jax.Array, pos_found: jax.Array, weight: jax.Array, lam: float, k: int,
               eps: float = 1e-6):
    """(loss, metrics) of a batch.

    Classification: BCE of p = path * sigmoid(logit) against `target` over the
    shortlist (the `valid` entries of [b, n]: n = K shortlisted labels, or all
    labels with a mask), averaged over weight * k. log p is exact; 1 - p is clipped at eps so a saturated
    negative has a finite loss. Shortlist: BCE of the path scores of the
    positives that have a path (`pos_found` [b, P]) against 1, i.e.
    -log path, averaged over them. Total = classification + lam * shortlist.
    """
    log_p = log_path + jax.nn.log_sigmoid(logits)
    p = jnp.minimum(jnp.exp(log_p), 1.0 - eps)
    bce = jnp.where(target, -log_p, -jnp.log1p(-p))
    w = weight[:, None]
    cls = jnp.sum(jnp.where(valid, bce, 0.0) * w) / jnp.maximum(jnp.sum(weight) * k, 1.0)
    n_pos = jnp.sum(pos_found * w)
    path = jnp.sum(jnp.where(pos_found, -pos_log_path, 0.0) * w) / jnp.maximum(n_pos, 1.0)
    return cls + lam * path, {"loss_classification": cls, "loss_shortlist": path}


# --- host-side index construction --------------------------------------------------------------------

def approximate_adjacency(Y, beam_ids: np.ndarray, beam_scores: np.ndarray, n_clusters: int, kappa: int,
                          keep_best: bool = False):
    """A = top-kappa labels per cluster row of (Y^T M)^T, M [N, C] the training points' beam scores.

    `Y` [N, L] binary CSR, `beam_ids` / `beam_scores` [N, b]. Row c's value for
    label l sums the scores with which l's training points reached c; ties keep
    the smaller label id. `keep_best`: every label keeps one edge, in its best
    row that has room (`reserved_edges`), ranked first in that row, so rare
    labels that frequent ones crowd out of every top-kappa are still reachable
    (rows stay capped at kappa).
    Returns members int32 [C, kappa] (-1 padding) and values float32 [C, kappa].
    """
    N, b = beam_ids.shape
    M = sp.csr_matrix((beam_scores.ravel().astype(np.float32), beam_ids.ravel().astype(np.int64),
                       np.arange(0, N * b + 1, b)), shape=(N, n_clusters))
    A = sp.csr_matrix(sp.csr_matrix(Y, dtype=np.float32).T @ M).T.tocsr()
    A.sum_duplicates()
    A.eliminate_zeros()
    rows = np.repeat(np.arange(n_clusters), np.diff(A.indptr))
    first = reserved_edges(rows, A.indices, A.data, n_clusters, kappa) if keep_best else np.zeros(A.nnz, bool)
    order = np.lexsort((A.indices, -A.data, ~first, rows))
    rank = np.arange(A.nnz) - A.indptr[rows[order]]
    top = rank < kappa
    keep, col = order[top], rank[top]
    members = np.full((n_clusters, kappa), -1, np.int32)
    values = np.zeros((n_clusters, kappa), np.float32)
    members[rows[keep], col] = A.indices[keep]
    values[rows[keep], col] = A.data[keep]
    return members, values


def reserved_edges(rows: np.ndarray, labels: np.ndarray, values: np.ndarray, n_rows: int, capacity: int):
    """bool per edge: the one edge each label keeps, at most `capacity` per row.

    In round r every label without an edge yet proposes its r-th best row (by
    value, ties to the smaller row); each row accepts the strongest proposals
    (ties to the smaller label) while it has room. A label is left out only when
    every row it reaches is full.
    """
    by_label = np.lexsort((rows, -values, labels))
    lab = labels[by_label]
    starts = np.flatnonzero(np.concatenate([[True], lab[1:] != lab[:-1]]))
    counts = np.diff(np.append(starts, len(lab)))
    free = np.full(n_rows, capacity, np.int64)
    keep = np.zeros(len(rows), bool)
    pending = np.arange(len(starts))  # label groups without an edge
    r = 0
    while len(pending) and free.any():
        pending = pending[counts[pending] > r]
        edge = by_label[starts[pending] + r]
        order = np.lexsort((labels[edge], -values[edge], rows[edge]))
        edge, group = edge[order], pending[order]
        row = rows[edge]
        rank = np.arange(len(row)) - np.searchsorted(row, row)  # position among this round's proposals to the row
        ok = rank < free[row]
        keep[edge[ok]] = True
        np.subtract.at(free, row[ok], 1)
        pending = np.sort(group[~ok])
        r += 1
    return keep


def home_clusters(members: np.ndarray, weights: np.ndarray, n_labels: int) -> np.ndarray:
    """Each label's cluster of largest edge weight (ties to the smaller cluster), -1 if it has no edge."""
    C, width = members.shape
    rows = np.repeat(np.arange(C, dtype=np.int32), width)
    lab, w = members.ravel(), weights.ravel()
    ok = lab >= 0
    rows, lab, w = rows[ok], lab[ok], w[ok]
    order = np.lexsort((rows, -w, lab))
    lab, rows = lab[order], rows[order]
    first = np.concatenate([[True], lab[1:] != lab[:-1]])
    home = np.full(n_labels, -1, np.int32)
    home[lab[first]] = rows[first]
    return home


def soft_partition(members: np.ndarray, weights: np.ndarray) -> Partition:
    """The adjacency table [C, width] as a one-repetition CSR Partition with edge weights."""
    ok = members >= 0
    offsets = np.concatenate([[0], np.cumsum(ok.sum(axis=1))]).astype(np.int32)[None]
    return Partition(offsets=offsets, members=np.ascontiguousarray(members[ok][None], np.int32),
                     weights=np.ascontiguousarray(weights[ok][None], np.float32))


def warmup_linear(peak: float, total_steps: int, warmup: float):
    """0 -> peak over the first `warmup` fraction of steps, then linearly to 0 at total_steps."""
    n_warm = max(1, int(warmup * total_steps))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, n_warm),
                                 optax.linear_schedule(peak, 0.0, max(1, total_steps - n_warm))], [n_warm])


# --- config ------------------------------------------------------------------------------------------

def validate_config(config, n_labels: int) -> None:
    m, t = config.model, config.train
    validate_common(config)
    for name in ("max_leaf", "beam", "kappa", "shortlist", "label_multiple"):
        if m[name] < 1:
            raise ValueError(f"model.{name}: must be >= 1, got {m[name]}")
    if m.teacher_extra < 0:
        raise ValueError(f"model.teacher_extra: must be >= 0, got {m.teacher_extra}")
    for name, value in (("model.alpha", m.alpha), ("model.beta", m.beta), ("train.encoder_learning_rate",
                        t.encoder_learning_rate)):
        if not value > 0:
            raise ValueError(f"{name}: must be > 0, got {value}")
    for name, value in (("model.lam", m.lam), ("train.weight_decay", t.weight_decay),
                        ("train.stage2_epochs", t.stage2_epochs)):
        if not value >= 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")
    if not 0 <= m.dropout < 1:
        raise ValueError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.input not in INPUTS:
        raise ValueError(f"model.input: must be one of {', '.join(INPUTS)}, got {m.input!r}")
    if m.layout not in ("dense", "sparse"):
        raise ValueError(f"model.layout: must be 'dense' or 'sparse', got {m.layout!r}")
    if clustering.n_leaves_for(n_labels, m.max_leaf) > n_labels:
        raise ValueError(f"model.max_leaf: {m.max_leaf} gives more clusters than the {n_labels} labels")
    if not 0 <= t.warmup < 1:
        raise ValueError(f"train.warmup: must be in [0, 1), got {t.warmup}")
    for s in config.search.settings:
        if s.get("backend", "host") not in ("host", "device"):
            raise ValueError(f"search.settings: backend must be 'host' or 'device', got {s['backend']!r}")
        if s.get("beam", 1) < 1 or s.get("shortlist", 1) < 1:
            raise ValueError(f"search.settings: beam and shortlist must be >= 1, got {s}")


# --- the method --------------------------------------------------------------------------------------

class ELIAS:
    """ELIAS on XMC data, trained in two stages (`stages`, `stage(name, previous)`).

    Stage s trains in `workdir/<s>` (see `jaxidx.train.loop.fit_stages`); the
    object returned by `stage` is the `Trainable` and builds the index.
    """

    name = "elias"
    stages = STAGES

    def __init__(self, config, data, mesh):
        if not isinstance(data, XMCData):
            raise TypeError(f"ELIAS: needs XMC data, got {type(data).__name__}")
        self.config, self.data, self.mesh = config, data, mesh
        self.n_labels, self.n_features = data.n_labels, data.n_features
        validate_config(config, self.n_labels)
        m = config.model
        self.n_clusters = clustering.n_leaves_for(self.n_labels, m.max_leaf)
        self.n_label_rows = -(-self.n_labels // m.label_multiple) * m.label_multiple
        self.inputs = B_.xmc_inputs(data.X_train, data.tokens_train)
        self.labels = B_.pad_label_lists(data.Y_train)
        if m.input == "text":
            if data.tokens_train is None:
                raise ValueError(f"model.input: 'text' needs a data set with raw text; {data.name} has none "
                                 "(see jaxidx.data.text)")
            tr = m.transformer
            self.encoder = TransformerEncoder(data.vocab_size, tuple(m.hidden), data.tokens_train.shape[1], tr.dim,
                                              tr.heads, tr.layers, tr.mlp_ratio, m.dropout, m.init_std)
        else:
            self.encoder = MLPEncoder(tuple(m.hidden), self.n_features if m.input == "sparse" else 0, m.dropout,
                                      m.init_std)
        self.n_train = self.labels.shape[0]

    def stage(self, name: str, previous=None) -> "ELIASStage":
        """The Trainable of stage `name`; stage 2 starts from stage 1's `FitResult` (None: for restoring)."""
        if name not in STAGES:
            raise ValueError(f"ELIAS stage: unknown {name!r}; valid: {', '.join(STAGES)}")
        return ELIASStage(self, STAGES.index(name) + 1, previous)

    def features(self, x):
        """Encoder input from `xmc_inputs` rows: sparse rows, densified rows or token ids (model.input)."""
        kind = self.config.model.input
        if kind == "text":
            return x["tokens"]
        if kind == "dense":
            return B_.densify_rows(x, self.n_features)
        return {"idx": x["idx"], "val": x["val"]}


class ELIASStage:
    """One training stage of ELIAS as a `Trainable`; `index(params, aux)` gives the searchable index."""

    name = "elias"

    def __init__(self, method: ELIAS, stage: int, previous=None):
        self.method, self.stage, self.previous = method, stage, previous
        self.config, self.mesh = method.config, method.mesh
        m, t = self.config.model, self.config.train
        self.epochs = t.epochs if stage == 1 else t.stage2_epochs
        self.batch_size = t.batch_size
        self.steps_per_epoch = B_.steps_per_epoch(method.n_train, self.batch_size)
        C, L = method.n_clusters, method.n_labels
        self.width = -(-L // C) if stage == 1 else min(m.kappa, L)
        self.train_beam = min(C, m.beam + m.teacher_extra)
        self.train_k = min(m.shortlist, self.train_beam * self.width)
        self._route = jax.jit(self.route, static_argnames="beam")

    # --- model -----------------------------------------------------------------------------------
    def encode(self, params, x, rng=None):
        """phi(x) [b, d]; dropout is on when a PRNG key is given (training)."""
        rngs = None if rng is None else {"dropout": rng}
        return self.method.encoder.apply({"params": params["encoder"]}, x, deterministic=rng is None, rngs=rngs)

    def cluster_logits(self, params, phi):
        return phi @ params["clusters"]["kernel"] + params["clusters"]["bias"]

    def log_edges(self, params, members):
        return log_edge_weights(params.get("edges"), members, self.config.model.beta)

    def route(self, params, x, beam: int):
        """Search route: (phi [b, d], top-`beam` cluster ids [b, beam] int32, their scores s_c [b, beam])."""
        phi = self.encode(params, x)
        logits = self.cluster_logits(params, phi)
        ids, log_s = cluster_beam(logits, log_cluster_scores(logits, self.config.model.alpha), beam)
        return phi, ids.astype(jnp.int32), jnp.exp(log_s)

    # --- Trainable -------------------------------------------------------------------------------
    def init(self, rng):
        m, method = self.config.model, self.method
        k_enc, k_cls, k_lab, k_edge = jax.random.split(rng, 4)
        d = m.hidden[-1]
        x0 = method.features(B_.take(method.inputs, np.arange(1)))
        params = {
            "encoder": method.encoder.init(k_enc, x0)["params"],
            "clusters": {"kernel": jax.nn.initializers.lecun_normal()(k_cls, (d, method.n_clusters)),
                         "bias": jnp.zeros(method.n_clusters)},
            "labels": {"kernel": jax.nn.initializers.lecun_normal()(k_lab, (method.n_label_rows, d)),
                       "bias": jnp.zeros(method.n_label_rows)},
        }
        if self.stage == 1:
            leaf = self._initial_clustering()
            return params, {"members": clustering.leaf_members(leaf, method.n_clusters), "home": leaf}
        # Stage 2: edge logits uniform in [0, 1) as in the original; the rest from stage 1.
        params["edges"] = jax.random.uniform(k_edge, (method.n_clusters, self.width))
        if self.previous is None:  # restoring a checkpoint: only the shapes matter
            return params, {"members": np.full((method.n_clusters, self.width), -1, np.int32),
                            "home": np.full(method.n_labels, -1, np.int32)}
        prev = mesh_lib.to_host(self.previous.params)
        params["encoder"], params["clusters"] = prev["encoder"], prev["clusters"]
        if not self.config.train.stage2_reinit_labels:
            params["labels"] = prev["labels"]
        members, _ = self._approximate_adjacency(prev)
        return params, {"members": members, "home": self._home(params, members)}

    def optimizer(self, total_steps):
        """AdamW (no decay on biases) with warmup-then-linear-decay; encoder and classifiers at their own rates."""
        t = self.config.train

        def adamw(lr):
            return optax.adamw(warmup_linear(lr, total_steps, t.warmup), weight_decay=t.weight_decay,
                               mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))

        return optax.multi_transform(
            {"encoder": adamw(t.encoder_learning_rate), "classifiers": adamw(t.learning_rate)},
            lambda p: {k: jax.tree.map(lambda _: "encoder" if k == "encoder" else "classifiers", v)
                       for k, v in p.items()})

    def loss(self, params, batch, aux, rng):
        m = self.config.model
        labels = batch["labels"]
        phi = self.encode(params, batch["x"], rng)
        logits = self.cluster_logits(params, phi)
        forced = jnp.where(labels >= 0, jnp.take(aux["home"], jnp.where(labels >= 0, labels, 0)), -1)
        beam_ids, beam_log_s = cluster_beam(logits, log_cluster_scores(logits, m.alpha), self.train_beam, forced)
        cand, cand_log_path = expand_paths(beam_ids, beam_log_s, aux["members"],
                                           self.log_edges(params, aux["members"]))
        if m.layout == "dense":  # [b, label rows]: scatter-max, threshold by bisection, one matmul
            log_path = dense_best_paths(cand, cand_log_path, self.method.n_label_rows)
            valid = log_path > NEG / 2
            if self.train_k < self.train_beam * self.width:
                valid &= top_k_mask(log_path, self.train_k)
            u = phi @ params["labels"]["kernel"].T + params["labels"]["bias"]
            target = multi_hot(labels, self.method.n_label_rows)
            pos_log_path = jnp.take_along_axis(log_path, jnp.where(labels >= 0, labels, 0), axis=1)
            pos_found = (labels >= 0) & (pos_log_path > NEG / 2)
        elif self.stage == 1:  # [b, K], hard partition: one path per label, so no merge (sort) is needed
            log_path, pos = jax.lax.top_k(cand_log_path, self.train_k)
            ids = jnp.where(log_path > NEG / 2, jnp.take_along_axis(cand, pos, axis=1), -1)
            valid = ids >= 0
            u = label_logits(params["labels"], phi, ids, dense=False)
            target = is_positive(ids, labels)
            on_beam = (beam_ids[:, None, :] == forced[:, :, None]) & (labels >= 0)[:, :, None]  # home in the beam
            pos_log_path = jnp.max(jnp.where(on_beam, beam_log_s[:, None, :], NEG), axis=-1)
            pos_found = on_beam.any(-1)
        else:  # [b, K]: sort-based best paths, top-K, gathered classifier rows (no [b, L] array)
            sorted_labels, best = best_paths(cand, cand_log_path)
            ids, log_path = shortlist(sorted_labels, best, self.train_k)
            valid = ids >= 0
            u = label_logits(params["labels"], phi, ids, dense=False)
            target = is_positive(ids, labels)
            pos_log_path, pos_found = lookup(sorted_labels, best, labels)
        loss, metrics = elias_loss(log_path, u, valid, target, pos_log_path, pos_found, batch["weight"], m.lam,
                                   self.train_k)
        w = batch["weight"][:, None]
        n_pos = jnp.maximum(jnp.sum((labels >= 0) * w), 1.0)
        metrics["shortlist_recall"] = jnp.sum((target & valid) * w) / n_pos
        metrics["path_recall"] = jnp.sum(pos_found * w) / n_pos
        return loss, metrics

    def batch(self, epoch, index):
        method = self.method
        order = B_.epoch_order(method.n_train, self.config.seed, epoch)
        rows, weight = B_.batch_rows(order, index, self.batch_size, mesh_lib.process_shard(self.mesh))
        return {"x": method.features(B_.take(method.inputs, rows)), "labels": method.labels[rows],
                "weight": weight}

    def device_aux(self, aux):
        return {"members": aux["members"], "home": aux["home"]}

    def end_of_epoch(self, epoch, params, aux):
        """Stage 2: each label's teacher-forced cluster follows its currently heaviest edge."""
        if self.stage == 1:
            return aux, {}
        home = self._home(mesh_lib.to_host(params), aux["members"])
        moved = float((home != aux["home"]).mean())
        return dict(aux, home=home), {"home_moved": moved}

    def leaf_spec(self, leaf):
        """Label classifier rows, and edge-logit rows, split over 'model' (for millions of labels)."""
        mp = self.mesh.shape[mesh_lib.MODEL]
        shape = getattr(leaf, "shape", ())
        if mp > 1 and len(shape) >= 1 and shape[0] == self.method.n_label_rows and shape[0] % mp == 0:
            return P(mesh_lib.MODEL)
        if mp > 1 and tuple(shape) == (self.method.n_clusters, self.width) and shape[0] % mp == 0:
            return P(mesh_lib.MODEL)
        return P()

    def shapes(self):
        m, method = self.config.model, self.method
        return {"stage": self.stage, "n_labels": method.n_labels, "n_features": method.n_features,
                "n_clusters": method.n_clusters, "width": self.width, "hidden": list(m.hidden),
                "input": m.input, "label_rows": method.n_label_rows,
                **({"vocab_size": method.data.vocab_size, "transformer": dict(m.transformer)}
                   if m.input == "text" else {})}

    # --- clustering and adjacency ----------------------------------------------------------------
    def _initial_clustering(self) -> np.ndarray:
        data = self.method.data
        feats = clustering.pifa(data.X_train, data.Y_train)
        leaf = clustering.balanced_tree(feats, self.method.n_clusters, seed=self.config.seed)
        log.info("initial clustering: %d labels into %d balanced leaves of <= %d", self.method.n_labels,
                 self.method.n_clusters, self.width)
        return leaf

    def _approximate_adjacency(self, params):
        """Members [C, width] of A from stage 1's top-b clusters of every training point."""
        method, m = self.method, self.config.model
        beam = min(m.beam, method.n_clusters)
        bs = self.config.search.query_batch
        ids, scores = [], []
        for s in range(0, method.n_train, bs):
            x = method.features(B_.take(method.inputs, np.arange(s, min(s + bs, method.n_train))))
            _, i, sc = self._route(params, x, beam=beam)
            ids.append(np.asarray(i))
            scores.append(np.asarray(sc))
        members, values = approximate_adjacency(method.data.Y_train, np.concatenate(ids), np.concatenate(scores),
                                                method.n_clusters, self.width, m.keep_best_edge)
        seen = np.asarray(method.data.Y_train.getnnz(axis=0)) > 0
        covered = np.zeros(method.n_labels, bool)
        covered[members[members >= 0]] = True
        log.info("approximate adjacency: %d edges; %.4f of the labels seen in training have one",
                 int((members >= 0).sum()), covered[seen].mean())
        return members, values

    def _home(self, params, members):
        w = np.exp(np.asarray(self.log_edges(params, jnp.asarray(members))))
        return home_clusters(members, w, self.method.n_labels)

    # --- search ----------------------------------------------------------------------------------
    def index(self, params, aux) -> "ELIASIndex":
        members = aux["members"]
        weights = np.exp(np.asarray(self.log_edges(params, jnp.asarray(members)), np.float32))
        return ELIASIndex(self, params, soft_partition(members, weights))


@dataclasses.dataclass
class ELIASIndex:
    """A trained ELIAS model and its adjacency as a soft one-repetition partition."""

    stage: ELIASStage
    params: dict
    partition: Partition

    def __post_init__(self):
        self._rank = jax.jit(self.rank, static_argnames="k")
        self._max_bucket = kernels.device.max_bucket_size_of(self.partition.offsets)

    def rank(self, params, phi, ids, paths, k: int):
        """Final scores path * sigmoid(w_l . phi + b_l) of the shortlist [b, K] -> top k (ids, scores)."""
        u = label_logits(params["labels"], phi, ids, dense=False)  # K << L rows: cheaper than all labels
        score = jnp.where(ids >= 0, paths * jax.nn.sigmoid(u), -jnp.inf)
        top, pos = jax.lax.top_k(score, k)
        return jnp.where(top > -jnp.inf, jnp.take_along_axis(ids, pos, axis=1), -1), top

    def search(self, queries, setting: dict, k: int) -> SearchResult:
        """Top-k labels of padded sparse queries; setting: beam, shortlist (K), backend ('host' | 'device')."""
        check_queries(queries, self.stage.method.n_features)
        if self.stage.config.model.input == "text":
            data = self.stage.method.data
            check_tokens(queries.get("tokens"), data.vocab_size, data.tokens_train.shape[1])
        st, cfg = self.stage, self.stage.config
        beam = min(setting.get("beam", cfg.model.beam), st.method.n_clusters)
        K = setting.get("shortlist", cfg.model.shortlist)
        device = setting.get("backend", "host") == "device"
        part = self.partition
        bs = cfg.search.query_batch
        n = queries["idx"].shape[0]
        out_ids, out_cand = [], []
        for s in range(0, n, bs):
            # Every batch is padded to the full batch size: one compiled shape for all of them.
            rows = np.minimum(np.arange(s, s + bs), n - 1)
            x = st.method.features({key: v[rows] for key, v in queries.items()})
            phi, cids, cscores = st._route(self.params, x, beam=beam)
            if device:
                ids, paths, _, n_cand = kernels.device.merge_topk(
                    cids[:, None, :], cscores[:, None, :], part.offsets, part.members, part.weights, K, 1, "max",
                    max_bucket_size=self._max_bucket)
            else:
                ids, paths, _, n_cand = kernels.host.merge_topk(
                    np.asarray(cids)[:, None, :], np.asarray(cscores)[:, None, :], part.offsets, part.members,
                    part.weights, K, 1, "max", st.method.n_labels, cfg.search.n_threads)
            top, _ = self._rank(self.params, phi, ids, paths, k=min(k, K))
            top = np.asarray(top)[:min(bs, n - s)]
            if k > K:
                top = np.concatenate([top, np.full((top.shape[0], k - K), -1, np.int32)], axis=1)
            out_ids.append(top)
            out_cand.append(np.asarray(n_cand)[:min(bs, n - s)])
        return SearchResult(ids=np.concatenate(out_ids).astype(np.int32), n_candidates=np.concatenate(out_cand))
