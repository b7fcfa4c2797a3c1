// merge_topk: accumulate the members of each query's routed buckets into
// per-item (score, hit count), relax the hit-count threshold, keep the top k.
// merge_candidates: the same hits and threshold, returning the whole candidate
// set per query (CSR) for exact re-ranking.
// merge_rerank_topk: merge_candidates and rerank_topk's ids form in one pass per
// query, so a query's candidates stay in cache instead of being written out.
// topk_rows: row-wise top k of a dense score matrix.
#include "scan.h"

namespace jaxidx {

namespace {

struct Slot {  // one per item, interleaved so a hit touches one cache line
    float score;
    int32_t count;
};

constexpr int32_t kPrefetchAhead = 64;  // members

struct Routed {  // one routed bucket of a query
    const int32_t* members;
    const float* weights;  // null when unweighted
    int32_t size;
    float score;
};

// Visits the members of a query's routed buckets in order, calling hit(cell, bucket, position) on each
// member's per-item cell; hit returns whether the cell was untouched, and such items are appended to
// touched (returns how many). Prefetching runs ahead: member lists (and weights) two buckets ahead,
// cells of the next bucket's first members, and cells kPrefetchAhead members ahead in this one.
template <bool kWeighted, class Cell, class Hit>
int64_t visit_hits(Cell* cells, int32_t* touched, const Routed* routed, int64_t n_routed, Hit hit) {
    auto prefetch_members = [&](int64_t i) {
        if (i >= n_routed) return;
        prefetch_bytes(routed[i].members, routed[i].size * sizeof(int32_t));
        if (kWeighted) prefetch_bytes(routed[i].weights, routed[i].size * sizeof(float));
    };
    prefetch_members(0);
    prefetch_members(1);
    int64_t n_touched = 0;
    for (int64_t i = 0; i < n_routed; ++i) {
        prefetch_members(i + 2);
        if (i + 1 < n_routed) {
            const Routed& next = routed[i + 1];
            for (int32_t p = 0; p < std::min(kPrefetchAhead, next.size); ++p) {
                __builtin_prefetch(cells + next.members[p], 1);
            }
        }
        const Routed& rb = routed[i];
        for (int32_t p = 0; p < rb.size; ++p) {
            if (p + kPrefetchAhead < rb.size) __builtin_prefetch(cells + rb.members[p + kPrefetchAhead], 1);
            if (hit(cells[rb.members[p]], rb, p)) touched[n_touched++] = rb.members[p];
        }
    }
    return n_touched;
}

// Adds each hit's bucket score (times its weight) to the item's slot: summed, or the max.
template <bool kWeighted, bool kMax>
int64_t add_hits(Slot* slots, int32_t* touched, const Routed* routed, int64_t n_routed) {
    return visit_hits<kWeighted>(slots, touched, routed, n_routed, [](Slot& sl, const Routed& rb, int32_t p) {
        const float c = kWeighted ? rb.score * rb.weights[p] : rb.score;
        const bool first = sl.count == 0;
        if (first && kMax) sl.score = c;
        if (!kMax) {
            sl.score += c;
        } else if (c > sl.score || std::isnan(c)) {  // max; NaN propagates
            sl.score = c;
        }
        ++sl.count;
        return first;
    });
}

using AddHitsFn = int64_t (*)(Slot*, int32_t*, const Routed*, int64_t);

// The hits of merge_candidates, which needs no scores: one saturating byte per item (an eighth of a
// Slot's cache footprint; exact while the threshold is at most 255).
int64_t add_counts(uint8_t* counts, int32_t* touched, const Routed* routed, int64_t n_routed) {
    return visit_hits<false>(counts, touched, routed, n_routed, [](uint8_t& c, const Routed&, int32_t) {
        const bool first = c == 0;
        c = static_cast<uint8_t>(c + (c != 255));
        return first;
    });
}

// The hit-count threshold: the largest t <= top_count that at least k touched items reach, else 1
// (one counting pass per t tried, from the top; top_count is min(min_count, R m), at most R in practice).
template <class CountOf>
int32_t hit_threshold(const int32_t* touched, int64_t n_touched, int64_t k, int32_t top_count, CountOf count_of) {
    for (int32_t t = top_count; t > 1 && n_touched >= k; --t) {
        int64_t reached = 0;
        for (int64_t i = 0; i < n_touched; ++i) reached += count_of(touched[i]) >= t;
        if (reached >= k) return t;
    }
    return 1;
}

// Appends the touched items that take_if accepts (it also zeroes their counts) to out in ascending
// id order: a sort when few pass, else one pass over a bitmap of n_items bits (bits zeroed as read).
template <class TakeIf>
void emit_candidates(uint64_t* bits, int64_t n_words, const int32_t* touched, int64_t n_touched, TakeIf take_if,
                     std::vector<int32_t>& out) {
    const size_t start = out.size();
    for (int64_t i = 0; i < n_touched; ++i) {
        if (take_if(touched[i])) out.push_back(touched[i]);
    }
    const int64_t n_pass = static_cast<int64_t>(out.size() - start);
    int64_t log2_pass = 1;
    while ((int64_t{1} << log2_pass) < n_pass) ++log2_pass;
    if (n_pass * log2_pass * 4 < n_words) {  // a sort's comparisons against a word scan
        std::sort(out.begin() + static_cast<std::ptrdiff_t>(start), out.end());
        return;
    }
    for (size_t i = start; i < out.size(); ++i) bits[out[i] >> 6] |= uint64_t{1} << (out[i] & 63);
    size_t o = start;
    for (int64_t w = 0; w < n_words; ++w) {
        for (uint64_t word = bits[w]; word; word &= word - 1) out[o++] = static_cast<int32_t>(w * 64 + __builtin_ctzll(word));
        bits[w] = 0;
    }
}

[[noreturn]] void bad_member(int64_t r, int64_t p, int32_t id, int64_t n_items) {
    fail("members", "id " + std::to_string(id) + " at [" + std::to_string(r) + ", " + std::to_string(p) +
                        "] out of range [0, n_items=" + (n_items >= 0 ? std::to_string(n_items) : std::string("inf")) +
                        ")");
}

}  // namespace

namespace {

// What merge_core returns per query: the top k items by summed (or max) bucket score; the candidate
// set as CSR in ascending id order (the order re-ranking scans the base in); or the candidate set
// re-ranked exactly against the query, without materialising it.
enum class Output { kRanked, kCandidates, kReranked };

struct Rerank {  // the exact re-rank of Output::kReranked
    const float* queries;  // [Q, d]
    const float* base;     // [n_items, d]: item ids are rows
    int64_t d;
    int metric;
};

// Shared by merge_topk, merge_candidates and merge_rerank_topk: validation, hit accumulation and the
// threshold. For kCandidates and kReranked, `k` is the number of candidates the threshold relaxes for
// (and, reranked, the number of rows returned). The options arrive checked; n_items < 0 means
// "max member id + 1".
py::tuple merge_core(const py::object& bucket_ids_o, const py::object& bucket_scores_o, const py::object& offsets_o,
                     const py::object& members_o, const py::object& weights_o, int64_t k, int64_t min_count,
                     bool agg_max, int64_t n_items, int64_t n_threads, Output output, const Rerank* rerank = nullptr) {
    const bool candidates_only = output != Output::kRanked;
    py::array bids_a = require_array<int32_t>(bucket_ids_o, "bucket_ids", 3);
    py::array bsc_a = require_array<float>(bucket_scores_o, "bucket_scores", 3);
    const int64_t Q = bids_a.shape(0), R = bids_a.shape(1), m = bids_a.shape(2);
    for (int ax = 0; ax < 3; ++ax) require_shape(bsc_a, "bucket_scores", ax, bids_a.shape(ax), "bucket_ids' shape");
    py::array off_a = require_array<int32_t>(offsets_o, "offsets", 2);
    require_shape(off_a, "offsets", 0, R, "R repetitions");
    if (off_a.shape(1) < 1) fail("offsets", "needs B + 1 >= 1 columns");
    const int64_t B = off_a.shape(1) - 1;
    py::array mem_a = require_array<int32_t>(members_o, "members", 2);
    require_shape(mem_a, "members", 0, R, "R repetitions");
    const int64_t M = mem_a.shape(1);
    py::array w_a;
    const bool weighted = !weights_o.is_none();
    if (weighted) {
        w_a = require_array<float>(weights_o, "weights", 2);
        require_shape(w_a, "weights", 0, R, "members' shape");
        require_shape(w_a, "weights", 1, M, "members' shape");
    }
    const int threads = resolve_threads(n_threads, Q);

    const int32_t* bids = data_of<int32_t>(bids_a);
    const float* bsc = data_of<float>(bsc_a);
    const int32_t* off = data_of<int32_t>(off_a);
    const int32_t* mem = data_of<int32_t>(mem_a);
    const float* w = weighted ? data_of<float>(w_a) : nullptr;

    const int64_t kk = output == Output::kCandidates ? 0 : k;  // ranked outputs are [Q, k]
    py::array_t<int32_t> ids_o({Q, kk}), counts_o({Q, kk}), ncand_o(Q);
    py::array_t<float> scores_o({Q, kk});
    py::array_t<int64_t> cand_offsets_o(Q + 1);
    std::vector<std::vector<int32_t>> cand_parts;  // per thread: candidates of its queries, in query order
    std::vector<std::vector<std::pair<int64_t, int64_t>>> cand_spans;  // per thread: (query, start in its part)
    int32_t* out_ids = ids_o.mutable_data();
    int32_t* out_counts = counts_o.mutable_data();
    int32_t* out_ncand = ncand_o.mutable_data();
    float* out_scores = scores_o.mutable_data();

    {
        py::gil_scoped_release release;
        // Without n_items every member is scanned for the largest id; with it, members are
        // checked where a query reads them, so a call costs nothing per unrouted bucket.
        const bool scan_members = n_items < 0;
        int64_t max_bucket = 0, max_member = -1;
        for (int64_t r = 0; r < R; ++r) {
            const int32_t* o = off + r * (B + 1);
            if (o[0] != 0) fail("offsets", "offsets[" + std::to_string(r) + ", 0] must be 0");
            for (int64_t b = 0; b < B; ++b) {
                if (o[b + 1] < o[b]) {
                    fail("offsets", "must be non-decreasing; offsets[" + std::to_string(r) + ", " +
                                        std::to_string(b + 1) + "] < offsets[" + std::to_string(r) + ", " +
                                        std::to_string(b) + "]");
                }
                max_bucket = std::max<int64_t>(max_bucket, o[b + 1] - o[b]);
            }
            if (o[B] > M) fail("offsets", "offsets[" + std::to_string(r) + ", B] exceeds members' length");
            if (!scan_members) continue;
            const int32_t* mr = mem + r * M;
            for (int64_t p = 0; p < o[B]; ++p) {
                if (mr[p] < 0) bad_member(r, p, mr[p], -1);
                max_member = std::max<int64_t>(max_member, mr[p]);
            }
        }
        if (n_items < 0) n_items = max_member + 1;
        // With n_items, the members of every routed bucket are checked once here, not per query.
        std::vector<uint8_t> routed_bucket(scan_members ? 0 : static_cast<size_t>(R * B), 0);
        for (int64_t i = 0; i < Q * R * m; ++i) {
            if (bids[i] < -1 || bids[i] >= B) {
                fail("bucket_ids", "id " + std::to_string(bids[i]) + " out of range [-1, B=" + std::to_string(B) +
                                       ")");
            }
            if (!scan_members && bids[i] >= 0) routed_bucket[(i / m) % R * B + bids[i]] = 1;
        }
        for (int64_t rb = 0; rb < static_cast<int64_t>(routed_bucket.size()); ++rb) {
            if (!routed_bucket[rb]) continue;
            const int64_t r = rb / B, b = rb % B;
            const int32_t* o = off + r * (B + 1);
            const int32_t* mr = mem + r * M;
            for (int32_t p = o[b]; p < o[b + 1]; ++p) {
                if (mr[p] < 0 || mr[p] >= n_items) bad_member(r, p, mr[p], n_items);
                max_member = std::max<int64_t>(max_member, mr[p]);
            }
        }
        // Per-item scratch covers the ids a query can touch: with n_items, the routed members' (a huge
        // n_items with few routed items then costs no memory per thread).
        const int64_t n_scratch = scan_members ? n_items : max_member + 1;

        const size_t max_hits = static_cast<size_t>(std::min<int64_t>(n_scratch, R * m * max_bucket));
        const int32_t top_count = static_cast<int32_t>(std::min<int64_t>(min_count, R * m));  // hits <= R m
        const AddHitsFn add_hits_fn = weighted ? (agg_max ? add_hits<true, true> : add_hits<true, false>)
                                               : (agg_max ? add_hits<false, true> : add_hits<false, false>);
        const bool byte_counts = candidates_only && top_count <= 255;
        const int64_t n_words = candidates_only ? (n_scratch + 63) / 64 : 0;
        struct Scratch {  // per thread: Slots for scores, else byte counts (Slots above 255) and a bitmap
            ZeroPool<Slot>::Lease slots;
            ZeroPool<uint8_t>::Lease counts;
            ZeroPool<uint64_t>::Lease bits;
            std::vector<int32_t> touched, cands;  // cands: one query's, when re-ranked
            std::vector<Routed> routed;
            TopK top{true}, nearest{false};
            std::unique_ptr<IdScanner> scanner;
            Scratch(size_t n, bool byte_counts, size_t n_words)
                : slots(byte_counts ? 0 : n), counts(byte_counts ? n : 0), bits(n_words) {}
        };
        std::vector<std::unique_ptr<Scratch>> scratch;
        for (int t = 0; t < threads; ++t) {
            scratch.emplace_back(new Scratch(static_cast<size_t>(n_scratch), byte_counts, static_cast<size_t>(n_words)));
            if (rerank) {
                scratch.back()->scanner.reset(new IdScanner(rerank->metric, rerank->d));
                scratch.back()->nearest.reserve(static_cast<size_t>(std::min<int64_t>(k, max_hits)));
            }
            scratch.back()->touched.resize(max_hits);
            scratch.back()->routed.resize(static_cast<size_t>(R * m));
            scratch.back()->top.reserve(static_cast<size_t>(std::min<int64_t>(k, max_hits)));
        }

        cand_parts.resize(threads);
        cand_spans.resize(threads);
        parallel_for(Q, threads, 16, [&](int t, int64_t q0, int64_t q1) {
            Scratch& s = *scratch[t];
            Slot* slots = s.slots.get();
            for (int64_t q = q0; q < q1; ++q) {
                int64_t n_routed = 0;
                for (int64_t r = 0; r < R; ++r) {
                    const int32_t* o = off + r * (B + 1);
                    for (int64_t j = 0; j < m; ++j) {
                        const int64_t idx = (q * R + r) * m + j;
                        const int32_t b = bids[idx];
                        if (b < 0) continue;
                        s.routed[n_routed++] = Routed{mem + r * M + o[b], weighted ? w + r * M + o[b] : nullptr,
                                                      o[b + 1] - o[b], bsc[idx]};
                    }
                }
                const int32_t* touched = s.touched.data();
                if (candidates_only) {
                    std::vector<int32_t>& part = rerank ? s.cands : cand_parts[t];
                    const size_t start = part.size();
                    if (byte_counts) {
                        uint8_t* counts = s.counts.get();
                        const int64_t n_touched = add_counts(counts, s.touched.data(), s.routed.data(), n_routed);
                        const int32_t thr = hit_threshold(touched, n_touched, k, top_count,
                                                          [&](int32_t it) { return int32_t{counts[it]}; });
                        emit_candidates(s.bits.get(), n_words, touched, n_touched, [&](int32_t it) {
                            const bool take = counts[it] >= thr;
                            counts[it] = 0;
                            return take;
                        }, part);
                    } else {  // a threshold above 255 hits: counted in Slots
                        const int64_t n_touched = add_hits_fn(slots, s.touched.data(), s.routed.data(), n_routed);
                        const int32_t thr = hit_threshold(touched, n_touched, k, top_count,
                                                          [&](int32_t it) { return slots[it].count; });
                        emit_candidates(s.bits.get(), n_words, touched, n_touched, [&](int32_t it) {
                            const bool take = slots[it].count >= thr;
                            slots[it] = Slot{0.0f, 0};
                            return take;
                        }, part);
                    }
                    out_ncand[q] = static_cast<int32_t>(part.size() - start);
                    if (!rerank) {
                        cand_spans[t].emplace_back(q, static_cast<int64_t>(start));
                        continue;
                    }
                    s.nearest.reset(static_cast<size_t>(k));
                    s.scanner->scan(rerank->queries + q * rerank->d, rerank->base, part.data(),
                                    static_cast<int64_t>(part.size()), s.nearest);
                    part.clear();
                    write_nearest(s.nearest, q, k, out_ids, out_scores);
                    continue;
                }
                const int64_t n_touched = add_hits_fn(slots, s.touched.data(), s.routed.data(), n_routed);
                const int32_t thr = hit_threshold(touched, n_touched, k, top_count,
                                                  [&](int32_t it) { return slots[it].count; });
                s.top.reset(static_cast<size_t>(k));
                int32_t n_cand = 0;
                for (int64_t i = 0; i < n_touched; ++i) {
                    const int32_t it = touched[i];
                    Slot& sl = slots[it];
                    if (sl.count >= thr) {
                        ++n_cand;
                        // -0.0 (possible under max) is reported as +0.0 by every backend.
                        s.top.push(sl.score == 0.0f ? 0.0f : sl.score, it, sl.count);
                    }
                    sl = Slot{0.0f, 0};
                }
                out_ncand[q] = n_cand;
                s.top.emit([&](size_t i, const Entry* e) {
                    out_ids[q * k + i] = e ? e->id() : -1;
                    out_scores[q * k + i] = e ? e->value : -INFINITY;
                    out_counts[q * k + i] = e ? e->aux : 0;
                });
            }
        });
    }
    if (output == Output::kRanked) return py::make_tuple(ids_o, scores_o, counts_o, ncand_o);
    if (output == Output::kReranked) return py::make_tuple(ids_o, scores_o, ncand_o);
    int64_t* cand_off = cand_offsets_o.mutable_data();
    cand_off[0] = 0;
    for (int64_t q = 0; q < Q; ++q) cand_off[q + 1] = cand_off[q] + out_ncand[q];
    py::array_t<int32_t> cand_ids_o(cand_off[Q]);
    int32_t* cand_ids = cand_ids_o.mutable_data();
    {
        py::gil_scoped_release release;
        for (size_t t = 0; t < cand_spans.size(); ++t) {
            for (const auto& [q, start] : cand_spans[t]) {
                std::copy_n(cand_parts[t].data() + start, out_ncand[q], cand_ids + cand_off[q]);
            }
        }
    }
    return py::make_tuple(cand_offsets_o, cand_ids_o, ncand_o);
}

int64_t require_n_items(const py::object& n_items) {
    if (n_items.is_none()) return -1;
    return require_int(n_items, "n_items", 0, kInt32Max + 1, "must be in [0, 2^31] (ids are int32) or None");
}

int64_t require_min_count(const py::object& min_count) {
    return require_int(min_count, "min_count", 1, kInt64Max, "must be >= 1");
}

}  // namespace

py::tuple merge_topk(const py::object& bucket_ids, const py::object& bucket_scores, const py::object& offsets,
                     const py::object& members, const py::object& weights, const py::object& k_o,
                     const py::object& min_count, const py::object& agg_o, const py::object& n_items,
                     const py::object& n_threads) {
    const int64_t k = require_k(k_o), mc = require_min_count(min_count), n = require_n_items(n_items);
    const std::string agg = require_str(agg_o, "agg");
    if (agg != "sum" && agg != "max") fail("agg", "must be 'sum' or 'max', got '" + agg + "'");
    return merge_core(bucket_ids, bucket_scores, offsets, members, weights, k, mc, agg == "max", n,
                      require_threads(n_threads), Output::kRanked);
}

py::tuple merge_candidates(const py::object& bucket_ids, const py::object& offsets, const py::object& members,
                           const py::object& min_count, const py::object& min_candidates, const py::object& n_items,
                           const py::object& n_threads) {
    const int64_t want = require_k(min_candidates, "min_candidates"), mc = require_min_count(min_count);
    const int64_t n = require_n_items(n_items), threads = require_threads(n_threads);
    // Scores do not matter for the candidate set: route with zeros of the right shape.
    py::array bids = require_array<int32_t>(bucket_ids, "bucket_ids", 3);
    py::array_t<float> zeros({bids.shape(0), bids.shape(1), bids.shape(2)});
    std::fill_n(zeros.mutable_data(), zeros.size(), 0.0f);
    return merge_core(bucket_ids, zeros, offsets, members, py::none(), want, mc, false, n, threads, Output::kCandidates);
}

py::tuple merge_rerank_topk(const py::object& queries_o, const py::object& base_o, const py::object& bucket_ids,
                            const py::object& offsets, const py::object& members, const py::object& k_o,
                            const py::object& min_count, const py::object& metric_o, const py::object& n_threads) {
    py::array q_a = require_array<float>(queries_o, "queries", 2);
    py::array x_a = require_array<float>(base_o, "base", 2);
    require_shape(x_a, "base", 1, q_a.shape(1), "queries' dimension");
    if (x_a.shape(0) > INT32_MAX) fail("base", "more than 2^31 - 1 rows");
    py::array bids = require_array<int32_t>(bucket_ids, "bucket_ids", 3);
    require_shape(bids, "bucket_ids", 0, q_a.shape(0), "one row per query");
    const int64_t k = require_k(k_o), mc = require_min_count(min_count), threads = require_threads(n_threads);
    const Rerank rerank{data_of<float>(q_a), data_of<float>(x_a), q_a.shape(1), require_metric(metric_o)};
    py::array_t<float> zeros({bids.shape(0), bids.shape(1), bids.shape(2)});
    std::fill_n(zeros.mutable_data(), zeros.size(), 0.0f);
    return merge_core(bids, zeros, offsets, members, py::none(), k, mc, false, x_a.shape(0), threads, Output::kReranked,
                      &rerank);
}

py::tuple topk_rows(const py::object& x_o, const py::object& k_o, const py::object& n_threads) {
    py::array x_a = require_array<float>(x_o, "x", 2);
    const int64_t k = require_k(k_o);
    const int64_t n = x_a.shape(0), c = x_a.shape(1);
    if (c > INT32_MAX) fail("x", "more than 2^31 - 1 columns");
    const int threads = resolve_threads(require_threads(n_threads), n);
    const float* x = data_of<float>(x_a);
    py::array_t<int32_t> idx_o({n, k});
    py::array_t<float> vals_o({n, k});
    int32_t* out_idx = idx_o.mutable_data();
    float* out_vals = vals_o.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<TopK> tops(threads, TopK(true));
        for (auto& top : tops) top.reserve(static_cast<size_t>(std::min(k, c)));
        parallel_for(n, threads, 64, [&](int t, int64_t r0, int64_t r1) {
            TopK& top = tops[t];
            for (int64_t r = r0; r < r1; ++r) {
                top.reset(static_cast<size_t>(k));
                const float* row = x + r * c;
                for (int64_t i = 0; i < c; ++i) top.push(row[i], static_cast<int32_t>(i));
                write_top(top, r, k, out_idx, out_vals, -INFINITY);
            }
        });
    }
    return py::make_tuple(idx_o, vals_o);
}

}  // namespace jaxidx
