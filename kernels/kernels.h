// Entry points of jaxidx._kernels (bound in module.cpp). The Python-side
// contract is documented in jaxidx/search/host.py.
#pragma once

#include "common.h"

namespace jaxidx {

// Integer and string options arrive as plain objects too: each is checked (require_int /
// require_str) so that a bad one raises ValueError naming it, never a TypeError.
py::tuple merge_candidates(const py::object& bucket_ids, const py::object& offsets, const py::object& members,
                           const py::object& min_count, const py::object& min_candidates, const py::object& n_items,
                           const py::object& n_threads);
py::tuple merge_rerank_topk(const py::object& queries, const py::object& base, const py::object& bucket_ids,
                            const py::object& offsets, const py::object& members, const py::object& k,
                            const py::object& min_count, const py::object& metric, const py::object& n_threads);
py::tuple merge_topk(const py::object& bucket_ids, const py::object& bucket_scores, const py::object& offsets,
                     const py::object& members, const py::object& weights, const py::object& k,
                     const py::object& min_count, const py::object& agg, const py::object& n_items,
                     const py::object& n_threads);

py::tuple topk_rows(const py::object& x, const py::object& k, const py::object& n_threads);

py::tuple rerank_topk(const py::object& queries, const py::object& base, const py::object& cand_offsets,
                      const py::object& cand_ids, const py::object& run_lens, const py::object& k,
                      const py::object& metric, const py::object& n_threads);

py::tuple pq4_search(const py::object& queries, const py::object& base, const py::object& codes,
                     const py::object& codebooks, const py::object& centres, const py::object& row_offsets,
                     const py::object& block_offsets, const py::object& leaves, const py::object& lens,
                     const py::object& reorder, const py::object& k, const py::object& metric,
                     const py::object& n_threads, const py::object& row_terms, const py::object& row_ids);

py::tuple sq8_search(const py::object& queries, const py::object& base, const py::object& codes,
                     const py::object& lo, const py::object& scale, const py::object& row_terms,
                     const py::object& row_offsets, const py::object& leaves, const py::object& lens,
                     const py::object& reorder, const py::object& k, const py::object& metric,
                     const py::object& n_threads);

py::tuple tree_beam(const py::object& phi, const py::object& groups, const py::object& group_logp,
                    const py::object& rows, const py::object& bias, const py::object& n_groups, const py::object& k,
                    const py::object& n_threads);

py::array balanced_assign(const py::object& candidates, const py::object& n_buckets, const py::object& order,
                          const py::object& capacity, const py::object& initial_counts, const py::object& n_choices,
                          const py::object& n_threads);

}  // namespace jaxidx
