"""ELIAS model maths, pure functions of arrays: cluster scores, beams, paths, shortlists, the loss,
and the encoder / router / ranker that training and search share. All path maths runs in log space
(log s_c = min(0, log alpha + log_softmax)), so no score underflows to a log of zero; -1e30 marks an
absent edge or label."""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxidx.models.encoder import MLPEncoder, TransformerEncoder
from jaxidx.train import batches as B_
from jaxidx.train.sparse_rows import take_rows

NEG = -1e30  # log score of an absent edge / label: finite, so no inf or NaN reaches a gradient
_BIG_ID = np.iinfo(np.int32).max  # sorts padding after every label id


def log_cluster_scores(log_p: jax.Array, alpha: float) -> jax.Array:
    """log s_c = log min(1, alpha * p_c) of the clusters' log probabilities `log_p` [b, C]."""
    return jnp.minimum(0.0, math.log(alpha) + log_p)


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


def cluster_beam(log_p: jax.Array, log_s: jax.Array, width: int, forced: Optional[jax.Array] = None):
    """The `width` best clusters per row by probability: (ids [b, width], log s_c [b, width]).

    `forced` [b, P] cluster ids (-1 = none) are put in the beam first (teacher
    forcing: the clusters of the positive labels); the rest of the beam is the
    best remaining clusters. If there are more forced clusters than `width`,
    the best-scored of them are kept.
    """
    key = jnp.exp(jax.lax.stop_gradient(log_p))
    if forced is not None:
        rows = jnp.arange(log_p.shape[0])[:, None]
        hit = jnp.zeros(log_p.shape, jnp.float32).at[rows, jnp.where(forced >= 0, forced, 0)].max(
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

    Rows are sorted by label with padding last; the first entry of each label
    holds its best path (the earliest of tied ones, which gets the gradient) and
    repeats get NEG, so a label's best path is at the first position
    `searchsorted` finds for it. The labels are sorted alone and each entry
    finds its run by `searchsorted`: XLA's CPU sort of one integer array is
    several times faster than its sort of (label, path, position) tuples.
    """
    key = jnp.where(labels >= 0, labels, _BIG_ID)
    sorted_key = jax.lax.sort(key, dimension=1)
    run = jax.vmap(partial(jnp.searchsorted, side="left"))(sorted_key, key)  # each entry's run start
    rows = jnp.arange(key.shape[0])[:, None]
    n = key.shape[1]
    value = jax.lax.stop_gradient(log_path)
    run_max = jnp.full(key.shape, -jnp.inf, value.dtype).at[rows, run].max(value)
    pos = jax.lax.broadcasted_iota(jnp.int32, key.shape, 1)
    is_max = value == jnp.take_along_axis(run_max, run, axis=1)
    winner = jnp.full(key.shape, n, jnp.int32).at[rows, run].min(jnp.where(is_max, pos, n))
    best = jnp.take_along_axis(log_path, jnp.minimum(winner, n - 1), axis=1)
    return sorted_key, jnp.where((winner < n) & (sorted_key != _BIG_ID), best, NEG)


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
    (memory b * k * d, independent of L; `labels_params` may be a `sparse_rows.RowTable`).
    """
    safe = jnp.where(ids >= 0, ids, 0)
    if dense:
        W, bias = labels_params["kernel"], labels_params["bias"]
        return jnp.take_along_axis(phi @ W.T + bias, safe, axis=1)
    rows = take_rows(labels_params, safe)
    return jnp.einsum("bd,bkd->bk", phi, rows["kernel"]) + rows["bias"]


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


# --- encoder, router and ranker (training and search) -------------------------------------------------

def make_encoder(config, n_features: int, vocab_size: int = 0, token_len: int = 0):
    """phi(x) of `model.input`: an MLP over sparse rows (embedding bag) or densified rows, or a small
    transformer over token ids."""
    m = config.model
    if m.input == "text":
        tr = m.transformer
        return TransformerEncoder(vocab_size, tuple(m.hidden), token_len, tr.dim, tr.heads, tr.layers, tr.mlp_ratio,
                                  m.dropout, m.init_std)
    return MLPEncoder(tuple(m.hidden), n_features if m.input == "sparse" else 0, m.dropout, m.init_std)


def encoder_input(kind: str, x: dict, n_features: int):
    """Encoder input from `xmc_inputs` rows: sparse rows, densified rows or token ids (`model.input`)."""
    if kind == "text":
        return x["tokens"]
    if kind == "dense":
        return B_.densify_rows(x, n_features)
    return {"idx": x["idx"], "val": x["val"]}


def encode(encoder, params, x, rng=None):
    """phi(x) [b, d]; dropout is on when a PRNG key is given (training)."""
    rngs = None if rng is None else {"dropout": rng}
    return encoder.apply({"params": params["encoder"]}, x, deterministic=rng is None, rngs=rngs)


def cluster_logits(params, phi):
    return phi @ params["clusters"]["kernel"] + params["clusters"]["bias"]


def group_log_probs(params, phi):
    """log p of the first level of a cluster tree (`params` has 'groups'), [b, G]."""
    return jax.nn.log_softmax(phi @ params["groups"]["kernel"] + params["groups"]["bias"], axis=-1)


def cluster_log_probs(params, phi, group_beam: int = 0):
    """log p_c of every cluster [b, C]: the flat classifier's log softmax, or with a two-level tree
    ('groups' in params: G groups, group g owning the C / G clusters [g C/G, (g+1) C/G), siblings of the
    balanced clustering) log p_g + the log softmax among the cluster's siblings. `group_beam` > 0 (a
    tree's search): only the clusters of each row's top `group_beam` groups, the others NEG, which is
    what the host's `tree_beam` computes from those groups alone."""
    logits = cluster_logits(params, phi)
    if "groups" not in params:
        return jax.nn.log_softmax(logits, axis=-1)
    log_g = group_log_probs(params, phi)
    b, G = log_g.shape
    log_p = log_g[:, :, None] + jax.nn.log_softmax(logits.reshape(b, G, -1), axis=-1)
    if group_beam:
        _, top = jax.lax.top_k(log_g, group_beam)
        routed = jnp.zeros((b, G), bool).at[jnp.arange(b)[:, None], top].set(True)
        log_p = jnp.where(routed[:, :, None], log_p, NEG)
    return log_p.reshape(b, -1)


def route_clusters(encoder, alpha: float, params, x, beam: int, group_beam: int = 0):
    """Search route: (phi [b, d], top-`beam` cluster ids [b, beam] int32, their scores s_c [b, beam]);
    with a cluster tree, `beam` of the clusters below the top `group_beam` groups (beam at most
    group_beam x the group size)."""
    phi = encode(encoder, params, x)
    log_p = cluster_log_probs(params, phi, group_beam)
    ids, log_s = cluster_beam(log_p, log_cluster_scores(log_p, alpha), beam)
    return phi, ids.astype(jnp.int32), jnp.exp(log_s)


def route_groups(encoder, params, x, group_beam: int):
    """The first level of a cluster tree's search: (phi [b, d], top `group_beam` group ids [b, group_beam]
    int32, their log p [b, group_beam]); the host's `tree_beam` takes the second."""
    phi = encode(encoder, params, x)
    log_g, ids = jax.lax.top_k(group_log_probs(params, phi), group_beam)
    return phi, ids.astype(jnp.int32), log_g


def rank_shortlist(params, phi, ids, paths, k: int):
    """Final scores path * sigmoid(w_l . phi + b_l) of the shortlist [b, K] -> top k (ids, scores)."""
    u = label_logits(params["labels"], phi, ids, dense=False)  # K << L rows: cheaper than all labels
    score = jnp.where(ids >= 0, paths * jax.nn.sigmoid(u), -jnp.inf)
    top, pos = jax.lax.top_k(score, k)
    return jnp.where(top > -jnp.inf, jnp.take_along_axis(ids, pos, axis=1), -1), top
