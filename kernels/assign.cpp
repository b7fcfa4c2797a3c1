// balanced_assign: IRLI's greedy load-balanced re-partition. In one pass per
// repetition each item goes to the least-filled of its first `n_choices` usable
// preferred buckets (full ones are skipped, so with a capacity an item falls
// back to its next preferences in rank order); an item with no usable
// preference goes to the globally least-filled bucket, found in O(log B) with
// a min segment tree over counts.
#include "kernels.h"

namespace jaxidx {

namespace {

// argmin over bucket counts (ties to the smaller bucket id), O(log B) updates.
class MinTree {
   public:
    void init(const std::vector<int64_t>& counts) {
        counts_ = &counts;
        n_ = static_cast<int64_t>(counts.size());
        size_ = 1;
        while (size_ < n_) size_ *= 2;
        node_.assign(static_cast<size_t>(2 * size_), -1);
        for (int64_t b = 0; b < n_; ++b) node_[size_ + b] = b;
        for (int64_t i = size_ - 1; i >= 1; --i) node_[i] = better(node_[2 * i], node_[2 * i + 1]);
    }
    void updated(int64_t b) {
        for (int64_t i = (size_ + b) / 2; i >= 1; i /= 2) node_[i] = better(node_[2 * i], node_[2 * i + 1]);
    }
    int64_t argmin() const { return node_[1]; }

   private:
    int64_t better(int64_t a, int64_t b) const {
        if (a < 0) return b;
        if (b < 0) return a;
        const int64_t ca = (*counts_)[a], cb = (*counts_)[b];
        return (cb < ca || (cb == ca && b < a)) ? b : a;
    }
    const std::vector<int64_t>* counts_ = nullptr;
    int64_t n_ = 0, size_ = 1;
    std::vector<int64_t> node_;
};

}  // namespace

py::array balanced_assign(const py::object& candidates_o, const py::object& n_buckets_o, const py::object& order_o,
                          const py::object& capacity_o, const py::object& initial_counts_o,
                          const py::object& n_choices_o, const py::object& n_threads) {
    py::array cand_a = require_array<int32_t>(candidates_o, "candidates", 3);
    const int64_t R = cand_a.shape(0), N = cand_a.shape(1), K = cand_a.shape(2);
    const int64_t n_buckets = require_int(n_buckets_o, "n_buckets", 1, kInt32Max, "must be in [1, 2^31 - 1]");
    const int64_t capacity = require_int(capacity_o, "capacity", 0, kInt64Max, "must be >= 0 (0 = unbounded)");
    const int64_t n_choices = require_int(n_choices_o, "n_choices", 0, kInt64Max, "must be >= 0 (0 = all candidates)");
    const int64_t choices = n_choices == 0 ? K : n_choices;
    if (N > INT32_MAX) fail("candidates", "more than 2^31 - 1 items");
    const int64_t B = n_buckets;
    const bool has_order = !order_o.is_none(), has_init = !initial_counts_o.is_none();
    py::array order_a, init_a;
    bool order_i64 = false;
    if (has_order) {
        order_i64 = py::isinstance<py::array_t<int64_t>>(order_o);
        order_a = order_i64 ? require_array<int64_t>(order_o, "order", 2) : require_array<int32_t>(order_o, "order", 2);
        require_shape(order_a, "order", 0, R, "R repetitions");
        require_shape(order_a, "order", 1, N, "N items");
    }
    if (has_init) {
        init_a = require_array<int64_t>(initial_counts_o, "initial_counts", 2);
        require_shape(init_a, "initial_counts", 0, R, "R repetitions");
        require_shape(init_a, "initial_counts", 1, B, "n_buckets");
    }
    const int threads = resolve_threads(require_threads(n_threads), R);
    const int32_t* cand = data_of<int32_t>(cand_a);
    const int64_t* init = has_init ? data_of<int64_t>(init_a) : nullptr;
    const int64_t* order64 = has_order && order_i64 ? data_of<int64_t>(order_a) : nullptr;
    const int32_t* order32 = has_order && !order_i64 ? data_of<int32_t>(order_a) : nullptr;
    auto order_at = [&](int64_t r, int64_t i) -> int64_t {
        return order64 ? order64[r * N + i] : order32 ? order32[r * N + i] : i;
    };

    py::array_t<int32_t> assign_o({R, N});
    int32_t* assign = assign_o.mutable_data();
    {
        py::gil_scoped_release release;
        for (int64_t i = 0; i < R * N * K; ++i) {
            if (cand[i] < -1 || cand[i] >= B) {
                fail("candidates", "bucket " + std::to_string(cand[i]) + " out of range [-1, n_buckets=" +
                                       std::to_string(B) + ")");
            }
        }
        if (has_order) {
            std::vector<uint8_t> seen(static_cast<size_t>(N));
            for (int64_t r = 0; r < R; ++r) {
                std::fill(seen.begin(), seen.end(), 0);
                for (int64_t i = 0; i < N; ++i) {
                    const int64_t it = order_at(r, i);
                    if (it < 0 || it >= N || seen[it]) {
                        fail("order", "row " + std::to_string(r) + " is not a permutation of 0..N-1");
                    }
                    seen[it] = 1;
                }
            }
        }
        for (int64_t r = 0; r < R; ++r) {
            int64_t total = N;
            for (int64_t b = 0; init && b < B; ++b) {
                if (init[r * B + b] < 0) fail("initial_counts", "must be >= 0");
                total += init[r * B + b];
            }
            if (capacity > 0 && capacity < (total + B - 1) / B) {  // capacity * B < total, without overflow
                fail("capacity", "capacity * n_buckets < " + std::to_string(total) +
                                     " items to place in repetition " + std::to_string(r));
            }
        }

        parallel_for(R, threads, 1, [&](int, int64_t r0, int64_t r1) {
            std::vector<int64_t> counts(static_cast<size_t>(B));
            MinTree tree;
            for (int64_t r = r0; r < r1; ++r) {
                for (int64_t b = 0; b < B; ++b) counts[b] = init ? init[r * B + b] : 0;
                tree.init(counts);
                for (int64_t i = 0; i < N; ++i) {
                    const int64_t it = order_at(r, i);
                    const int32_t* pref = cand + (r * N + it) * K;
                    int64_t best = -1;
                    for (int64_t j = 0, usable = 0; j < K && usable < choices; ++j) {
                        const int64_t b = pref[j];
                        if (b < 0 || (capacity > 0 && counts[b] >= capacity)) continue;
                        ++usable;
                        if (best < 0 || counts[b] < counts[best]) best = b;
                    }
                    if (best < 0) best = tree.argmin();
                    assign[r * N + it] = static_cast<int32_t>(best);
                    ++counts[best];
                    tree.updated(best);
                }
            }
        });
    }
    return assign_o;
}

}  // namespace jaxidx
