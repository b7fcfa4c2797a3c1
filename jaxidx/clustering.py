"""Balanced hierarchical clustering of labels: PIFA label features, recursive spherical 2-means.

ELIAS (and PECOS-style trees) start from a label clustering in which labels
with similar positive examples share a cluster. PIFA represents label l by the
normalised sum of the normalised feature rows of its positive examples;
recursive balanced 2-means then splits the labels into 2^depth leaves whose
sizes differ by at most one (every split halves a node into ceil / floor
halves), so no cluster is overloaded.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp


def _normalize_rows(M):
    """Rows scaled to unit L2 norm (zero rows stay zero); sparse stays sparse."""
    if sp.issparse(M):
        M = sp.csr_matrix(M, dtype=np.float32, copy=True)
        norms = np.sqrt(np.asarray(M.multiply(M).sum(axis=1)).ravel())
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ M)
    M = np.asarray(M, np.float32)
    norms = np.linalg.norm(M, axis=1, keepdims=True)
    return np.divide(M, norms, out=np.zeros_like(M), where=norms > 0)


def pifa(X, Y):
    """PIFA label features [L, D]: row l = normalise(sum of normalise(x_i) over i with y_il = 1).

    `X` [N, D] (CSR or dense), `Y` [N, L] binary CSR. Labels without a
    training example get a zero row.
    """
    Y = sp.csr_matrix(Y, dtype=np.float32)
    return _normalize_rows(Y.T @ _normalize_rows(X))


def n_leaves_for(n_labels: int, max_leaf: int) -> int:
    """C = 2^ceil(log2(L / max_leaf)) (at least 1): leaves of at most about max_leaf labels."""
    if n_labels < 1 or max_leaf < 1:
        raise ValueError(f"n_leaves_for: need n_labels >= 1 and max_leaf >= 1, got {n_labels}, {max_leaf}")
    return 1 << max(0, math.ceil(math.log2(n_labels / max_leaf)))


def _split(F, rng: np.random.Generator, max_iter: int) -> np.ndarray:
    """Balanced spherical 2-means of the rows of F: a bool mask, True for the first ceil(n/2) rows' side.

    Each iteration ranks rows by (similarity to centroid 0) - (similarity to
    centroid 1) and cuts the ranking in half, then recomputes both centroids
    as normalised sums, until the halves stop changing.
    """
    n = F.shape[0]
    half = (n + 1) // 2
    seeds = rng.choice(n, 2, replace=False)
    centroids = np.asarray(F[seeds].todense() if sp.issparse(F) else F[seeds], np.float32)
    left = None
    for _ in range(max_iter):
        sims = np.asarray(F @ centroids.T)
        order = np.argsort(sims[:, 1] - sims[:, 0], kind="stable")
        new_left = np.zeros(n, bool)
        new_left[order[:half]] = True
        if left is not None and np.array_equal(new_left, left):
            break
        left = new_left
        sums = np.stack([np.asarray(F[np.flatnonzero(side)].sum(axis=0)).ravel() for side in (left, ~left)])
        centroids = _normalize_rows(sums)
    return left


def balanced_tree(features, n_leaves: int, seed: int = 0, max_iter: int = 20) -> np.ndarray:
    """Leaf of every row of `features` [L, D] after log2(n_leaves) rounds of balanced 2-means.

    Returns int32 [L] in [0, n_leaves); leaf sizes are floor(L / C) or
    ceil(L / C). Leaf ids follow the tree (children of node j at the next
    level are 2j and 2j + 1), so nearby ids are nearby clusters. Deterministic
    for a seed: node j at depth t draws its initial centroids from
    default_rng([seed, t, j]).
    """
    L = features.shape[0]
    if n_leaves < 1 or n_leaves & (n_leaves - 1):
        raise ValueError(f"n_leaves: must be a power of two >= 1, got {n_leaves}")
    if n_leaves > L:
        raise ValueError(f"n_leaves: {n_leaves} leaves cannot all be non-empty with {L} labels")
    F = sp.csr_matrix(features, dtype=np.float32) if sp.issparse(features) else np.asarray(features, np.float32)
    nodes = [np.arange(L)]
    for depth in range(int(math.log2(n_leaves))):
        children = []
        for j, rows in enumerate(nodes):
            left = _split(F[rows], np.random.default_rng([seed, depth, j]), max_iter)
            children += [rows[left], rows[~left]]
        nodes = children
    leaf = np.empty(L, np.int32)
    for j, rows in enumerate(nodes):
        leaf[rows] = j
    return leaf


def leaf_members(leaf: np.ndarray, n_leaves: int) -> np.ndarray:
    """Labels of each leaf as a padded table int32 [C, max leaf size] (ascending ids, -1 padding)."""
    sizes = np.bincount(leaf, minlength=n_leaves)
    order = np.argsort(leaf, kind="stable")
    out = np.full((n_leaves, max(int(sizes.max(initial=0)), 1)), -1, np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cols = np.arange(len(leaf)) - np.repeat(starts, sizes)
    out[leaf[order], cols] = order
    return out
