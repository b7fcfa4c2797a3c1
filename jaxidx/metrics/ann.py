"""Nearest-neighbour search metrics as ann-benchmarks computes them; fractions in [0, 1]."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from jaxidx.metrics.xmc import hits_at_k


def knn_recall(pred, gt, k: int) -> float:
    """Recall@k by ids: |pred[:, :k] ∩ gt[:, :k]| / k, averaged over queries.

    -1 in pred means no result; a repeated id counts once; if pred is narrower
    than k the missing results count as misses.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.ndim != 2 or gt.shape[1] < k:
        raise ValueError(f"gt must be [n, >= k={k}], got shape {gt.shape}")
    n = gt.shape[0]
    n_items = int(max(gt[:, :k].max(initial=-1), pred.max(initial=-1))) + 1
    truth = sp.csr_matrix((np.ones(n * k, np.float32), gt[:, :k].reshape(-1), np.arange(0, n * k + 1, k)),
                          shape=(n, n_items))
    return float(np.mean(hits_at_k(pred, truth, k).sum(axis=1) / k))


def knn_recall_distance(pred_dist, gt_dist, k: int, eps: float = 1e-3) -> float:
    """Recall@k by distance, as ann-benchmarks: a returned item counts if its
    distance is <= the true k-th distance + eps.

    Distances are in ann-benchmarks convention (ascending; see
    `benchmark_distance`); pad missing results with +inf (NaN never counts).
    """
    pred_dist = np.asarray(pred_dist, np.float64)[:, :k]
    gt_dist = np.asarray(gt_dist, np.float64)
    if gt_dist.ndim != 2 or gt_dist.shape[1] < k or pred_dist.shape[0] != gt_dist.shape[0]:
        raise ValueError(f"need pred_dist [n, k] and gt_dist [n, >= k={k}], got {pred_dist.shape}, {gt_dist.shape}")
    threshold = gt_dist[:, k - 1:k] + eps
    return float(np.mean((pred_dist <= threshold).sum(axis=1) / k))


def candidates_per_query(n_candidates) -> float:
    """Mean number of items scored exactly per query (the cost a learned index pays)."""
    return float(np.mean(np.asarray(n_candidates, np.float64)))
