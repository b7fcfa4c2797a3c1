"""Search kernels shared by every index: merge routed buckets into top-k
candidates, exact re-rank (also from 4-bit PQ codes: pq4_search, or 8-bit ones: sq8_search), row-wise top-k, the second level of a
cluster tree (tree_beam) and IRLI's balanced assignment.

Three backends return the same results: `host` (C++ extension, multi-threaded,
the default exported here), `reference` (NumPy, the executable specification)
and `device` (pure JAX, jit-able, for accelerators; no balanced_assign, and no
merge_candidates, whose output size varies per query: on device use merge_topk
with k = the candidate budget; no merge_rerank_topk, its fusion: IRLI's device
search does the same in `search.sharded`; no pq4_search or sq8_search yet: the device backend scans float rows; no
tree_beam: ELIAS's device search scores every leaf and masks the unrouted groups, `elias.maths.cluster_log_probs`).
"""
from jaxidx.search import device, host, reference
from jaxidx.search.host import (balanced_assign, merge_candidates, merge_rerank_topk, merge_topk, pq4_search, rerank_topk,
                                sq8_search, topk_rows, tree_beam)

__all__ = ["merge_topk", "merge_candidates", "rerank_topk", "merge_rerank_topk", "pq4_search", "sq8_search",
           "topk_rows", "tree_beam", "balanced_assign", "host", "reference", "device"]
