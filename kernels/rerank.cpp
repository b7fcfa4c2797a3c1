// rerank_topk: exact distances from each query to its (deduplicated)
// candidate base vectors, keeping the k nearest. Candidates are ids (padded or
// CSR), or CSR runs of consecutive rows (bucket-contiguous layouts: no id list
// to build and no per-row dedup, and the scan reads memory in order).
//
// Canonical reduction order, shared with reference.py and device.py: lane l
// (0..7) sums term(i) for i = l, l + 8, l + 16, ... in increasing i, starting
// from +0.0; the lanes are then combined as
// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)). term is q*x (ip, cosine),
// x*x (cosine norm) or (q - x)^2 (l2), each rounded to float32 (the build
// uses -ffp-contract=off, so no fused multiply-add). One AVX2 register holds
// the 8 lanes; the portable version keeps them in an array.
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JAXIDX_X86 1
#endif

namespace jaxidx {

namespace {

enum Metric { kIP = 0, kCosine = 1, kL2 = 2 };

constexpr int64_t kPrefetchAhead = 32;  // rows (tuned at d = 50)

inline float combine_lanes(const float* a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// Distance from the reduced sums; a zero distance is reported as +0.0.
inline float finish(int metric, float acc, float xx, float qnorm) {
    float r;
    if (metric == kIP) {
        r = -acc;
    } else if (metric == kL2) {
        r = acc;
    } else {
        const float denom = qnorm * std::sqrt(xx);
        r = denom == 0.0f ? 1.0f : 1.0f - acc / denom;
    }
    return r == 0.0f ? 0.0f : r;
}

// Portable version: the 8 lanes in arrays (GCC vectorises the lane loops).
inline float dot_portable(const float* q, const float* x, int64_t d) {
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < d; ++i) a[i & 7] += q[i] * x[i];
    return combine_lanes(a);
}

template <int M>
float distance_portable(const float* q, const float* x, int64_t d, float qnorm) {
    float a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, n[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    auto term = [&](int l, int64_t i) {
        if (M == kL2) {
            const float diff = q[i] - x[i];
            a[l] += diff * diff;
        } else {
            a[l] += q[i] * x[i];
            if (M == kCosine) n[l] += x[i] * x[i];
        }
    };
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        for (int l = 0; l < 8; ++l) term(l, i + l);
    }
    for (int l = 0; i + l < d; ++l) term(l, i + l);
    return finish(M, combine_lanes(a), M == kCosine ? combine_lanes(n) : 0.0f, qnorm);
}

using ScanFn = void (*)(const float* qpad, float qnorm, const float* base, int64_t d, const int32_t* ids, int64_t n,
                        TopK& top);

template <int M>
void scan_portable(const float* qpad, float qnorm, const float* base, int64_t d, const int32_t* ids, int64_t n,
                   TopK& top) {
    for (int64_t i = 0; i < n; ++i) {
        if (i + kPrefetchAhead < n) prefetch_bytes(base + ids[i + kPrefetchAhead] * d, d * sizeof(float));
        top.push(distance_portable<M>(qpad, base + ids[i] * d, d, qnorm), ids[i]);
    }
}

#ifdef JAXIDX_X86
__attribute__((target("avx2"))) inline float combine_lanes_avx2(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // a_l + a_{l+4}
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                                  // (s0+s2, s1+s3)
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Distances of kRows rows at once (independent chains keep the FP units busy).
// qpad is the query zero-padded to a multiple of 8; a row's tail is loaded
// masked (zeros beyond d), so tail lanes add +0.0, which leaves them unchanged.
template <int M, int kRows>
__attribute__((target("avx2"))) inline void distances_avx2(const float* qpad, float qnorm, const float* const* x,
                                                           int64_t d, __m256i tail, float* out) {
    const int64_t full = d / 8;
    __m256 a[kRows], nn[kRows];
    for (int r = 0; r < kRows; ++r) a[r] = nn[r] = _mm256_setzero_ps();
    auto step = [&](int r, __m256 qv, __m256 xv) __attribute__((target("avx2"))) {
        if (M == kL2) {
            const __m256 diff = _mm256_sub_ps(qv, xv);
            a[r] = _mm256_add_ps(a[r], _mm256_mul_ps(diff, diff));
        } else {
            a[r] = _mm256_add_ps(a[r], _mm256_mul_ps(qv, xv));
            if (M == kCosine) nn[r] = _mm256_add_ps(nn[r], _mm256_mul_ps(xv, xv));
        }
    };
    for (int64_t c = 0; c < full; ++c) {
        const __m256 qv = _mm256_loadu_ps(qpad + 8 * c);
        for (int r = 0; r < kRows; ++r) step(r, qv, _mm256_loadu_ps(x[r] + 8 * c));
    }
    if (d % 8) {
        const __m256 qv = _mm256_loadu_ps(qpad + 8 * full);
        for (int r = 0; r < kRows; ++r) step(r, qv, _mm256_maskload_ps(x[r] + 8 * full, tail));
    }
    for (int r = 0; r < kRows; ++r) {
        out[r] = finish(M, combine_lanes_avx2(a[r]), M == kCosine ? combine_lanes_avx2(nn[r]) : 0.0f, qnorm);
    }
}

template <int M>
__attribute__((target("avx2"))) void scan_avx2(const float* qpad, float qnorm, const float* base, int64_t d,
                                               const int32_t* ids, int64_t n, TopK& top) {
    alignas(32) static const int32_t mask_table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    const __m256i tail = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask_table + 8 - d % 8));
    constexpr int kBlock = 4;
    float dist[kBlock];
    int64_t i = 0;
    for (; i + kBlock <= n; i += kBlock) {
        const float* x[kBlock];
        for (int r = 0; r < kBlock; ++r) {
            if (i + r + kPrefetchAhead < n) prefetch_bytes(base + ids[i + r + kPrefetchAhead] * d, d * sizeof(float));
            x[r] = base + ids[i + r] * d;
        }
        distances_avx2<M, kBlock>(qpad, qnorm, x, d, tail, dist);
        for (int r = 0; r < kBlock; ++r) top.push(dist[r], ids[i + r]);
    }
    for (; i < n; ++i) {
        const float* x = base + ids[i] * d;
        distances_avx2<M, 1>(qpad, qnorm, &x, d, tail, dist);
        top.push(dist[0], ids[i]);
    }
}
#endif

// AVX2 when the CPU has it, unless JAXIDX_NO_AVX2 is set (to test the portable path).
ScanFn pick_scan(int metric) {
#ifdef JAXIDX_X86
    static const bool avx2 = __builtin_cpu_supports("avx2") && !std::getenv("JAXIDX_NO_AVX2");
    if (avx2) {
        static const ScanFn avx2[3] = {scan_avx2<kIP>, scan_avx2<kCosine>, scan_avx2<kL2>};
        return avx2[metric];
    }
#endif
    static const ScanFn portable[3] = {scan_portable<kIP>, scan_portable<kCosine>, scan_portable<kL2>};
    return portable[metric];
}

}  // namespace

py::tuple rerank_topk(const py::object& queries_o, const py::object& base_o, const py::object& cand_offsets_o,
                      const py::object& cand_ids_o, const py::object& run_lens_o, const py::object& k_o,
                      const py::object& metric_o, const py::object& n_threads) {
    py::array q_a = require_array<float>(queries_o, "queries", 2);
    py::array x_a = require_array<float>(base_o, "base", 2);
    const int64_t Q = q_a.shape(0), d = q_a.shape(1), N = x_a.shape(0);
    require_shape(x_a, "base", 1, d, "queries' dimension");
    if (N > INT32_MAX) fail("base", "more than 2^31 - 1 rows");
    const bool padded = cand_offsets_o.is_none(), runs = !run_lens_o.is_none();
    if (padded && runs) fail("run_lens", "runs need cand_offsets");
    const char* ids_name = padded ? "candidates" : runs ? "run_starts" : "cand_ids";
    py::array ids_a = require_array<int32_t>(cand_ids_o, ids_name, padded ? 2 : 1);
    py::array lens_a;
    if (runs) {
        lens_a = require_array<int32_t>(run_lens_o, "run_lens", 1);
        require_shape(lens_a, "run_lens", 0, ids_a.shape(0), "one length per run start");
    }
    std::vector<int64_t> offsets(static_cast<size_t>(Q) + 1);
    if (padded) {
        require_shape(ids_a, "candidates", 0, Q, "one row per query");
        for (int64_t q = 0; q <= Q; ++q) offsets[q] = q * ids_a.shape(1);
    } else {
        if (!py::isinstance<py::array>(cand_offsets_o)) fail("cand_offsets", "expected a numpy array");
        py::array oa = py::reinterpret_borrow<py::array>(cand_offsets_o);
        const bool i64 = py::isinstance<py::array_t<int64_t>>(oa);
        oa = i64 ? require_array<int64_t>(oa, "cand_offsets", 1) : require_array<int32_t>(oa, "cand_offsets", 1);
        require_shape(oa, "cand_offsets", 0, Q + 1, "Q + 1");
        for (int64_t q = 0; q <= Q; ++q) offsets[q] = i64 ? data_of<int64_t>(oa)[q] : data_of<int32_t>(oa)[q];
    }
    const int64_t k = require_k(k_o);
    const std::string metric_name = require_str(metric_o, "metric");
    int metric;
    if (metric_name == "ip") {
        metric = kIP;
    } else if (metric_name == "cosine") {
        metric = kCosine;
    } else if (metric_name == "l2") {
        metric = kL2;
    } else {
        fail("metric", "must be 'ip', 'cosine' or 'l2', got '" + metric_name + "'");
    }
    const int threads = resolve_threads(require_threads(n_threads), Q);
    const float* qs = data_of<float>(q_a);
    const float* base = data_of<float>(x_a);
    const int32_t* cand = data_of<int32_t>(ids_a);
    const int32_t* lens = runs ? data_of<int32_t>(lens_a) : nullptr;
    const int64_t T = ids_a.size();

    py::array_t<int32_t> ids_o({Q, k}), nuniq_o(Q);
    py::array_t<float> dist_o({Q, k});
    int32_t* out_ids = ids_o.mutable_data();
    int32_t* out_nuniq = nuniq_o.mutable_data();
    float* out_dist = dist_o.mutable_data();
    {
        py::gil_scoped_release release;
        if (offsets[0] != 0) fail("cand_offsets", "cand_offsets[0] must be 0");
        for (int64_t q = 0; q < Q; ++q) {
            if (offsets[q + 1] < offsets[q]) fail("cand_offsets", "must be non-decreasing");
        }
        if (offsets[Q] > T) fail("cand_offsets", std::string("cand_offsets[Q] exceeds the length of ") + ids_name);
        for (int64_t i = 0; i < offsets[Q]; ++i) {
            if (runs && lens[i] < 0) fail("run_lens", "length " + std::to_string(lens[i]) + " < 0");
            if (runs ? (cand[i] < 0 || int64_t{cand[i]} + lens[i] > N) : (cand[i] < -1 || cand[i] >= N)) {
                fail(ids_name, runs ? "run [" + std::to_string(cand[i]) + ", +" + std::to_string(lens[i]) +
                                          ") out of range [0, N=" + std::to_string(N) + ")"
                                    : "id " + std::to_string(cand[i]) + " out of range [-1, N=" + std::to_string(N) + ")");
            }
        }
        int64_t max_per_query = 0;
        for (int64_t q = 0; q < Q; ++q) {
            int64_t n = offsets[q + 1] - offsets[q];
            if (runs) {
                n = 0;
                for (int64_t i = offsets[q]; i < offsets[q + 1]; ++i) n += lens[i];
            }
            max_per_query = std::max(max_per_query, n);
        }
        const ScanFn scan = pick_scan(metric);
        const int64_t dpad = (d + 7) / 8 * 8;
        struct Scratch {
            ZeroPool<uint8_t>::Lease seen;
            std::vector<int32_t> unique;
            std::vector<std::pair<int32_t, int32_t>> spans;  // runs as [begin, end), sorted
            std::vector<float> qpad;
            TopK top{false};
            explicit Scratch(size_t n) : seen(n) {}
        };
        std::vector<std::unique_ptr<Scratch>> scratch;
        for (int t = 0; t < threads; ++t) {
            scratch.emplace_back(new Scratch(runs ? 0 : static_cast<size_t>(N)));  // runs need no seen marks
            scratch.back()->unique.reserve(static_cast<size_t>(std::min(max_per_query, N)));
            scratch.back()->qpad.assign(static_cast<size_t>(dpad), 0.0f);
            scratch.back()->top.reserve(static_cast<size_t>(std::min(k, std::min(max_per_query, N))));
        }
        parallel_for(Q, threads, 4, [&](int t, int64_t q0, int64_t q1) {
            Scratch& s = *scratch[t];
            uint8_t* seen = s.seen.get();
            for (int64_t q = q0; q < q1; ++q) {
                s.unique.clear();
                if (runs) {  // rows of the runs in order of their start, overlaps once
                    s.spans.clear();
                    for (int64_t i = offsets[q]; i < offsets[q + 1]; ++i) {
                        if (lens[i] > 0) s.spans.emplace_back(cand[i], cand[i] + lens[i]);
                    }
                    std::sort(s.spans.begin(), s.spans.end());
                    int32_t done = 0;
                    for (const auto& [b, e] : s.spans) {
                        for (int32_t c = std::max(b, done); c < e; ++c) s.unique.push_back(c);
                        done = std::max(done, e);
                    }
                } else {
                    for (int64_t i = offsets[q]; i < offsets[q + 1]; ++i) {
                        const int32_t c = cand[i];
                        if (c >= 0 && !seen[c]) {
                            seen[c] = 1;
                            s.unique.push_back(c);
                        }
                    }
                    for (int32_t c : s.unique) seen[c] = 0;
                }
                const float* qv = qs + q * d;
                std::copy(qv, qv + d, s.qpad.begin());
                const float qnorm = metric == kCosine ? std::sqrt(dot_portable(qv, qv, d)) : 0.0f;
                s.top.reset(static_cast<size_t>(k));
                scan(s.qpad.data(), qnorm, base, d, s.unique.data(), static_cast<int64_t>(s.unique.size()), s.top);
                out_nuniq[q] = static_cast<int32_t>(s.unique.size());
                s.top.emit([&](size_t i, const Entry* e) {
                    out_ids[q * k + i] = e ? e->id() : -1;
                    out_dist[q * k + i] = e ? e->value : INFINITY;
                });
            }
        });
    }
    return py::make_tuple(ids_o, dist_o, nuniq_o);
}

}  // namespace jaxidx
