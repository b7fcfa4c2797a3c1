// sq8_search: probed leaves scored from 8-bit scalar-quantized rows (one byte per dimension), the
// `reorder` best of each query re-ranked exactly on the float rows (IdScanner, rerank_topk's scan).
//
// A row's code u (uint8 [dpad], zero past d) stands for lo + scale * u. A query's weights are
// w = (q - lo) * scale (l2) or q * scale (ip), kept as 7-bit integers w8 = rint(w / beta) in
// [-63, 63], beta = max |w| / 63 (1 when w = 0), and a row's approximate value is
//   l2: row_terms[row] - (2 beta) * float(w8 . u)     (row_terms = |scale * u|^2)
//   ip: -(beta * float(w8 . u))
// (the terms that depend on the query alone are dropped: they do not change its ranking). w8 . u is an
// exact integer on every path, so the values are the same bits everywhere: AVX-512 VNNI (vpdpbusd on 256 bits),
// AVX2 (maddubs: 2 x 255 x 63 < 2^15, no saturation) or portable. See reference.sq8_search.
#include "code_scan.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JAXIDX_X86 1
#endif

namespace jaxidx {

namespace {

constexpr int64_t kPad = 32;   // code bytes per row: a multiple of this (one AVX2 register)
constexpr float kWMax = 63.0f;
constexpr int64_t kMaxBytes = 131072;  // 255 x 63 x this < 2^31: the dot products fit int32

// Every row of a leaf's run: value, then offered to the query's approximate top `reorder`.
using RunScanFn = void (*)(const uint8_t* codes, int64_t n, int64_t dpad, const int8_t* w, const float* terms,
                           float beta2, int32_t first, Reservoir& top);

inline void offer(int32_t dot, const float* terms, int64_t i, float beta2, int32_t first, Reservoir& top) {
    top.push(terms ? terms[i] - beta2 * static_cast<float>(dot) : -(beta2 * static_cast<float>(dot)),
             first + static_cast<int32_t>(i));
}

void scan_run_portable(const uint8_t* codes, int64_t n, int64_t dpad, const int8_t* w, const float* terms,
                       float beta2, int32_t first, Reservoir& top) {
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t* u = codes + i * dpad;
        int32_t dot = 0;
        for (int64_t j = 0; j < dpad; ++j) dot += int32_t{u[j]} * int32_t{w[j]};
        offer(dot, terms, i, beta2, first, top);
    }
}

#ifdef JAXIDX_X86
// Rows 8 at a time: their dot products in one register (a tree of horizontal adds), the values computed
// lane-wise with the same float32 operations as `offer`, and only the lanes not above the bound offered.
// Written once for two instruction sets: NAME compiled for TARGET, where STEP(acc, u, w) adds the products
// of 32 code bytes u with 32 weights w into the 8 int32 lanes of acc (exact either way: AVX2's maddubs
// pairs stay below 2^15, VNNI's vpdpbusd adds in 32 bits).
#define JAXIDX_SQ8_SCAN_RUN(NAME, TARGET, STEP)                                                                     \
    __attribute__((target(TARGET))) void NAME(const uint8_t* codes, int64_t n, int64_t dpad, const int8_t* w,      \
                                              const float* terms, float beta2, int32_t first, Reservoir& top) {    \
        const __m256 b2 = _mm256_set1_ps(beta2), zero = _mm256_setzero_ps();                                       \
        alignas(32) float v8[8];                                                                                   \
        int64_t i = 0;                                                                                             \
        for (; i + 8 <= n; i += 8) {                                                                               \
            __m256i acc[8];                                                                                        \
            for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_si256();                                          \
            for (int64_t j = 0; j < dpad; j += kPad) {                                                             \
                const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j));                    \
                for (int r = 0; r < 8; ++r) {                                                                      \
                    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (i + r) * dpad + j)); \
                    acc[r] = STEP(acc[r], u, wv);                                                                  \
                }                                                                                                  \
            }                                                                                                      \
            const __m256i h01 = _mm256_hadd_epi32(acc[0], acc[1]), h23 = _mm256_hadd_epi32(acc[2], acc[3]);        \
            const __m256i h45 = _mm256_hadd_epi32(acc[4], acc[5]), h67 = _mm256_hadd_epi32(acc[6], acc[7]);        \
            const __m256i g0 = _mm256_hadd_epi32(h01, h23), g1 = _mm256_hadd_epi32(h45, h67);                      \
            const __m256i dots = _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20),                         \
                                                  _mm256_permute2x128_si256(g0, g1, 0x31));                        \
            const __m256 prod = _mm256_mul_ps(b2, _mm256_cvtepi32_ps(dots));                                       \
            const __m256 v = terms ? _mm256_sub_ps(_mm256_loadu_ps(terms + i), prod) : _mm256_sub_ps(zero, prod);  \
            int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(top.bound()), _CMP_NGT_UQ));            \
            if (!mask) continue;                                                                                   \
            _mm256_store_ps(v8, v);                                                                                \
            for (; mask; mask &= mask - 1) {                                                                       \
                const int r = __builtin_ctz(mask);                                                                 \
                \
                top.push(v8[r], first + static_cast<int32_t>(i + r));                                              \
            }                                                                                                      \
        }                                                                                                          \
        scan_run_portable(codes + i * dpad, n - i, dpad, w, terms ? terms + i : nullptr, beta2,                   \
                          first + static_cast<int32_t>(i), top);                                                   \
    }

__attribute__((target("avx2"))) inline __m256i dot_step_avx2(__m256i acc, __m256i u, __m256i w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, w), _mm256_set1_epi16(1)));
}
__attribute__((target("avx2,avx512vl,avx512vnni"))) inline __m256i dot_step_vnni(__m256i acc, __m256i u, __m256i w) {
    return _mm256_dpbusd_epi32(acc, u, w);
}
JAXIDX_SQ8_SCAN_RUN(scan_run_avx2, "avx2", dot_step_avx2)
JAXIDX_SQ8_SCAN_RUN(scan_run_vnni, "avx2,avx512vl,avx512vnni", dot_step_vnni)
#undef JAXIDX_SQ8_SCAN_RUN
#endif

RunScanFn pick_run_scan() {
#ifdef JAXIDX_X86
    if (use_avx512vnni()) return scan_run_vnni;
    if (use_avx2()) return scan_run_avx2;
#endif
    return scan_run_portable;
}

// A query's 7-bit weights w8 [dpad] (zero past d) and the factor of its integer dot products.
float query_weights(const float* q, const float* lo, const float* scale, int64_t d, int metric, int8_t* w8,
                    float* w) {
    float amax = 0.0f;
    for (int64_t j = 0; j < d; ++j) {
        w[j] = metric == kL2 ? (q[j] - lo[j]) * scale[j] : q[j] * scale[j];
        amax = std::max(amax, std::fabs(w[j]));
    }
    const float beta = amax > 0.0f ? amax / kWMax : 1.0f;
    for (int64_t j = 0; j < d; ++j) w8[j] = static_cast<int8_t>(std::min(kWMax, std::max(-kWMax, std::nearbyint(w[j] / beta))));
    return metric == kL2 ? 2.0f * beta : beta;
}

}  // namespace

py::tuple sq8_search(const py::object& queries_o, const py::object& base_o, const py::object& codes_o,
                     const py::object& lo_o, const py::object& scale_o, const py::object& row_terms_o,
                     const py::object& row_offsets_o, const py::object& leaves_o, const py::object& lens_o,
                     const py::object& reorder_o, const py::object& k_o, const py::object& metric_o,
                     const py::object& n_threads) {
    const LeafScanArgs a(queries_o, base_o, row_offsets_o, leaves_o, lens_o, reorder_o, k_o, metric_o, n_threads);
    const int64_t Q = a.Q, d = a.d, N = a.N, L = a.L, P = a.P, k = a.k, reorder = a.reorder;
    const int metric = a.metric;
    py::array c_a = require_array<uint8_t>(codes_o, "codes", 2);
    py::array lo_a = require_array<float>(lo_o, "lo", 1);
    py::array sc_a = require_array<float>(scale_o, "scale", 1);
    const int64_t dpad = c_a.shape(1);
    require_shape(c_a, "codes", 0, N, "one row per base row");
    if (dpad < d || dpad % kPad) fail("codes", "rows of " + std::to_string(dpad) + " bytes: need a multiple of 32, >= d");
    if (dpad > kMaxBytes) fail("codes", "rows of more than 131072 bytes (the int32 dot products could overflow)");
    require_shape(lo_a, "lo", 0, d, "queries' dimension");
    require_shape(sc_a, "scale", 0, d, "queries' dimension");
    if (metric == kCosine) fail("metric", "'cosine' has no 8-bit form: normalise the rows and use 'ip'");
    const float* terms = nullptr;
    if (!row_terms_o.is_none()) {
        py::array rt_a = require_array<float>(row_terms_o, "row_terms", 1);
        require_shape(rt_a, "row_terms", 0, N, "one term per base row");
        if (metric != kL2) fail("row_terms", "only for l2");
        terms = data_of<float>(rt_a);
    } else if (metric == kL2) {
        fail("row_terms", "required for l2 (sq8.row_terms)");
    }
    const int32_t* rows = data_of<int32_t>(a.row_offsets);
    const int32_t* leaves = data_of<int32_t>(a.leaves);
    const int32_t* lens = data_of<int32_t>(a.lens);
    const float* qs = data_of<float>(a.queries);
    const float* base = data_of<float>(a.base);
    const uint8_t* codes = data_of<uint8_t>(c_a);
    const float* lo = data_of<float>(lo_a);
    const float* scale = data_of<float>(sc_a);
    NearestOutputs out(Q, k);
    {
        py::gil_scoped_release release;
        check_leaf_offsets(rows, L, N, "base rows");
        check_probes(rows, L, leaves, lens, Q, P, [](int32_t) {});
        const RunScanFn scan_run = pick_run_scan();
        // Leaf-major within each thread's queries (as rerank_topk's runs): a leaf's codes are read once for
        // every query of the range that probes it, while they are in cache.
        parallel_for(Q, a.threads, (Q + a.threads - 1) / a.threads, [&](int, int64_t q0, int64_t q1) {
            const int64_t nq = q1 - q0;
            std::vector<int8_t> w8(static_cast<size_t>(nq * dpad), 0);
            std::vector<float> w(static_cast<size_t>(d)), beta2(static_cast<size_t>(nq));
            std::vector<Reservoir> approx(static_cast<size_t>(nq));
            std::vector<std::pair<int32_t, int32_t>> probes;  // (leaf, query - q0)
            for (int64_t i = 0; i < nq; ++i) {
                beta2[i] = query_weights(qs + (q0 + i) * d, lo, scale, d, metric, w8.data() + i * dpad, w.data());
                approx[i].reset(static_cast<size_t>(reorder));
                int64_t n_cand = 0;
                for (int64_t p = 0; p < P; ++p) {
                    const int32_t b = leaves[(q0 + i) * P + p], n = lens[(q0 + i) * P + p];
                    if (b < 0 || n == 0) continue;
                    probes.emplace_back(b, static_cast<int32_t>(i));
                    n_cand += n;
                }
                out.n_cand_out[q0 + i] = static_cast<int32_t>(std::min<int64_t>(n_cand, kInt32Max));
            }
            std::sort(probes.begin(), probes.end());
            for (const auto& [b, i] : probes) {
                const int64_t q = q0 + i;
                const int64_t p = std::find(leaves + q * P, leaves + (q + 1) * P, b) - (leaves + q * P);
                scan_run(codes + int64_t{rows[b]} * dpad, lens[q * P + p], dpad, w8.data() + i * dpad,
                         terms ? terms + rows[b] : nullptr, beta2[i], rows[b], approx[i]);
            }
            std::vector<int32_t> best;
            TopK exact(false);
            exact.reserve(static_cast<size_t>(k));
            IdScanner scanner(metric, d);
            for (int64_t i = 0; i < nq; ++i) {
                approx[i].rows(best);  // the exact top-k does not depend on the order (ties by row)
                exact.reset(static_cast<size_t>(k));
                scanner.scan(qs + (q0 + i) * d, base, best.data(), static_cast<int64_t>(best.size()), exact);
                write_nearest(exact, q0 + i, k, out.ids_out, out.dist_out);
            }
        });
    }
    return out.tuple();
}

}  // namespace jaxidx
