// Entry points of jaxidx._kernels (bound in module.cpp). The Python-side
// contract is documented in jaxidx/search/host.py.
#pragma once

#include "common.h"

namespace jaxidx {

py::tuple merge_candidates(const py::object& bucket_ids, const py::object& offsets, const py::object& members,
                           int64_t min_count, int64_t min_candidates, int64_t n_items, int64_t n_threads);
py::tuple merge_topk(const py::object& bucket_ids, const py::object& bucket_scores, const py::object& offsets,
                     const py::object& members, const py::object& weights, int64_t k, int64_t min_count,
                     const std::string& agg, int64_t n_items, int64_t n_threads);

py::tuple topk_rows(const py::object& x, int64_t k, int64_t n_threads);

py::tuple rerank_topk(const py::object& queries, const py::object& base, const py::object& cand_offsets,
                      const py::object& cand_ids, int64_t k, const std::string& metric, int64_t n_threads);

py::array balanced_assign(const py::object& candidates, int64_t n_buckets, const py::object& order,
                          int64_t capacity, const py::object& initial_counts, int64_t n_choices, int64_t n_threads);

}  // namespace jaxidx
