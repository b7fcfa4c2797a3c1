"""C++ backend of the search kernels (the extension jaxidx._kernels); the default.

Same results as `reference` (which documents the exact semantics), computed
with the GIL released over `n_threads` threads (0 = all hardware threads).
Arrays are passed through without conversion: ids and offsets must be int32
(the CSR `cand_offsets` and balanced_assign's `order` may also be int64,
`initial_counts` is int64), scores and vectors float32, all C-contiguous;
integer options must be integers (Python or NumPy) in range, `k` at most
2^31 - 1 (ids are int32). Anything else raises ValueError naming the argument.
If the system cannot start all `n_threads` threads, the ones started do the work.

Per-item scratch (one slot per item and thread) is kept across calls, up to
1 GiB per kernel, so a single query does not pay for zeroing O(items) memory.
Pass `n_items` to the merges: members are then checked only where a query reads
them, and a call's cost does not grow with the partition's size; without it,
every member is scanned for the largest id. The scratch spans the ids the routed
buckets hold, so an `n_items` far above them costs no memory.
"""
try:
    from jaxidx import _kernels
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError("jaxidx._kernels is not built; run `python3 setup.py build_ext --inplace`") from e

__all__ = ["merge_topk", "merge_candidates", "rerank_topk", "merge_rerank_topk", "pq4_search", "sq8_search",
           "topk_rows", "tree_beam", "balanced_assign"]


def merge_topk(bucket_ids, bucket_scores, offsets, members, weights, k, min_count=1, agg="sum", n_items=None,
               n_threads=0):
    """Top-k items of the routed buckets: (ids, scores, counts, n_candidates).
    See reference.merge_topk. n_items sizes per-thread scratch (default: max member id + 1, found by
    scanning every member)."""
    return _kernels.merge_topk(bucket_ids, bucket_scores, offsets, members, weights, k, min_count, agg, n_items,
                               n_threads)


def merge_candidates(bucket_ids, offsets, members, min_count=1, min_candidates=1, n_items=None, n_threads=0):
    """The candidate sets of the routed buckets as CSR: (cand_offsets int64 [Q+1], cand_ids
    int32 [T], n_candidates [Q]). See reference.merge_candidates."""
    return _kernels.merge_candidates(bucket_ids, offsets, members, min_count, min_candidates, n_items, n_threads)


def rerank_topk(queries, base, candidates, k, metric="ip", n_threads=0):
    """Exact k nearest candidates: (ids, dist, n_unique). `candidates` is a padded int32 [Q, C]
    array, a CSR tuple (cand_offsets, cand_ids) or CSR runs (run_offsets, run_starts, run_lens).
    See reference.rerank_topk."""
    if not isinstance(candidates, tuple):
        candidates = (None, candidates)
    if len(candidates) not in (2, 3):
        raise ValueError("candidates: a [Q, C] array, (cand_offsets, cand_ids) or (run_offsets, run_starts, run_lens)")
    offsets, ids, lens = (*candidates, None)[:3]
    return _kernels.rerank_topk(queries, base, offsets, ids, lens, k, metric, n_threads)


def merge_rerank_topk(queries, base, bucket_ids, offsets, members, k, min_count=1, metric="ip", n_threads=0):
    """merge_candidates then rerank_topk in one pass per query (the candidates stay in cache):
    (ids, dist, n_candidates). See reference.merge_rerank_topk."""
    return _kernels.merge_rerank_topk(queries, base, bucket_ids, offsets, members, k, min_count, metric, n_threads)


def pq4_search(queries, base, codes, codebooks, centres, row_offsets, block_offsets, leaves, lens, reorder, k,
               metric="ip", n_threads=0, row_terms=None, row_ids=None):
    """Probed leaves scored from 4-bit PQ codes (fast scan: AVX-512 or AVX2 byte shuffles, whichever the CPU
    has, `simd_paths()`), the `reorder` best re-ranked exactly: (rows, dist, n_candidates). See
    reference.pq4_search."""
    return _kernels.pq4_search(queries, base, codes, codebooks, centres, row_offsets, block_offsets, leaves, lens,
                               reorder, k, metric, n_threads, row_terms, row_ids)


def sq8_search(queries, base, codes, lo, scale, row_terms, row_offsets, leaves, lens, reorder, k, metric="l2",
               n_threads=0):
    """Probed leaves scored from 8-bit codes (integer dot products: AVX-512 VNNI or AVX2, whichever the CPU
    has, `simd_paths()`), the `reorder` best re-ranked exactly: (rows, dist, n_candidates). See
    reference.sq8_search."""
    return _kernels.sq8_search(queries, base, codes, lo, scale, row_terms, row_offsets, leaves, lens, reorder, k,
                               metric, n_threads)


def simd_paths():
    """The instruction set each kernel family runs on this CPU: {"exact": ..., "pq4_scan": ..., "sq8_scan": ...},
    each "avx512bw" / "avx512vnni", "avx2" or "portable" (chosen at run time; JAXIDX_NO_AVX2 / JAXIDX_NO_AVX512
    force narrower)."""
    return _kernels.simd_paths()


def topk_rows(x, k, n_threads=0):
    """Largest k entries per row: (idx, vals). See reference.topk_rows."""
    return _kernels.topk_rows(x, k, n_threads)


def tree_beam(phi, groups, group_logp, rows, bias, n_groups, k, n_threads=0):
    """The k best leaves below each query's routed groups of a two-level tree: (ids, log p).
    See reference.tree_beam."""
    return _kernels.tree_beam(phi, groups, group_logp, rows, bias, n_groups, k, n_threads)


def balanced_assign(candidates, n_buckets, order=None, capacity=0, initial_counts=None, n_choices=0,
                    n_threads=0):
    """Greedy load-balanced assignment, repetitions in parallel: assign int32 [R, N].
    See reference.balanced_assign."""
    return _kernels.balanced_assign(candidates, n_buckets, order, capacity, initial_counts, n_choices, n_threads)
