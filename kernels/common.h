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
#include <string>
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

inline int resolve_threads(int64_t n_threads, int64_t n_work) {
    if (n_threads < 0) fail("n_threads", "must be >= 0 (0 = all hardware threads)");
    int64_t t = n_threads;
    if (t == 0) t = std::max(1u, std::thread::hardware_concurrency());
    return static_cast<int>(std::max<int64_t>(1, std::min(t, n_work)));
}

// Calls fn(thread, begin, end) on chunks of [0, n) from `n_threads` workers
// (the calling thread is worker 0) that pull chunks from an atomic counter.
// An exception from any worker is rethrown after all have joined.
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
    for (int t = 1; t < n_threads; ++t) pool.emplace_back(work, t);
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
    explicit ZeroBuffer(size_t n) : ptr(static_cast<T*>(std::calloc(std::max<size_t>(n, 1), sizeof(T))), &std::free) {
        if (!ptr) throw std::bad_alloc();
    }
    T* get() const { return ptr.get(); }
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
            std::pop_heap(heap_.begin(), heap_.end(), before_);
            heap_.back() = e;
            std::push_heap(heap_.begin(), heap_.end(), before_);
        }
    }
    // Writes the kept entries best first and pads the remaining slots up to k.
    template <class Write>
    void emit(Write&& write) {
        std::sort_heap(heap_.begin(), heap_.end(), before_);
        for (size_t i = 0; i < heap_.size(); ++i) write(i, &heap_[i]);
        for (size_t i = heap_.size(); i < k_; ++i) write(i, nullptr);
    }

   private:
    bool larger_first_;
    size_t k_ = 0;
    std::vector<Entry> heap_;
    RanksFirst before_;
};

}  // namespace jaxidx
