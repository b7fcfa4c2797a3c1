// rerank_topk: exact distances from each query to its (deduplicated)
// candidate base vectors, keeping the k nearest. Candidates are ids (padded or
// CSR), or CSR runs of consecutive rows (bucket-contiguous layouts: no id list
// to build and no per-row dedup, and the scan reads memory in order).
//
// Runs are scanned span-major: each thread takes a range of queries, groups
// their runs by the rows they cover, and scans a bucket's rows a cache-sized
// tile at a time for every query that probes it, so a bucket probed by many
// queries of a batch is read from memory once, not once per query. Every
// (query, row) distance is the same computation in either order, and the
// top-k keeps ties by id, so the results do not depend on the order.
//
// Canonical reduction order, shared with reference.py and device.py: lane l
// (0..7) sums term(i) for i = l, l + 8, l + 16, ... in increasing i, starting
// from +0.0; the lanes are then combined as
// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)). term is q*x (ip, cosine),
// x*x (cosine norm) or (q - x)^2 (l2), each rounded to float32 (the build
// uses -ffp-contract=off, so no fused multiply-add). One AVX2 register holds
// the 8 lanes; the portable version keeps them in an array.
#include "scan.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JAXIDX_X86 1
#endif

namespace jaxidx {

namespace {

constexpr int64_t kPrefetchAhead = 32;  // rows (tuned at d = 50)
constexpr int64_t kTileBytes = 128 << 10;  // rows of a bucket scanned for all its queries at once (L2-resident)

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

template <int M>
void scan_portable(const float* qpad, float qnorm, const float* base, int64_t d, const int32_t* ids, int64_t n,
                   TopK& top) {
    for (int64_t i = 0; i < n; ++i) {
        if (i + kPrefetchAhead < n) prefetch_bytes(base + ids[i + kPrefetchAhead] * d, d * sizeof(float));
        top.push(distance_portable<M>(qpad, base + ids[i] * d, d, qnorm), ids[i]);
    }
}

// Rows first..first+n-1 of a contiguous block (`rows` points at row `first`): no id list, and the
// hardware prefetcher follows the sequential reads.
using RowScanFn = void (*)(const float* qpad, float qnorm, const float* rows, int64_t d, int32_t first, int64_t n,
                           TopK& top);

template <int M>
void scan_rows_portable(const float* qpad, float qnorm, const float* rows, int64_t d, int32_t first, int64_t n,
                        TopK& top) {
    for (int64_t i = 0; i < n; ++i) top.push(distance_portable<M>(qpad, rows + i * d, d, qnorm), first + i);
}

#ifdef JAXIDX_X86
__attribute__((target("avx2"))) inline float combine_lanes_avx2(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // a_l + a_{l+4}
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));                                  // (s0+s2, s1+s3)
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Lanes 0..(d % 8)-1 set (all eight when d % 8 == 0): the masked load of a row's last partial chunk.
__attribute__((target("avx2"))) inline __m256i tail_mask_avx2(int64_t d) {
    alignas(32) static const int32_t mask_table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask_table + 8 - d % 8));
}

// Per-lane sums of kRows rows at once (independent chains keep the FP units busy): a, the distance
// terms; nn, |x|^2 for cosine. qpad is the query zero-padded to a multiple of 8; a row's tail is
// loaded masked (zeros beyond d), so tail lanes add +0.0, which leaves them unchanged.
template <int M, int kRows>
__attribute__((target("avx2"))) inline void accumulate_avx2(const float* qpad, const float* const* x, int64_t d,
                                                            __m256i tail, __m256* a, __m256* nn) {
    const int64_t full = d / 8;
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
}

// Distances of kRows rows, each combined and finished on its own.
template <int M, int kRows>
__attribute__((target("avx2"))) inline void distances_avx2(const float* qpad, float qnorm, const float* const* x,
                                                           int64_t d, __m256i tail, float* out) {
    __m256 a[kRows], nn[kRows];
    accumulate_avx2<M, kRows>(qpad, x, d, tail, a, nn);
    for (int r = 0; r < kRows; ++r) {
        out[r] = finish(M, combine_lanes_avx2(a[r]), M == kCosine ? combine_lanes_avx2(nn[r]) : 0.0f, qnorm);
    }
}

template <int M>
__attribute__((target("avx2"))) void scan_avx2(const float* qpad, float qnorm, const float* base, int64_t d,
                                               const int32_t* ids, int64_t n, TopK& top) {
    const __m256i tail = tail_mask_avx2(d);
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

// The 8 lane sums of 8 rows' accumulators a[0..7] combined per row in the canonical order
// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)) (as combine_lanes), the 8 results in one register
// (lane r: row r), by pairwise adds of lane-shuffled registers instead of one horizontal sum per row.
__attribute__((target("avx2"))) inline __m256 combine_lanes_8rows(const __m256* a) {
    __m256 t[4];  // t[r]: row r's (a0+a4, a1+a5, a2+a6, a3+a7) in the low half, row r+4's in the high half
    for (int r = 0; r < 4; ++r) {
        t[r] = _mm256_add_ps(_mm256_permute2f128_ps(a[r], a[r + 4], 0x20), _mm256_permute2f128_ps(a[r], a[r + 4], 0x31));
    }
    // Per half: (u0, u1) = (t0 + t2, t1 + t3) of two rows side by side.
    const __m256 w01 = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], 0x44), _mm256_shuffle_ps(t[0], t[1], 0xEE));
    const __m256 w23 = _mm256_add_ps(_mm256_shuffle_ps(t[2], t[3], 0x44), _mm256_shuffle_ps(t[2], t[3], 0xEE));
    // u0 + u1 of rows 0-3 (low half) and 4-7 (high half).
    return _mm256_add_ps(_mm256_shuffle_ps(w01, w23, 0x88), _mm256_shuffle_ps(w01, w23, 0xDD));
}

// Contiguous rows 8 at a time: distances in one register, `finish` lane-wise (the same IEEE operations,
// so the same bits), and a row is offered to the top-k only where some lane is not worse than its bound.
template <int M>
__attribute__((target("avx2"))) void scan_rows_avx2(const float* qpad, float qnorm, const float* rows, int64_t d,
                                                    int32_t first, int64_t n, TopK& top) {
    const __m256i tail = tail_mask_avx2(d);
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), qn = _mm256_set1_ps(qnorm);
    alignas(32) float dist[8];
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float* x = rows + i * d;
        const float* xs[8] = {x, x + d, x + 2 * d, x + 3 * d, x + 4 * d, x + 5 * d, x + 6 * d, x + 7 * d};
        __m256 a[8], nn[8];
        accumulate_avx2<M, 8>(qpad, xs, d, tail, a, nn);
        __m256 v = combine_lanes_8rows(a);
        if (M == kIP) {
            v = _mm256_sub_ps(zero, v);
        } else if (M == kCosine) {
            const __m256 denom = _mm256_mul_ps(qn, _mm256_sqrt_ps(combine_lanes_8rows(nn)));
            v = _mm256_blendv_ps(_mm256_sub_ps(one, _mm256_div_ps(v, denom)), one,
                                 _mm256_cmp_ps(denom, zero, _CMP_EQ_OQ));
        }
        v = _mm256_blendv_ps(v, zero, _mm256_cmp_ps(v, zero, _CMP_EQ_OQ));  // -0.0 -> +0.0
        // Lanes not strictly above the bound (NaN included) may enter the top-k.
        int offer = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(top.bound()), _CMP_NGT_UQ));
        if (!offer) continue;
        _mm256_store_ps(dist, v);
        for (; offer; offer &= offer - 1) {
            const int r = __builtin_ctz(offer);
            top.push(dist[r], first + static_cast<int32_t>(i + r));
        }
    }
    for (; i < n; ++i) {
        const float* x = rows + i * d;
        distances_avx2<M, 1>(qpad, qnorm, &x, d, tail, dist);
        top.push(dist[0], first + static_cast<int32_t>(i));
    }
}
#endif

RowScanFn pick_row_scan(int metric) {
#ifdef JAXIDX_X86
    if (use_avx2()) {
        static const RowScanFn avx2[3] = {scan_rows_avx2<kIP>, scan_rows_avx2<kCosine>, scan_rows_avx2<kL2>};
        return avx2[metric];
    }
#endif
    static const RowScanFn portable[3] = {scan_rows_portable<kIP>, scan_rows_portable<kCosine>,
                                          scan_rows_portable<kL2>};
    return portable[metric];
}

ScanFn pick_scan(int metric) {
#ifdef JAXIDX_X86
    if (use_avx2()) {
        static const ScanFn avx2[3] = {scan_avx2<kIP>, scan_avx2<kCosine>, scan_avx2<kL2>};
        return avx2[metric];
    }
#endif
    static const ScanFn portable[3] = {scan_portable<kIP>, scan_portable<kCosine>, scan_portable<kL2>};
    return portable[metric];
}

}  // namespace

int require_metric(const py::object& metric_o) {
    const std::string name = require_str(metric_o, "metric");
    if (name == "ip") return kIP;
    if (name == "cosine") return kCosine;
    if (name == "l2") return kL2;
    fail("metric", "must be 'ip', 'cosine' or 'l2', got '" + name + "'");
}

float exact_distance(int metric, const float* q, const float* x, int64_t d) {
    return metric == kL2 ? distance_portable<kL2>(q, x, d, 0.0f) : distance_portable<kIP>(q, x, d, 0.0f);
}

IdScanner::IdScanner(int metric, int64_t d)
    : metric_(metric), d_(d), scan_(pick_scan(metric)), qpad_(static_cast<size_t>((d + 7) / 8 * 8), 0.0f) {}

void IdScanner::scan(const float* q, const float* base, const int32_t* ids, int64_t n, TopK& top) {
    std::copy(q, q + d_, qpad_.begin());
    const float qnorm = metric_ == kCosine ? std::sqrt(dot_portable(q, q, d_)) : 0.0f;
    scan_(qpad_.data(), qnorm, base, d_, ids, n, top);
}

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
    const int metric = require_metric(metric_o);
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
        const RowScanFn scan_rows = pick_row_scan(metric);
        const int64_t dpad = (d + 7) / 8 * 8;
        if (runs) {
            const int64_t tile = std::max<int64_t>(8, kTileBytes / (d * static_cast<int64_t>(sizeof(float))));
            parallel_for(Q, threads, (Q + threads - 1) / threads, [&](int, int64_t q0, int64_t q1) {
                struct Span {
                    int32_t begin, end, q;
                    bool operator<(const Span& o) const {
                        return begin != o.begin ? begin < o.begin : end != o.end ? end < o.end : q < o.q;
                    }
                };
                std::vector<Span> spans;  // every query's runs as disjoint [begin, end) (overlaps once)
                std::vector<std::pair<int32_t, int32_t>> own;
                for (int64_t q = q0; q < q1; ++q) {
                    own.clear();
                    for (int64_t i = offsets[q]; i < offsets[q + 1]; ++i) {
                        if (lens[i] > 0) own.emplace_back(cand[i], cand[i] + lens[i]);
                    }
                    std::sort(own.begin(), own.end());
                    int32_t done = 0;
                    int64_t n = 0;
                    for (const auto& [b, e] : own) {
                        const int32_t from = std::max(b, done);
                        if (from < e) {
                            spans.push_back({from, e, static_cast<int32_t>(q - q0)});
                            n += e - from;
                        }
                        done = std::max(done, e);
                    }
                    out_nuniq[q] = static_cast<int32_t>(n);
                }
                std::sort(spans.begin(), spans.end());
                const int64_t nq = q1 - q0;
                std::vector<float> qpad(static_cast<size_t>(nq * dpad), 0.0f), qnorm(static_cast<size_t>(nq), 0.0f);
                std::vector<TopK> tops(static_cast<size_t>(nq), TopK(false));
                for (int64_t i = 0; i < nq; ++i) {
                    const float* qv = qs + (q0 + i) * d;
                    std::copy(qv, qv + d, qpad.begin() + i * dpad);
                    if (metric == kCosine) qnorm[i] = std::sqrt(dot_portable(qv, qv, d));
                    tops[i].reset(static_cast<size_t>(k));
                    tops[i].reserve(static_cast<size_t>(k));
                }
                for (size_t i = 0, j; i < spans.size(); i = j) {  // the queries of one span, tile by tile
                    for (j = i; j < spans.size() && spans[j].begin == spans[i].begin && spans[j].end == spans[i].end;) ++j;
                    for (int64_t t0 = spans[i].begin; t0 < spans[i].end; t0 += tile) {
                        const int64_t n = std::min<int64_t>(tile, spans[i].end - t0);
                        for (size_t g = i; g < j; ++g) {
                            const int32_t qi = spans[g].q;
                            scan_rows(qpad.data() + qi * dpad, qnorm[qi], base + t0 * d, d, static_cast<int32_t>(t0), n,
                                      tops[qi]);
                        }
                    }
                }
                for (int64_t i = 0; i < nq; ++i) write_nearest(tops[i], q0 + i, k, out_ids, out_dist);
            });
        } else {  // ids: each query's candidates deduplicated, then scanned
            struct Scratch {
                ZeroPool<uint8_t>::Lease seen;
                std::vector<int32_t> unique;
                IdScanner scanner;
                TopK top{false};
                Scratch(size_t n, int metric, int64_t d) : seen(n), scanner(metric, d) {}
            };
            int64_t max_per_query = 0;
            for (int64_t q = 0; q < Q; ++q) max_per_query = std::max(max_per_query, offsets[q + 1] - offsets[q]);
            std::vector<std::unique_ptr<Scratch>> scratch;
            for (int t = 0; t < threads; ++t) {
                scratch.emplace_back(new Scratch(static_cast<size_t>(N), metric, d));
                scratch.back()->unique.reserve(static_cast<size_t>(std::min(max_per_query, N)));
                scratch.back()->top.reserve(static_cast<size_t>(std::min(k, std::min(max_per_query, N))));
            }
            parallel_for(Q, threads, 4, [&](int t, int64_t q0, int64_t q1) {
                Scratch& s = *scratch[t];
                uint8_t* seen = s.seen.get();
                for (int64_t q = q0; q < q1; ++q) {
                    s.unique.clear();
                    for (int64_t i = offsets[q]; i < offsets[q + 1]; ++i) {
                        const int32_t c = cand[i];
                        if (c >= 0 && !seen[c]) {
                            seen[c] = 1;
                            s.unique.push_back(c);
                        }
                    }
                    for (int32_t c : s.unique) seen[c] = 0;
                    s.top.reset(static_cast<size_t>(k));
                    s.scanner.scan(qs + q * d, base, s.unique.data(), static_cast<int64_t>(s.unique.size()), s.top);
                    out_nuniq[q] = static_cast<int32_t>(s.unique.size());
                    write_nearest(s.top, q, k, out_ids, out_dist);
                }
            });
        }
    }
    return py::make_tuple(ids_o, dist_o, nuniq_o);
}

}  // namespace jaxidx
