// Reservoir: the approximate top of a code scan (pq4_search, sq8_search), the candidates of its exact re-rank.
#pragma once

#include <functional>

#include "common.h"

namespace jaxidx {

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
