"""Extreme multi-label ranking metrics, vectorised over rows; values are fractions in [0, 1].

Conventions shared by every metric here:
- `pred` is an int array `[n, w]` of ranked label ids; -1 means "no prediction"
  and never counts. Only the first k columns are used; if w < k the missing
  positions count as -1. A repeated id in a row counts at its first position only.
- `Y` is the CSR truth `[n, L]` (nonzero = relevant).
- The average is over ALL n rows: a row without true labels contributes 0
  (it is not skipped), as in pyxclib.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import scipy.sparse as sp


def hits_at_k(pred, Y, k: int) -> np.ndarray:
    """Bool `[n, k]`: is the j-th ranked id of row i one of its true labels."""
    Y = _canonical(Y)
    return _member(_ranked(pred, Y, k), Y)


def precision_at_k(pred, Y, k: int) -> float:
    """Standard P@k: true labels among the top k, divided by k."""
    return _precision(hits_at_k(pred, Y, k))


def precision_at_k_legacy(pred, Y, k: int) -> float:
    """LEGACY, NON-STANDARD: hits in the top k divided by min(|y|, k), as BLISS reported it.

    It overstates precision for rows with fewer than k labels; report
    `precision_at_k` and use this only to compare with those published numbers.
    """
    Y = _canonical(Y)
    return float(np.mean(_safe_div(hits_at_k(pred, Y, k).sum(axis=1), np.minimum(_n_true(Y), k))))


def ndcg_at_k(pred, Y, k: int) -> float:
    """nDCG@k: DCG with 1/log2(rank + 1) gains over the ideal DCG of min(k, |y|) hits."""
    Y = _canonical(Y)
    return _ndcg(hits_at_k(pred, Y, k), Y)


def recall_at_k(pred, Y, k: int) -> float:
    """R@k: true labels among the top k, divided by |y|."""
    Y = _canonical(Y)
    return _recall(hits_at_k(pred, Y, k), Y)


def propensity(Y, A: float = 0.55, B: float = 1.5) -> np.ndarray:
    """Label propensities of Jain et al. 2016: p_l = 1 / (1 + C (N_l + B)^-A),
    C = (log N - 1)(B + 1)^A, N_l = label frequency in Y, N = rows of Y."""
    Y = _canonical(Y)
    freq = np.bincount(Y.indices, minlength=Y.shape[1]).astype(np.float64)
    c = (np.log(Y.shape[0]) - 1.0) * (B + 1.0) ** A
    return 1.0 / (1.0 + c * (freq + B) ** -A)


def psp_at_k(pred, Y, k: int, A: float = 0.55, B: float = 1.5, train_Y=None) -> float:
    """Propensity-scored P@k, normalised as in pyxclib.

    Each hit earns 1/p_l (propensities from `train_Y` if given, else from `Y`).
    The score is the total earned weight over all rows divided by the total
    best achievable weight (each row's k largest 1/p_l among its true labels):
    a ratio of totals, not a mean of per-row ratios, exactly like pyxclib's
    `psprecision`, so values are comparable with published PSP@k.
    """
    Y = _canonical(Y)
    ids = _ranked(pred, Y, k)
    return _psp(ids, _member(ids, Y), Y, _inv_propensity(Y, A, B, train_Y))


def psndcg_at_k(pred, Y, k: int, A: float = 0.55, B: float = 1.5, train_Y=None) -> float:
    """Propensity-scored nDCG@k as in pyxclib's `psndcg`: the mean over rows of
    propensity-weighted DCG / IDCG(min(k, |y|)), divided by the same mean for
    the best ranking (each row's true labels by decreasing 1/p_l)."""
    Y = _canonical(Y)
    ids = _ranked(pred, Y, k)
    inv_p = _inv_propensity(Y, A, B, train_Y)
    disc = _discounts(k)
    ideal = _ideal_dcg(Y, k)
    got = _safe_div(_ps_gains(ids, _member(ids, Y), inv_p) @ disc, ideal)
    best = _safe_div(_best_ps_gains(Y, k, inv_p) @ disc, ideal)
    return _ratio(got.sum(), best.sum())


def xmc_report(pred, Y, ks: Sequence[int] = (1, 3, 5), train_Y=None, A: float = 0.55, B: float = 1.5,
               recall_ks: Sequence[int] = (10, 100)) -> Dict[str, float]:
    """P@k, nDCG@k, PSP@k for k in ks and R@k for k in recall_ks, keyed like 'P@1', 'R@100'.

    Ranks are matched against Y once, at the largest k. R@k for k beyond
    pred's width counts what pred has (missing positions are -1).
    """
    Y = _canonical(Y)
    ids = _ranked(pred, Y, max([*ks, *recall_ks]))
    hits = _member(ids, Y)
    inv_p = _inv_propensity(Y, A, B, train_Y)
    out = {}
    out.update({f"P@{k}": _precision(hits[:, :k]) for k in ks})
    out.update({f"nDCG@{k}": _ndcg(hits[:, :k], Y) for k in ks})
    out.update({f"PSP@{k}": _psp(ids[:, :k], hits[:, :k], Y, inv_p) for k in ks})
    out.update({f"R@{k}": _recall(hits[:, :k], Y) for k in recall_ks})
    return out


def _ranked(pred, Y: sp.csr_matrix, k: int) -> np.ndarray:
    """int64 `[n, k]`: pred's first k ids, -1 padded, a repeated id replaced by -1."""
    n, n_labels = Y.shape
    p = np.asarray(pred)
    if p.ndim != 2 or p.shape[0] != n or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"pred must be an integer array [n={n}, k], got {p.dtype} {p.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = p[:, :k].astype(np.int64)
    if p.shape[1] < k:
        p = np.pad(p, ((0, 0), (0, k - p.shape[1])), constant_values=-1)
    if p.size and (p.min() < -1 or p.max() >= n_labels):
        raise ValueError(f"pred holds ids outside [-1, {n_labels})")
    order = np.argsort(p, axis=1, kind="stable")  # stable: the first occurrence stays first
    in_order = np.take_along_axis(p, order, axis=1)
    repeat = np.zeros(p.shape, bool)
    np.put_along_axis(repeat, order[:, 1:], in_order[:, 1:] == in_order[:, :-1], axis=1)
    p[repeat] = -1
    return p


def _member(ids: np.ndarray, Y: sp.csr_matrix) -> np.ndarray:
    """Bool like ids: ids[i, j] is a true label of row i (-1 never is)."""
    n, n_labels = Y.shape
    if Y.nnz == 0:
        return np.zeros(ids.shape, bool)
    # Row-major keys of the true entries are sorted, so membership is a binary search.
    true_keys = np.repeat(np.arange(n, dtype=np.int64), _n_true(Y)) * n_labels + Y.indices
    keys = np.arange(n, dtype=np.int64)[:, None] * n_labels + ids
    found = true_keys[np.minimum(np.searchsorted(true_keys, keys), true_keys.size - 1)] == keys
    return found & (ids >= 0)


def _precision(hits: np.ndarray) -> float:
    return float(np.mean(hits.sum(axis=1) / hits.shape[1]))


def _ndcg(hits: np.ndarray, Y: sp.csr_matrix) -> float:
    k = hits.shape[1]
    return float(np.mean(_safe_div(hits @ _discounts(k), _ideal_dcg(Y, k))))


def _recall(hits: np.ndarray, Y: sp.csr_matrix) -> float:
    return float(np.mean(_safe_div(hits.sum(axis=1), _n_true(Y))))


def _psp(ids, hits, Y, inv_p) -> float:
    k = ids.shape[1]
    return _ratio(_ps_gains(ids, hits, inv_p).sum(), _best_ps_gains(Y, k, inv_p).sum())


def _canonical(Y) -> sp.csr_matrix:
    """CSR with sorted, unique, nonzero entries (copied only when Y is not already so)."""
    Y = sp.csr_matrix(Y)
    if not Y.has_canonical_format or (Y.data == 0).any():
        Y = Y.copy()
        Y.sum_duplicates()
        Y.eliminate_zeros()
    return Y


def _n_true(Y: sp.csr_matrix) -> np.ndarray:
    return np.diff(Y.indptr)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(k) + 2.0)


def _safe_div(a, b) -> np.ndarray:
    """a / b with 0 where b == 0 (rows without true labels)."""
    a = np.asarray(a, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=np.asarray(b) > 0)


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else 0.0


def _ideal_dcg(Y: sp.csr_matrix, k: int) -> np.ndarray:
    """Per row: DCG of min(k, |y|) hits at the top ranks."""
    return np.concatenate([[0.0], np.cumsum(_discounts(k))])[np.minimum(_n_true(Y), k)]


def _inv_propensity(Y, A, B, train_Y) -> np.ndarray:
    ref = Y if train_Y is None else _canonical(train_Y)
    if ref.shape[1] != Y.shape[1]:
        raise ValueError(f"train_Y has {ref.shape[1]} labels, Y has {Y.shape[1]}")
    return 1.0 / propensity(ref, A, B)


def _ps_gains(ids, hits, inv_p) -> np.ndarray:
    """Weight 1/p_l earned at each rank (0 where not a hit)."""
    return np.where(hits, inv_p[np.maximum(ids, 0)], 0.0)


def _best_ps_gains(Y, k, inv_p) -> np.ndarray:
    """[n, k] each row's true-label weights 1/p_l in decreasing order, zero-padded."""
    n = Y.shape[0]
    rows = np.repeat(np.arange(n), _n_true(Y))
    w = inv_p[Y.indices]
    order = np.lexsort((-w, rows))  # rows stay grouped in place, weights descend within each
    rank = np.arange(rows.size) - Y.indptr[rows]
    keep = rank < k
    best = np.zeros((n, k))
    best[rows[keep], rank[keep]] = w[order][keep]
    return best
