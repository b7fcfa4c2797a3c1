"""ELIAS++'s sparse ranker: one linear classifier per label over the raw sparse input features, trained on
ELIAS's own shortlists (its hard negatives) and mixed into its final scores.

The ELIAS encoder squeezes the features into one embedding; a label with three training examples is where
per-label weights over the raw features (what PECOS's XR-Linear learns) do better. The ranker's logit for
(x, l) is  r_l(x) = sum_f w_lf x_f / ||x|| + b_l, with w_l stored sparse: only the features of the training
rows paired with l can carry weight (the gradient of every other w_lf is zero), so the support is the set
of (label, feature) pairs of the training pairs and memory is O(nnz), never O(L x F).

Storage is a CSR by label: `offsets` [L+1], `feats` [S] (sorted within each label), `w` [S], `b` [L].
Lookups are a bisection inside the label's segment, the same pure function in training and in search.
Search mixes the two scores of ELIAS's top `rerank` labels in log space:
  log score = (1 - a) log(ELIAS score) + a log sigmoid(r_l(x)),  a = `ranker_weight`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _pair_keys(labels: np.ndarray, idx: np.ndarray, val: np.ndarray, n_features: int):
    """(pair [Z], column [Z], key label * n_features + feature [Z]) of the nonzero entries of padded rows."""
    pair, col = np.nonzero(val)
    return pair, col, labels.astype(np.int64)[pair] * n_features + idx[pair, col]


def support(labels: np.ndarray, idx: np.ndarray, val: np.ndarray, n_labels: int,
            n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [L+1] int32, feats [S] int32): the distinct (label, feature) pairs of the training pairs
    (labels [n], padded rows idx, val [n, P]) over their nonzero features, sorted by label then feature."""
    keys = np.unique(_pair_keys(labels, idx, val, n_features)[2])
    offsets = np.zeros(n_labels + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(keys // n_features, minlength=n_labels))
    return offsets.astype(np.int32), (keys % n_features).astype(np.int32)


def entries(offsets: np.ndarray, feats: np.ndarray, labels: np.ndarray, idx: np.ndarray, val: np.ndarray,
            n_features: int) -> dict:
    """Training form of pairs (labels [n], padded rows idx, val [n, P]) over their own `support`, found once on
    the host: the nonzero entries flat, 'pair' [Z] (sorted), 'pos' [Z] (weight position) and 'val' [Z] (the
    value in the L2-normalised row)."""
    keys = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets)) * n_features + feats
    v = val / np.maximum(np.sqrt(np.sum(val * val, axis=1, keepdims=True)), 1e-12)
    pair, col, want = _pair_keys(labels, idx, val, n_features)
    return {"pair": pair.astype(np.int32), "pos": np.searchsorted(keys, want).astype(np.int32),
            "val": v[pair, col].astype(np.float32)}


def pair_logits(w, b, entries: dict, labels, n_pairs: int):
    """r_l(x) of every training pair from its flat `entries` (the training twin of `logits`)."""
    dot = jax.ops.segment_sum(jnp.take(w, entries["pos"]) * entries["val"], entries["pair"], n_pairs,
                              indices_are_sorted=True)
    return dot + jnp.take(b, labels)


def search_steps(offsets: np.ndarray) -> int:
    """Bisection steps that find any feature in the longest label segment."""
    return max(1, math.ceil(math.log2(int(np.diff(offsets).max(initial=0)) + 1)))


def lookup(offsets, feats, labels, f, steps: int):
    """(positions, found) of features `f` [..., R, P] in the segments of `labels` [..., R, 1] (-1: none):
    a bisection of `steps` steps per entry (`search_steps`)."""
    shape = jnp.broadcast_shapes(labels.shape, f.shape)
    safe = jnp.maximum(labels, 0)
    lo, hi = (jnp.broadcast_to(jnp.take(offsets, s), shape) for s in (safe, safe + 1))
    f, end = jnp.broadcast_to(f, shape), hi

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        right = jnp.take(feats, mid, mode="clip") < f
        open_ = lo < hi
        return jnp.where(open_ & right, mid + 1, lo), jnp.where(open_ & ~right, mid, hi)

    pos, _ = jax.lax.fori_loop(0, steps, step, (lo, hi))
    found = (labels >= 0) & (pos < end) & (jnp.take(feats, pos, mode="clip") == f)
    return pos, found


def logits(offsets, feats, w, b, labels, idx, val, steps: int):
    """r_l(x) [..., R] of labels [..., R] (-1: any value) for padded sparse rows idx, val [..., P]:
    the rows are L2-normalised (so the scale of the features does not matter)."""
    norm = jnp.sqrt(jnp.sum(val * val, axis=-1, keepdims=True))
    v = (val / jnp.maximum(norm, 1e-12))[..., None, :]
    pos, found = lookup(offsets, feats, labels[..., None], idx[..., None, :], steps)
    dot = jnp.sum(jnp.where(found, jnp.take(w, pos, mode="clip") * v, 0.0), axis=-1)
    return dot + jnp.take(b, jnp.maximum(labels, 0))


def prune(offsets: np.ndarray, feats: np.ndarray, w: np.ndarray, threshold: float):
    """The weights with |w| > threshold as a new CSR (offsets, feats, w); PECOS prunes its weights alike."""
    keep = np.abs(w) > threshold
    label_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    out = np.zeros_like(offsets)
    out[1:] = np.cumsum(np.bincount(label_of[keep], minlength=len(offsets) - 1))
    return out, feats[keep], np.asarray(w, np.float32)[keep]


def mix(offsets, feats, w, b, idx, val, ids, scores, weight, k: int, steps: int):
    """Top k of ELIAS's shortlist (ids, scores [Q, R], scores in (0, 1], -inf / -1 padding) re-scored as
    exp((1 - weight) log score + weight log sigmoid(r)): (ids [Q, k], scores [Q, k])."""
    r = logits(offsets, feats, w, b, ids, idx, val, steps)
    mixed = jnp.where(ids >= 0, (1 - weight) * jnp.log(jnp.maximum(scores, 1e-30)) + weight * jax.nn.log_sigmoid(r),
                      -jnp.inf)
    top, pos = jax.lax.top_k(mixed, k)
    return jnp.where(top > -jnp.inf, jnp.take_along_axis(ids, pos, axis=1), -1), jnp.exp(top)
