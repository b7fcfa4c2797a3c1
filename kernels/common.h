// Shared pieces of the jaxidx search kernels: argument validation, a
// work-stealing parallel loop and a bounded top-k heap with the kernels'
// (key, id) total order.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace jaxidx {

[[noreturn]] inline void fail(const std::string& arg, const std::string& what) {
    throw py::value_error(arg + ": " + what);
}

// The argument must already be a C-contiguous numpy array of exactly dtype T
// with `ndim` dimensions; nothing is converted.
template <class T>
py::array require_array(const py::object& obj, const char* name, int ndim) {
    if (!py::isinstance<py::array>(obj)) {
        fail(name, "expected a numpy array, got " + std::string(py::str(py::type::of(obj))));
    }
    py::array a = py::reinterpret_borrow<py::array>(obj);
    if (!py::isinstance<py::array_t<T>>(a)) {
        fail(name, "expected dtype " + std::string(py::str(py::dtype::of<T>())) + ", got " +
                       std::string(py::str(a.dtype())));
    }
    if (a.ndim() != ndim) {
        fail(name, "expected " + std::to_string(ndim) + " dimensions, got " + std::to_string(a.ndim()));
    }
    if (!(a.flags() & py::array::c_style)) fail(name, "must be C-contiguous");
    return a;
}

// An integer argument (a Python int or anything with __index__, e.g. a NumPy integer) in [lo, hi];
// otherwise ValueError "name: expected an integer" or "name: <what>, got <value>".
inline int64_t require_int(const py::object& obj, const char* name, int64_t lo, int64_t hi, const char* what) {
    if (!PyIndex_Check(obj.ptr())) {
        fail(name, "expected an integer, got " + std::string(py::str(py::type::of(obj))));
    }
    const auto value = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
    if (!value) throw py::error_already_set();
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
    if (overflow || v < lo || v > hi) fail(name, std::string(what) + ", got " + std::string(py::str(value)));
    return v;
}

inline std::string require_str(const py::object& obj, const char* name) {
    if (!py::isinstance<py::str>(obj)) fail(name, "expected a str, got " + std::string(py::str(py::type::of(obj))));
    return obj.cast<std::string>();
}

constexpr int64_t kInt32Max = INT32_MAX;
constexpr int64_t kInt64Max = INT64_MAX;

// k of a top-k: ids are int32, so more than 2^31 - 1 slots could only ever hold padding.
inline int64_t require_k(const py::object& k, const char* name = "k") {
    return require_int(k, name, 1, kInt32Max, "must be in [1, 2^31 - 1]");
}

inline int64_t require_threads(const py::object& n_threads) {
    return require_int(n_threads, "n_threads", 0, kInt32Max, "must be in [0, 2^31 - 1] (0 = all hardware threads)");
}

template <class T>
const T* data_of(const py::array& a) {
    return static_cast<const T*>(a.data());
}

inline void require_shape(const py::array& a, const char* name, py::ssize_t axis, py::ssize_t expected,
                          const char* what) {
    if (a.shape(axis) != expected) {
        fail(name, "axis " + std::to_string(axis) + " has length " + std::to_string(a.shape(axis)) +
                       ", expected " + std::to_string(expected) + " (" + what + ")");
    }
}

// n_threads as checked by require_threads -> workers for n_work items (at least 1, at most n_work).
inline int resolve_threads(int64_t n_threads, int64_t n_work) {
    int64_t t = n_threads;
    if (t == 0) t = std::max(1u, std::thread::hardware_concurrency());
    return static_cast<int>(std::max<int64_t>(1, std::min(t, n_work)));
}

// Calls fn(thread, begin, end) on chunks of [0, n) from `n_threads` workers
// (the calling thread is worker 0) that pull chunks from an atomic counter.
// An exception from any worker is rethrown after all have joined. Where the system
// cannot start all the threads, the ones started do all the work.
template <class Fn>
void parallel_for(int64_t n, int n_threads, int64_t chunk, Fn&& fn) {
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::atomic<bool> failed{false};
    auto work = [&](int t) {
        try {
            for (;;) {
                if (failed.load(std::memory_order_relaxed)) return;
                int64_t begin = next.fetch_add(chunk, std::memory_order_relaxed);
                if (begin >= n) return;
                fn(t, begin, std::min(n, begin + chunk));
            }
        } catch (...) {
            if (!failed.exchange(true)) error = std::current_exception();
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(n_threads - 1);
    for (int t = 1; t < n_threads; ++t) {
        try {
            pool.emplace_back(work, t);
        } catch (const std::system_error&) {
            break;
        }
    }
    work(0);
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
}

// Prefetches every cache line of [p, p + bytes).
inline void prefetch_bytes(const void* p, size_t bytes) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
    const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
    for (uintptr_t line = first; line < end; line += 64) __builtin_prefetch(reinterpret_cast<const void*>(line));
}

// Zero-initialised scratch; calloc lets the OS hand out lazily zeroed pages.
template <class T>
struct ZeroBuffer {
    std::unique_ptr<T, decltype(&std::free)> ptr{nullptr, &std::free};
    size_t size = 0;
    explicit ZeroBuffer(size_t n)
        : ptr(static_cast<T*>(std::calloc(std::max<size_t>(n, 1), sizeof(T))), &std::free), size(n) {
        if (!ptr) throw std::bad_alloc();
    }
    T* get() const { return ptr.get(); }
};

// Zeroed per-item scratch kept across calls. A fresh buffer of n items costs
// page faults and zeroing over all n on first touch, which at millions of
// items dominates a single query's time; a lease reuses a kept buffer instead.
// Holders hand buffers back all zero (the kernels clear exactly the entries
// they touched); one released while an exception unwinds may be dirty and is
// freed. At most kKeptBytes per element type stay kept, larger buffers first.
template <class T>
class ZeroPool {
  public:
    static constexpr size_t kKeptBytes = size_t{1} << 30;

    class Lease {
      public:
        explicit Lease(size_t n) : exceptions_(std::uncaught_exceptions()), buf_(shared().take(n)) {}
        Lease(const Lease&) = delete;
        Lease& operator=(const Lease&) = delete;
        ~Lease() {
            if (std::uncaught_exceptions() == exceptions_) shared().give(std::move(buf_));
        }
        T* get() const { return buf_.get(); }

      private:
        int exceptions_;
        ZeroBuffer<T> buf_;
    };

  private:
    // One pool per element type, shared by every kernel; never destroyed, so no order issues at exit.
    static ZeroPool& shared() {
        static auto* pool = new ZeroPool();
        return *pool;
    }

    ZeroBuffer<T> take(size_t n) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            auto best = kept_.end();  // the smallest kept buffer that fits
            for (auto it = kept_.begin(); it != kept_.end(); ++it) {
                if (it->size >= n && (best == kept_.end() || it->size < best->size)) best = it;
            }
            if (best != kept_.end()) {
                ZeroBuffer<T> buf = std::move(*best);
                kept_.erase(best);
                bytes_ -= buf.size * sizeof(T);
                return buf;
            }
        }
        return ZeroBuffer<T>(n);
    }

    void give(ZeroBuffer<T>&& buf) {
        const size_t bytes = buf.size * sizeof(T);
        std::lock_guard<std::mutex> lock(mu_);
        while (bytes_ + bytes > kKeptBytes && !kept_.empty()) {  // evict smaller buffers for a larger one
            auto smallest = std::min_element(kept_.begin(), kept_.end(),
                                             [](const auto& a, const auto& b) { return a.size < b.size; });
            if (smallest->size >= buf.size) return;  // the kept ones are as useful: free this one
            bytes_ -= smallest->size * sizeof(T);
            kept_.erase(smallest);
        }
        if (bytes_ + bytes > kKeptBytes) return;
        bytes_ += bytes;
        kept_.push_back(std::move(buf));
    }

    std::mutex mu_;
    std::vector<ZeroBuffer<T>> kept_;
    size_t bytes_ = 0;
};

// Rank key of (value, id) as one integer, larger = ranks first: values in
// descending order (-0.0 == +0.0, NaN after every number), ties by smaller id.
inline uint64_t rank_key(float value, int32_t id) {
    uint32_t bits;
    value = value == 0.0f ? 0.0f : value;
    std::memcpy(&bits, &value, sizeof bits);
    // Flip negative floats (and set the sign of positive ones) so that the
    // unsigned order is the float order; NaN goes to 0, below -inf.
    const uint32_t ordered = std::isnan(value) ? 0u : (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return (static_cast<uint64_t>(ordered) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(id));
}

struct Entry {
    uint64_t key;  // rank_key
    float value;   // reported value
    int32_t aux;   // carried along (merge_topk's hit count)
    int32_t id() const { return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key)); }
};

struct RanksFirst {
    bool operator()(const Entry& a, const Entry& b) const { return a.key > b.key; }
};

// Keeps the k best (value, id) pairs seen: largest values first, or smallest
// when !larger_first; NaN last, ties by smaller id. A heap whose top is the
// worst kept entry.
class TopK {
   public:
    explicit TopK(bool larger_first) : larger_first_(larger_first) {}
    void reset(size_t k) {
        k_ = k;
        heap_.clear();
    }
    void reserve(size_t n) { heap_.reserve(n); }
    // The worst kept value once k are kept (a value strictly worse is never kept), else the loosest bound.
    float bound() const {
        if (heap_.size() < k_) return larger_first_ ? -INFINITY : INFINITY;
        return heap_.front().value;
    }
    void push(float value, int32_t id, int32_t aux = 0) {
        if (heap_.size() == k_) {
            // Cheap early out for values strictly worse than the worst kept one (NaN falls through).
            const float worst = heap_.front().value;
            if (larger_first_ ? value < worst : value > worst) return;
        }
        const Entry e{rank_key(larger_first_ ? value : -value, id), value, aux};
        if (heap_.size() < k_) {
            heap_.push_back(e);
            std::push_heap(heap_.begin(), heap_.end(), before_);
        } else if (e.key > heap_.front().key) {
            replace_worst(e);
        }
    }
    // Writes the kept entries best first and pads the remaining slots up to k.
    template <class Write>
    void emit(Write&& write) {
        std::sort(heap_.begin(), heap_.end(), before_);  // k is small: insertion sort, fewer branch misses
        for (size_t i = 0; i < heap_.size(); ++i) write(i, &heap_[i]);
        for (size_t i = heap_.size(); i < k_; ++i) write(i, nullptr);
    }

   private:
    // The heap orders by key, smallest (the worst kept) at the front: e replaces it and sinks to its
    // place in one pass (pop_heap + push_heap would take two).
    void replace_worst(const Entry& e) {
        const size_t n = heap_.size();
        size_t i = 0;
        for (size_t c = 1; c < n; c = 2 * i + 1) {
            if (c + 1 < n && heap_[c + 1].key < heap_[c].key) ++c;
            if (heap_[c].key >= e.key) break;
            heap_[i] = heap_[c];
            i = c;
        }
        heap_[i] = e;
    }

    bool larger_first_;
    size_t k_ = 0;
    std::vector<Entry> heap_;
    RanksFirst before_;
};

#if defined(__x86_64__) || defined(__i386__)
// AVX2 when the CPU has it, unless JAXIDX_NO_AVX2 is set (to test the portable paths); every kernel's choice.
inline bool use_avx2() {
    static const bool avx2 = __builtin_cpu_supports("avx2") && !std::getenv("JAXIDX_NO_AVX2");
    return avx2;
}

// AVX-512 (byte shuffles: AVX512BW) for the kernels that have such a path (pq4_search's scan), when the
// CPU has it and AVX2 is in use, unless JAXIDX_NO_AVX512 is set: read at every call (one getenv per
// search), so a test or benchmark can run both paths in one process.
inline bool use_avx512bw() {
    static const bool cpu = use_avx2() && __builtin_cpu_supports("avx512bw");
    return cpu && !std::getenv("JAXIDX_NO_AVX512");
}

// AVX-512 VNNI (byte dot products: sq8_search's scan), on the same terms as use_avx512bw.
inline bool use_avx512vnni() {
    static const bool cpu = use_avx512bw() && __builtin_cpu_supports("avx512vnni");
    return cpu && !std::getenv("JAXIDX_NO_AVX512");
}
#endif

// Leaf offsets rows [L+1] into n entries (`what`: "base rows", ...): from 0, non-decreasing, ending at n.
inline void check_leaf_offsets(const int32_t* rows, int64_t L, int64_t n, const char* what) {
    if (rows[0] != 0) fail("row_offsets", "must start at 0");
    for (int64_t b = 0; b < L; ++b) {
        if (rows[b + 1] < rows[b]) fail("row_offsets", "must be non-decreasing");
    }
    if (rows[L] != n) fail("row_offsets", "last entry " + std::to_string(rows[L]) + " != " + what + " " + std::to_string(n));
}

// The probed leaves [Q, P] of a leaf scan (-1 = none, no leaf twice in one query) and the rows read of each,
// lens [Q, P] (0 where -1, at most the leaf's rows); on_leaf(b) is called for every probe of a leaf b.
template <class OnLeaf>
void check_probes(const int32_t* rows, int64_t L, const int32_t* leaves, const int32_t* lens, int64_t Q, int64_t P,
                  OnLeaf&& on_leaf) {
    std::vector<int64_t> seen(static_cast<size_t>(L), -1);  // a leaf probed twice by one query
    for (int64_t q = 0; q < Q; ++q) {
        for (int64_t p = 0; p < P; ++p) {
            const int32_t b = leaves[q * P + p], n = lens[q * P + p];
            if (b < -1 || b >= L) fail("leaves", "leaf " + std::to_string(b) + " out of range [-1, " + std::to_string(L) + ")");
            if (b < 0) {
                if (n != 0) fail("lens", "must be 0 where leaves is -1");
                continue;
            }
            if (n < 0 || n > rows[b + 1] - rows[b]) {
                fail("lens", std::to_string(n) + " rows of leaf " + std::to_string(b) + ", which has " +
                                 std::to_string(rows[b + 1] - rows[b]));
            }
            if (seen[b] == q) fail("leaves", "query " + std::to_string(q) + " probes leaf " + std::to_string(b) + " twice");
            seen[b] = q;
            on_leaf(b);
        }
    }
}

// The kept entries of a TopK into row q of ids / values [Q, k], best first, padded with -1 / `pad`.
inline void write_top(TopK& top, int64_t q, int64_t k, int32_t* ids, float* values, float pad) {
    top.emit([&](size_t i, const Entry* e) {
        ids[q * k + i] = e ? e->id() : -1;
        values[q * k + i] = e ? e->value : pad;
    });
}

// A query's k nearest (a TopK of distances) into row q of ids / dist [Q, k], padded with -1 / +inf.
inline void write_nearest(TopK& top, int64_t q, int64_t k, int32_t* ids, float* dist) {
    write_top(top, q, k, ids, dist, INFINITY);
}

}  // namespace jaxidx
