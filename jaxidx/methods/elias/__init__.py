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

Stage 3 (ELIAS++, where `ranker.steps` > 0) fits a sparse linear ranker per label over the raw input
features on ELIAS's own shortlists of the training rows and mixes it into the final score (`ranker`).

Package: `maths` (pure model maths), `graph` (adjacency on the host), `ranker` (the sparse ranker),
`trainable` (config checks, the method and its stages), `index` (search).

Search: encoder -> top-b clusters -> `merge_topk(agg="max")` over A as a soft
partition with R = 1 (the K best paths) -> label classifiers on that
shortlist -> top k. The host (C++) and device (JAX) merge give identical results.

All path maths runs in log space (log s_c = min(0, log alpha + log_softmax)),
so no score underflows to a log of zero; -1e30 marks an absent edge or label.
"""
from jaxidx.methods.elias.graph import approximate_adjacency, home_clusters, reserved_edges, soft_partition
from jaxidx.methods.elias.index import ELIASIndex
from jaxidx.methods.elias.maths import (
    NEG, best_paths, cluster_beam, dense_best_paths, elias_loss, expand_paths, is_positive, label_logits,
    log_cluster_scores, log_edge_weights, lookup, multi_hot, shortlist, top_k_mask)
from jaxidx.methods.elias.trainable import ELIAS, INPUTS, STAGES, ELIASStage, validate_config, warmup_linear

__all__ = [
    "ELIAS", "ELIASStage", "ELIASIndex", "STAGES", "INPUTS", "validate_config", "warmup_linear", "NEG",
    "approximate_adjacency", "reserved_edges", "home_clusters", "soft_partition", "log_cluster_scores",
    "log_edge_weights", "cluster_beam", "expand_paths", "best_paths", "shortlist", "lookup", "is_positive",
    "dense_best_paths", "top_k_mask", "multi_hot", "label_logits", "elias_loss",
]
