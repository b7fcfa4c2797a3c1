// What the code scans (pq4_search, sq8_search) share: their common arguments, checked; the reservoir of a
// query's approximate top (the candidates of its exact re-rank); and their outputs.
#pragma once

#include <functional>

#include "scan.h"

namespace jaxidx {

// Queries [Q, d] and base rows [N, d] (float32), leaf offsets [L + 1] into the rows, the probed leaves and
// the rows read of each [Q, P] (int32), k, reorder in [k, 2^31 - 1], metric and n_threads: each checked,
// a bad one raising ValueError naming it (the offsets' and probes' values: check_leaf_offsets, check_probes).
struct LeafScanArgs {
    py::array queries, base, row_offsets, leaves, lens;
    int64_t Q, d, N, L, P, k, reorder;
    int metric, threads;
    LeafScanArgs(const py::object& queries_o, const py::object& base_o, const py::object& row_offsets_o,
                 const py::object& leaves_o, const py::object& lens_o, const py::object& reorder_o,
                 const py::object& k_o, const py::object& metric_o, const py::object& n_threads)
        : queries(require_array<float>(queries_o, "queries", 2)),
          base(require_array<float>(base_o, "base", 2)),
          row_offsets(require_array<int32_t>(row_offsets_o, "row_offsets", 1)),
          leaves(require_array<int32_t>(leaves_o, "leaves", 2)),
          lens(require_array<int32_t>(lens_o, "lens", 2)),
          Q(queries.shape(0)), d(queries.shape(1)), N(base.shape(0)), L(row_offsets.shape(0) - 1),
          P(leaves.shape(1)) {
        require_shape(base, "base", 1, d, "queries' dimension");
        if (N > INT32_MAX) fail("base", "more than 2^31 - 1 rows");
        if (L < 1) fail("row_offsets", "needs at least 2 entries (one leaf)");
        require_shape(leaves, "leaves", 0, Q, "one row per query");
        require_shape(lens, "lens", 0, Q, "one row per query");
        require_shape(lens, "lens", 1, P, "one length per probed leaf");
        k = require_k(k_o);
        reorder = require_int(reorder_o, "reorder", k, kInt32Max, "must be in [k, 2^31 - 1]");
        metric = require_metric(metric_o);
        threads = resolve_threads(require_threads(n_threads), Q);
    }
};

// A code scan's results: rows and exact distances [Q, k] (write_nearest) and the candidates scored [Q].
struct NearestOutputs {
    py::array_t<int32_t> ids, n_cand;
    py::array_t<float> dist;
    int32_t* ids_out;
    float* dist_out;
    int32_t* n_cand_out;
    NearestOutputs(int64_t Q, int64_t k)
        : ids({Q, k}), n_cand(Q), dist({Q, k}), ids_out(ids.mutable_data()), dist_out(dist.mutable_data()),
          n_cand_out(n_cand.mutable_data()) {}
    py::tuple tuple() const { return py::make_tuple(ids, dist, n_cand); }
};

// Moves the n largest of a[0..len) (distinct keys, n <= len) to a[0..n), in any order: quickselect with
// a median-of-three pivot and a branch-free partition (std::nth_element's branches mispredict on every
// other element of these random keys, which made the cut most of a query's selection cost).
inline void select_largest(uint64_t* a, size_t len, size_t n) {
    size_t lo = 0, hi = len;
    while (hi - lo > 16 && lo < n && n < hi) {
        const uint64_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
        const uint64_t pivot = std::max(std::min(x, y), std::min(std::max(x, y), z));
        size_t store = lo;  // a[lo..store) > pivot, a[store..i) <= pivot; both sides non-empty (distinct keys)
        for (size_t i = lo; i < hi; ++i) {
            const uint64_t v = a[i];
            a[i] = a[store];
            a[store] = v;
            store += v > pivot;
        }
        (store > n ? hi : lo) = store;
    }
    if (lo < n && n < hi) std::sort(a + lo, a + hi, std::greater<uint64_t>());
}

// The n smallest (value, row) pairs offered, ties by smaller row, in amortised O(1) per offer: offers
// not above the bound go to a buffer of 2n rank keys (one uint64 each: rank_key(-value, row), larger =
// better), cut back to its n best (select_largest) when full; the bound is then the n-th best value. A
// heap (TopK) costs a sift per offer.
class Reservoir {
  public:
    // Offers name slots, mapped to rows by ids (a row offered once per `tag`, marked in stamp [rows]); no
    // ids: slots are rows.
    void map_slots(const int32_t* ids, int32_t* stamp) {
        ids_ = ids;
        stamp_ = stamp;
    }
    void reset(size_t n, int32_t tag = 0) {
        tag_ = tag;
        n_ = n;
        keys_.clear();
        keys_.reserve(2 * n);
        bound_ = INFINITY;
        bound_key_ = 0;
    }
    float bound() const { return bound_; }
    void push(float value, int32_t slot) {
        int32_t row = slot;
        if (ids_) {
            row = ids_[slot];
            if (stamp_[row] == tag_) return;  // offered already, with the same value (same codes)
        }
        const uint64_t key = rank_key(-value, row);
        if (key < bound_key_) return;  // n kept rows rank first
        if (ids_) stamp_[row] = tag_;
        keys_.push_back(key);
        if (keys_.size() == 2 * n_) cut();
    }
    // Rows of the n best offered (fewer if fewer were offered), in no particular order.
    void rows(std::vector<int32_t>& out) {
        if (keys_.size() > n_) cut();
        out.clear();
        for (uint64_t key : keys_) out.push_back(static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key)));
    }

  private:
    void cut() {
        select_largest(keys_.data(), keys_.size(), n_);
        keys_.resize(n_);
        bound_key_ = *std::min_element(keys_.begin(), keys_.end());
        // The value of the n-th best (rank_key's order inverted; NaN keeps the bound open).
        const uint32_t ordered = static_cast<uint32_t>(bound_key_ >> 32);
        const uint32_t bits = (ordered & 0x80000000u) ? (ordered & 0x7FFFFFFFu) : ~ordered;
        float neg;
        std::memcpy(&neg, &bits, sizeof neg);
        bound_ = ordered == 0 ? INFINITY : -neg;
    }

    size_t n_ = 0;
    int32_t tag_ = 0;
    const int32_t* ids_ = nullptr;
    int32_t* stamp_ = nullptr;
    float bound_ = INFINITY;
    uint64_t bound_key_ = 0;
    std::vector<uint64_t> keys_;
};

}  // namespace jaxidx
