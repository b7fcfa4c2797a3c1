// pq4_search: each query's probed leaves scored from 4-bit product-quantization codes (fast scan), the
// `reorder` best rows by that approximate score re-ranked exactly on the float rows, the k nearest kept.
//
// Layout (built by jaxidx/pq4.py): leaf b's rows are row_offsets[b]..row_offsets[b+1] of `base`, and its
// codes fill blocks block_offsets[b]..block_offsets[b+1] of `codes` [n_blocks, M2, 32]: block j, pair p,
// byte v holds row 32 j + v's code of sub-space 2p in the low nibble and of 2p + 1 in the high nibble
// (rows past the leaf's end are padding, never reported).
//
// Scores (the contract of jaxidx/search/reference.py, pq4_search): per query one float table lut[m][j]
// over sub-spaces m and centroids j, quantized to bytes qlut = min(255, rint((lut - min_m) * scale))
// with one scale; a row's approximate value is float(sum_m qlut[m][code_m]) * step + bias (step = 1 / scale
// in float32: a multiply per row, not a division), where bias is
// the sum of the minima plus, with residual codes (row = c_b + r), a leaf term (reduced as the exact
// distances of rerank_topk): -q.c_b for inner products; for l2, ||q - c_b||^2, with the table of
// -(2q).centroid and the row's `row_terms` entry e = 2 c_b.r + ||r||^2 added to its value
// (||q - c_b - r||^2 expanded), so no table is built per leaf:
// a table per leaf costs 16 M entries, more than scanning a small leaf of long rows (10x slower on
// 1836-d rows in leaves of 76), at the same recall. The sum is an exact integer (at most 65535 by the
// choice of scale), so the SIMD kernel (byte shuffles, 16-bit lanes) and the portable loop agree
// exactly. The `reorder` rows of smallest (approximate value, row) are re-ranked with the exact distance
// of rerank_topk; ids returned are rows of `base`.
//
// With row_ids (codes of the rows themselves, no centres), row_offsets count slots instead of rows: leaf
// b's slots are row_offsets[b]..row_offsets[b+1], slot s holds base row row_ids[s], and a row may fill
// slots of several leaves (IRLI: one leaf per repetition and bucket), every copy with the same codes. A
// row is offered to the top once per query (a stamp per row), so the result is that of scoring each
// distinct probed row once; n_candidates counts the slots scanned.

#include "code_scan.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JAXIDX_X86 1
#endif

namespace jaxidx {

namespace {

constexpr int64_t kBlockRows = 32;
constexpr int kCentroids = 16;

// Byte offset of sub-space m's 32 table bytes: the tables come in groups of four per two sub-space pairs
// (pairs 2g, 2g + 1: low-nibble tables of both, then high-nibble tables of both), so one 64-byte load
// gives an AVX-512 register the low (or high) tables of two pairs, whose codes are 64 contiguous bytes.
inline int64_t table_offset(int64_t m) {
    const int64_t p = m >> 1;
    return ((p >> 1) * 4 + (m & 1) * 2 + (p & 1)) * 32;
}

// The quantized table of one query (and leaf): each sub-space's 16 bytes stored twice (both 128-bit
// lanes of an AVX2 register) at table_offset, and what turns a byte sum back into a value.
struct QuantTable {
    std::vector<uint8_t> bytes;  // [ceil(M2 / 2)][4][32], zero past the last sub-space
    float scale = 1.0f, bias = 0.0f;
    std::vector<float> mins;  // scratch: each sub-space's smallest entry
};

// lut[m * 16 + j]: inner products are negated (smaller = nearer). t is the query (2q for l2 with residual
// codes, scored as an inner product) zero-padded to M * dsub; cbt the codebooks transposed to
// [M][dsub][16], so the 16 centroids are the inner (vectorised) loop. Terms in increasing dimension order, float32, no fused
// multiply-add (as the reference).
void build_lut(int metric, const float* t, const float* cbt, int64_t M, int64_t dsub, float* lut) {
    for (int64_t m = 0; m < M; ++m) {
        float acc[kCentroids] = {};
        for (int64_t i = 0; i < dsub; ++i) {
            const float ti = t[m * dsub + i];
            const float* c = cbt + (m * dsub + i) * kCentroids;
            if (metric == kL2) {
                for (int j = 0; j < kCentroids; ++j) {
                    const float diff = ti - c[j];
                    acc[j] += diff * diff;
                }
            } else {
                for (int j = 0; j < kCentroids; ++j) acc[j] += ti * c[j];
            }
        }
        for (int j = 0; j < kCentroids; ++j) lut[m * kCentroids + j] = metric == kL2 ? acc[j] : -acc[j];
    }
}

// The query (times 2 when `twice`) zero-padded to M * dsub entries, into t.
inline void table_input(const float* q, bool twice, int64_t d, float* t) {
    for (int64_t i = 0; i < d; ++i) t[i] = twice ? 2.0f * q[i] : q[i];
}

void quantize_lut(const float* lut, int64_t M, QuantTable& t) {
    const int64_t M2 = (M + 1) / 2;
    t.bytes.assign(static_cast<size_t>((M2 + 1) / 2 * 128), 0);
    std::vector<float>& mins = t.mins;
    mins.resize(static_cast<size_t>(M));
    float max_range = 0.0f, sum_range = 0.0f, bias = 0.0f;
    for (int64_t m = 0; m < M; ++m) {
        const float* row = lut + m * kCentroids;
        const float lo = *std::min_element(row, row + kCentroids), hi = *std::max_element(row, row + kCentroids);
        mins[m] = lo;
        max_range = std::max(max_range, hi - lo);
        sum_range += hi - lo;
        bias += lo;
    }
    t.scale = max_range > 0.0f ? std::min(255.0f / max_range, (65535.0f - static_cast<float>(M)) / sum_range) : 1.0f;
    t.bias = bias;
    for (int64_t m = 0; m < M; ++m) {
        uint8_t* out = t.bytes.data() + table_offset(m);
        for (int j = 0; j < kCentroids; ++j) {
            // Round half to even without a libm call: exact for 0 <= x < 2^23 (x is at most about 255).
            const float x = (lut[m * kCentroids + j] - mins[m]) * t.scale;
            const float v = std::min(255.0f, (x + 8388608.0f) - 8388608.0f);
            out[j] = out[j + 16] = static_cast<uint8_t>(v);
        }
    }
}

// Largest byte sum that can still enter a top whose worst kept value is `bound`: one unit above the
// exact cut, so float rounding never drops a row the top would keep (the top decides on the value).
// -1: no row of this table can enter.
inline int64_t sum_threshold(float bound, float scale, float bias) {
    if (!(bound < INFINITY)) return 65535;
    const float y = (bound - bias) * scale;
    if (std::isnan(y)) return 65535;
    if (y < -1.0f) return -1;
    return std::min<int64_t>(65535, static_cast<int64_t>(std::floor(y)) + 1);
}

// Byte sums of one block's 32 rows, portable: sums[v] for row v.
void block_sums_portable(const uint8_t* block, int64_t M2, const uint8_t* table, uint32_t* sums) {
    for (int v = 0; v < kBlockRows; ++v) sums[v] = 0;
    for (int64_t p = 0; p < M2; ++p) {
        const uint8_t* codes = block + p * 32;
        const uint8_t* lo = table + table_offset(2 * p);
        const uint8_t* hi = table + table_offset(2 * p + 1);
        for (int v = 0; v < kBlockRows; ++v) sums[v] += lo[codes[v] & 15] + hi[codes[v] >> 4];
    }
}

// The first n_rows rows of a leaf's blocks (rows first, first + 1, ...) into `top`, with the table's
// bytes, scale and bias, and each row's term (terms[v] for row first + v) added when terms is given.
using BlockScanFn = void (*)(const uint8_t* blocks, int64_t n_rows, int64_t M2, const uint8_t* table, float scale,
                             float bias, const float* terms, int32_t first, Reservoir& top);

void scan_blocks_portable(const uint8_t* blocks, int64_t n_rows, int64_t M2, const uint8_t* table, float scale,
                          float bias, const float* terms, int32_t first, Reservoir& top) {
    const float step = 1.0f / scale;
    uint32_t sums[kBlockRows];
    for (int64_t b = 0; b * kBlockRows < n_rows; ++b) {
        const int64_t thr = terms ? 65535 : sum_threshold(top.bound(), scale, bias);
        if (thr < 0) return;
        block_sums_portable(blocks + b * M2 * 32, M2, table, sums);
        const int64_t valid = std::min(kBlockRows, n_rows - b * kBlockRows);
        for (int64_t v = 0; v < valid; ++v) {
            const int64_t row = b * kBlockRows + v;
            if (sums[v] > thr) continue;
            const float value = static_cast<float>(sums[v]) * step + bias;
            if (!terms) {
                top.push(value, first + static_cast<int32_t>(row));
            } else if (!(value + terms[row] > top.bound())) {
                top.push(value + terms[row], first + static_cast<int32_t>(row));
            }
        }
    }
}

#ifdef JAXIDX_X86
// Byte sums of NB consecutive blocks (sharing the table loads): each pair of sub-spaces is one 32-byte load
// of codes, two nibble masks and two shuffles per block; bytes are summed in 16-bit lanes, a lane holding
// rows 2i (low byte) and 2i + 1 (high byte): `all` sums both (low + 256 high, modulo 2^16), `odd` the
// high bytes alone, so the even rows' sums are all - 256 odd, exact because every sum is below 2^16.
template <int NB>
__attribute__((target("avx2"))) inline void block_sums_avx2(const uint8_t* block, int64_t M2, const uint8_t* table,
                                                            __m256i* even, __m256i* odd) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i all[NB], hi[NB];  // locals: the outputs may alias the tables (char pointers), so no spills per step
    for (int i = 0; i < NB; ++i) all[i] = hi[i] = _mm256_setzero_si256();
    for (int64_t p = 0; p < M2; ++p) {
        const __m256i lut_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + table_offset(2 * p)));
        const __m256i lut_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + table_offset(2 * p + 1)));
        for (int i = 0; i < NB; ++i) {
            const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + (i * M2 + p) * 32));
            const __m256i r0 = _mm256_shuffle_epi8(lut_lo, _mm256_and_si256(c, low4));
            const __m256i r1 = _mm256_shuffle_epi8(lut_hi, _mm256_and_si256(_mm256_srli_epi16(c, 4), low4));
            all[i] = _mm256_add_epi16(all[i], _mm256_add_epi16(r0, r1));
            hi[i] = _mm256_add_epi16(hi[i], _mm256_add_epi16(_mm256_srli_epi16(r0, 8), _mm256_srli_epi16(r1, 8)));
        }
    }
    for (int i = 0; i < NB; ++i) {
        even[i] = _mm256_sub_epi16(all[i], _mm256_slli_epi16(hi[i], 8));
        odd[i] = hi[i];
    }
}

// Offers the rows of one block (first `valid` of 32) whose sum is at most thr; with terms (the block's 32
// rows' terms, valid of them real), the rows whose value plus term is not above the top's bound.
__attribute__((target("avx2"))) inline void offer_block_avx2(__m256i even, __m256i odd, int64_t thr, int64_t valid,
                                                             float step, float bias, const float* terms,
                                                             int32_t first, Reservoir& top) {
    const __m256i tv = _mm256_set1_epi16(static_cast<int16_t>(static_cast<uint16_t>(thr)));
    const uint32_t me = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_min_epu16(even, tv), even)));
    const uint32_t mo = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi16(_mm256_min_epu16(odd, tv), odd)));
    uint32_t pass = (me & 0x55555555u) | ((mo & 0x55555555u) << 1);  // bit v: row v's sum <= thr
    if (valid < kBlockRows) pass &= (uint32_t{1} << valid) - 1;
    if (!pass) return;
    if (!terms) {  // the passing rows alone (a few per block once the top fills): a conversion and a multiply each
        alignas(32) uint16_t sums[2][16];  // [row parity][row / 2]
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums[0]), even);
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums[1]), odd);
        for (; pass; pass &= pass - 1) {
            const int v = __builtin_ctz(pass);
            top.push(static_cast<float>(sums[v & 1][v >> 1]) * step + bias, first + v);
        }
        return;
    }
    // With terms every row's value + term is compared with the bound: the 32 values at once (the same IEEE
    // operations per lane as the scalar float(s) * step + bias + term). Lane i of half h of a parity's sums
    // is row 2 (8 h + i) + parity.
    alignas(32) float values[2][16];  // [row parity][row / 2]
    const __m256 sc = _mm256_set1_ps(step), bi = _mm256_set1_ps(bias);
    const __m256i sums[2] = {even, odd};
    const __m256 bound = _mm256_set1_ps(top.bound());
    uint32_t below = 0;  // bit v: row v's value + term is not above the bound
    for (int parity = 0; parity < 2; ++parity) {
        for (int half = 0; half < 2; ++half) {
            const __m128i s16 = half ? _mm256_extracti128_si256(sums[parity], 1) : _mm256_castsi256_si128(sums[parity]);
            const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(s16));
            // Terms of rows 16 h + 2 i + parity, i = 0..7: de-interleave two loads of 8.
            const __m256 t0 = _mm256_loadu_ps(terms + 16 * half), t1 = _mm256_loadu_ps(terms + 16 * half + 8);
            const __m256 mixed = parity ? _mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 1, 3, 1))
                                        : _mm256_shuffle_ps(t0, t1, _MM_SHUFFLE(2, 0, 2, 0));
            const __m256 value = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(f, sc), bi),
                                               _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(mixed),
                                                                                      _MM_SHUFFLE(3, 1, 2, 0))));
            const uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(value, bound, _CMP_NGT_UQ)));
            for (int i = 0; i < 8; ++i) below |= ((m >> i) & 1u) << (2 * (8 * half + i) + parity);
            _mm256_store_ps(values[parity] + 8 * half, value);
        }
    }
    pass &= below;
    for (; pass; pass &= pass - 1) {
        const int v = __builtin_ctz(pass);
        top.push(values[v & 1][v >> 1], first + v);
    }
}

// Byte sums of NB consecutive blocks with AVX-512: one 64-byte load holds the codes of two sub-space pairs
// (contiguous in a block), one shuffle looks both up in their tables (table_offset's grouping), so a pair
// costs half the instructions of the AVX2 loop; the two 256-bit halves are added at the end, giving the
// AVX2 loop's lanes (all / odd as there, so the same exact sums). With an odd number of pairs the last
// load is masked to its 32 bytes and the table past it is zero.
template <int NB>
__attribute__((target("avx512bw"))) inline void block_sums_avx512(const uint8_t* block, int64_t M2, const uint8_t* table,
                                                                  __m256i* even, __m256i* odd) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i all[NB], hi[NB];
    for (int i = 0; i < NB; ++i) all[i] = hi[i] = _mm512_setzero_si512();
    for (int64_t p = 0; p < M2; p += 2) {
        const __m512i lut_lo = _mm512_loadu_si512(table + p * 64);  // table_offset(2p) = 64 p for even p
        const __m512i lut_hi = _mm512_loadu_si512(table + p * 64 + 64);
        const __mmask64 load = p + 1 < M2 ? ~__mmask64{0} : __mmask64{0xFFFFFFFFu};
        for (int i = 0; i < NB; ++i) {
            const __m512i c = _mm512_maskz_loadu_epi8(load, block + (i * M2 + p) * 32);
            const __m512i r0 = _mm512_shuffle_epi8(lut_lo, _mm512_and_si512(c, low4));
            const __m512i r1 = _mm512_shuffle_epi8(lut_hi, _mm512_and_si512(_mm512_srli_epi16(c, 4), low4));
            all[i] = _mm512_add_epi16(all[i], _mm512_add_epi16(r0, r1));
            hi[i] = _mm512_add_epi16(hi[i], _mm512_add_epi16(_mm512_srli_epi16(r0, 8), _mm512_srli_epi16(r1, 8)));
        }
    }
    // The halves by masked extracts: GCC 12 (-Wall) warns on the undefined source inside the cast and the
    // unmasked extract.
    for (int i = 0; i < NB; ++i) {
        const __m256i a = _mm256_add_epi16(_mm512_maskz_extracti64x4_epi64(0xF, all[i], 0),
                                           _mm512_maskz_extracti64x4_epi64(0xF, all[i], 1));
        const __m256i h = _mm256_add_epi16(_mm512_maskz_extracti64x4_epi64(0xF, hi[i], 0),
                                           _mm512_maskz_extracti64x4_epi64(0xF, hi[i], 1));
        even[i] = _mm256_sub_epi16(a, _mm256_slli_epi16(h, 8));
        odd[i] = h;
    }
}

// Sums of up to kGroupBlocks consecutive blocks (two at a time: the table loads are shared and the chains
// independent) into even / odd.
constexpr int64_t kGroupBlocks = 8;
using GroupSumsFn = void (*)(const uint8_t* blocks, int64_t n_blocks, int64_t M2, const uint8_t* table,
                             __m256i* even, __m256i* odd);

__attribute__((target("avx2"))) inline void group_sums_avx2(const uint8_t* blocks, int64_t n_blocks, int64_t M2,
                                                            const uint8_t* table, __m256i* even, __m256i* odd) {
    int64_t i = 0;
    for (; i + 2 <= n_blocks; i += 2) block_sums_avx2<2>(blocks + i * M2 * 32, M2, table, even + i, odd + i);
    if (i < n_blocks) block_sums_avx2<1>(blocks + i * M2 * 32, M2, table, even + i, odd + i);
}

// The AVX-512 sums behind a call (not inlined into the AVX2 loop below), once per kGroupBlocks blocks.
__attribute__((target("avx512bw"))) void group_sums_avx512(const uint8_t* blocks, int64_t n_blocks, int64_t M2,
                                                           const uint8_t* table, __m256i* even, __m256i* odd) {
    int64_t i = 0;
    for (; i + 2 <= n_blocks; i += 2) block_sums_avx512<2>(blocks + i * M2 * 32, M2, table, even + i, odd + i);
    if (i < n_blocks) block_sums_avx512<1>(blocks + i * M2 * 32, M2, table, even + i, odd + i);
}

template <GroupSumsFn Sums>
__attribute__((target("avx2"))) void scan_blocks_simd(const uint8_t* blocks, int64_t n_rows, int64_t M2,
                                                      const uint8_t* table, float scale, float bias,
                                                      const float* terms, int32_t first, Reservoir& top) {
    __m256i even[kGroupBlocks], odd[kGroupBlocks];
    float tail[kBlockRows];
    const float step = 1.0f / scale;
    const int64_t n_blocks = (n_rows + kBlockRows - 1) / kBlockRows;
    // The sum threshold follows the top's bound, which moves only when the top is cut; false: no further row
    // of this leaf can enter.
    float bound = top.bound();
    int64_t thr = terms ? 65535 : sum_threshold(bound, scale, bias);
    const auto open = [&] {
        if (!terms && !(top.bound() == bound)) {
            bound = top.bound();
            thr = sum_threshold(bound, scale, bias);
        }
        return thr >= 0;
    };
    for (int64_t b = 0; b < n_blocks && open(); b += kGroupBlocks) {
        const int64_t group = std::min(kGroupBlocks, n_blocks - b);
        Sums(blocks + b * M2 * 32, group, M2, table, even, odd);
        for (int64_t i = 0; i < group; ++i) {
            if (!open()) return;
            const int64_t valid = std::min(kBlockRows, n_rows - (b + i) * kBlockRows);
            const float* block_terms = terms ? terms + (b + i) * kBlockRows : nullptr;
            if (terms && valid < kBlockRows) {  // the leaf's last block: its terms, zero past its end (not read beyond)
                std::fill(std::copy(block_terms, block_terms + valid, tail), tail + kBlockRows, 0.0f);
                block_terms = tail;
            }
            offer_block_avx2(even[i], odd[i], thr, valid, step, bias, block_terms,
                             first + static_cast<int32_t>((b + i) * kBlockRows), top);
        }
    }
}

#endif

BlockScanFn pick_block_scan() {
#ifdef JAXIDX_X86
    if (use_avx512bw()) return scan_blocks_simd<group_sums_avx512>;
    if (use_avx2()) return scan_blocks_simd<group_sums_avx2>;
#endif
    return scan_blocks_portable;
}

}  // namespace

py::tuple pq4_search(const py::object& queries_o, const py::object& base_o, const py::object& codes_o,
                     const py::object& codebooks_o, const py::object& centres_o, const py::object& row_offsets_o,
                     const py::object& block_offsets_o, const py::object& leaves_o, const py::object& lens_o,
                     const py::object& reorder_o, const py::object& k_o, const py::object& metric_o,
                     const py::object& n_threads, const py::object& row_terms_o, const py::object& row_ids_o) {
    const LeafScanArgs a(queries_o, base_o, row_offsets_o, leaves_o, lens_o, reorder_o, k_o, metric_o, n_threads);
    const int64_t Q = a.Q, d = a.d, N = a.N, L = a.L, P = a.P, k = a.k, reorder = a.reorder;
    const int metric = a.metric;
    py::array c_a = require_array<uint8_t>(codes_o, "codes", 3);
    py::array cb_a = require_array<float>(codebooks_o, "codebooks", 3);
    py::array bo_a = require_array<int32_t>(block_offsets_o, "block_offsets", 1);
    const int64_t M = cb_a.shape(0), dsub = cb_a.shape(2), M2 = (M + 1) / 2;
    require_shape(cb_a, "codebooks", 1, kCentroids, "16 centroids per sub-space (4-bit codes)");
    if (M < 1 || dsub < 1 || M * dsub < d || (M - 1) * dsub >= d) {
        fail("codebooks", "shape [M, 16, dsub] must cover the " + std::to_string(d) + " dimensions with M = ceil(d / dsub)");
    }
    if (M > 65000) fail("codebooks", "more than 65000 sub-spaces");
    require_shape(c_a, "codes", 1, M2, "ceil(M / 2) sub-space pairs");
    require_shape(c_a, "codes", 2, kBlockRows, "32 rows per block");
    require_shape(bo_a, "block_offsets", 0, L + 1, "one entry per row_offsets entry");
    const float* centres = nullptr;
    if (!centres_o.is_none()) {
        py::array ce_a = require_array<float>(centres_o, "centres", 2);
        require_shape(ce_a, "centres", 0, L, "one centre per leaf");
        require_shape(ce_a, "centres", 1, d, "queries' dimension");
        centres = data_of<float>(ce_a);
    }
    const float* row_terms = nullptr;
    if (!row_terms_o.is_none()) {
        py::array rt_a = require_array<float>(row_terms_o, "row_terms", 1);
        require_shape(rt_a, "row_terms", 0, N, "one term per base row");
        row_terms = data_of<float>(rt_a);
    }
    const int32_t* row_ids = nullptr;
    int64_t n_slots = N;
    if (!row_ids_o.is_none()) {
        py::array ri_a = require_array<int32_t>(row_ids_o, "row_ids", 1);
        if (centres) fail("row_ids", "only with codes of the rows themselves (centres None)");
        row_ids = data_of<int32_t>(ri_a);
        n_slots = ri_a.shape(0);
        if (n_slots > kInt32Max) fail("row_ids", "more than 2^31 - 1 slots");
    }
    if (row_terms && (metric != kL2 || !centres)) fail("row_terms", "only for l2 with residual codes (centres given)");
    if (!row_terms && metric == kL2 && centres) fail("row_terms", "required for l2 with residual codes (pq4.row_terms)");
    const int32_t* rows = data_of<int32_t>(a.row_offsets);
    const int32_t* blocks = data_of<int32_t>(bo_a);
    const int32_t* leaves = data_of<int32_t>(a.leaves);
    const int32_t* lens = data_of<int32_t>(a.lens);
    const int64_t n_blocks = c_a.shape(0);
    const float* qs = data_of<float>(a.queries);
    const float* base = data_of<float>(a.base);
    const uint8_t* codes = data_of<uint8_t>(c_a);
    const float* codebooks = data_of<float>(cb_a);
    NearestOutputs out(Q, k);
    {
        py::gil_scoped_release release;
        check_leaf_offsets(rows, L, n_slots, row_ids ? "row_ids entries" : "base rows");
        if (blocks[0] != 0) fail("block_offsets", "must start at 0");
        for (int64_t b = 0; b < L; ++b) {
            const int64_t size = int64_t{rows[b + 1]} - rows[b];
            if (int64_t{blocks[b + 1]} - blocks[b] != (size + kBlockRows - 1) / kBlockRows) {
                fail("block_offsets", "leaf " + std::to_string(b) + " has " + std::to_string(size) + " rows but " +
                                          std::to_string(int64_t{blocks[b + 1]} - blocks[b]) + " blocks (expected ceil(rows / 32))");
            }
        }
        if (blocks[L] != n_blocks) fail("block_offsets", "last entry " + std::to_string(blocks[L]) + " != codes blocks " +
                                                             std::to_string(n_blocks));
        std::vector<char> checked(row_ids ? static_cast<size_t>(L) : 0, 0);  // leaves whose row_ids are checked
        check_probes(rows, L, leaves, lens, Q, P, [&](int32_t b) {
            if (!row_ids || checked[b]) return;  // the slots of probed leaves only: a single query checks its own
            checked[b] = 1;
            for (int64_t s = rows[b]; s < rows[b + 1]; ++s) {
                if (row_ids[s] < 0 || row_ids[s] >= N) {
                    fail("row_ids", "entry " + std::to_string(s) + " is " + std::to_string(row_ids[s]) +
                                        ", outside [0, " + std::to_string(N) + ")");
                }
            }
        });
        const BlockScanFn scan_blocks = pick_block_scan();
        std::vector<float> cbt(static_cast<size_t>(M * dsub * kCentroids));  // codebooks as [M][dsub][16]
        for (int64_t m = 0; m < M; ++m) {
            for (int j = 0; j < kCentroids; ++j) {
                for (int64_t i = 0; i < dsub; ++i) cbt[(m * dsub + i) * kCentroids + j] = codebooks[(m * kCentroids + j) * dsub + i];
            }
        }
        parallel_for(Q, a.threads, 16, [&](int, int64_t q0, int64_t q1) {
            std::vector<float> lut(static_cast<size_t>(M * kCentroids)), t(static_cast<size_t>(M * dsub), 0.0f);
            QuantTable table;
            Reservoir approx;
            TopK exact(false);
            exact.reserve(static_cast<size_t>(k));
            IdScanner scanner(metric, d);
            std::vector<int32_t> best, stamp(row_ids ? static_cast<size_t>(N) : 0, -1);
            approx.map_slots(row_ids, stamp.data());
            for (int64_t q = q0; q < q1; ++q) {
                const float* qv = qs + q * d;
                table_input(qv, row_terms, d, t.data());
                build_lut(row_terms ? kIP : metric, t.data(), cbt.data(), M, dsub, lut.data());
                quantize_lut(lut.data(), M, table);
                approx.reset(static_cast<size_t>(reorder), static_cast<int32_t>(q));
                int64_t n_cand = 0;
                for (int64_t p = 0; p < P; ++p) {
                    const int32_t b = leaves[q * P + p], n = lens[q * P + p];
                    if (b < 0 || n == 0) continue;
                    // Residual codes: inner products -q.(c_b + r) = -q.c_b + the table's value of r; l2
                    // ||q - c_b||^2 + the table's value of r (-2q.r) + the row's term. The leaf's term in the
                    // canonical lane order (vectorised: a sequential sum over d would cost more than the scan).
                    const float bias = centres ? table.bias + exact_distance(metric, qv, centres + b * d, d)
                                               : table.bias;
                    scan_blocks(codes + int64_t{blocks[b]} * M2 * 32, n, M2, table.bytes.data(), table.scale, bias,
                                row_terms ? row_terms + rows[b] : nullptr, rows[b], approx);
                    n_cand += n;
                }
                approx.rows(best);  // the exact top-k does not depend on the order (ties by row)
                exact.reset(static_cast<size_t>(k));
                scanner.scan(qv, base, best.data(), static_cast<int64_t>(best.size()), exact);
                write_nearest(exact, q, k, out.ids_out, out.dist_out);
                out.n_cand_out[q] = static_cast<int32_t>(std::min<int64_t>(n_cand, kInt32Max));
            }
        });
    }
    return out.tuple();
}

}  // namespace jaxidx
