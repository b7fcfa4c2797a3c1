"""Evaluation metrics: XMC ranking metrics (P@k, nDCG@k, PSP@k, R@k) and ANN recall."""
from jaxidx.metrics.ann import candidates_per_query, knn_recall, knn_recall_distance
from jaxidx.metrics.xmc import (hits_at_k, ndcg_at_k, precision_at_k, precision_at_k_legacy, propensity,
                                psndcg_at_k, psp_at_k, recall_at_k, xmc_report)

__all__ = [
    "hits_at_k", "precision_at_k", "precision_at_k_legacy", "ndcg_at_k", "recall_at_k", "propensity",
    "psp_at_k", "psndcg_at_k", "xmc_report", "knn_recall", "knn_recall_distance", "candidates_per_query",
]
