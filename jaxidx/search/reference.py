"""NumPy reference of the search kernels: the specification, made executable.

`host` (C++) and `device` (JAX) must return exactly what these functions
return; they are written for clarity, not speed. The rules they pin down:

* ids are int32, scores float32, -1 pads a missing id; ties are broken by the
  smaller id; NaN ranks after every number; a zero score or distance is
  reported as +0.0.
* merge_topk sums a query's hits in the order repetition, routed slot, member
  position (float32, starting from +0.0), or takes their max.
* Distances reduce over the dimension in one canonical order (`lane_sum`):
  eight lanes, lane l summing the terms i = l, l+8, ... in turn, combined as
  ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)). This is what an 8-wide SIMD loop
  does, so the C++ kernel keeps its speed and still matches bit for bit.
* Arguments are checked as the C++ kernel checks them (exact dtypes, C order,
  id ranges); a bad one raises ValueError naming it.
"""
import numpy as np

__all__ = ["merge_topk", "rerank_topk", "topk_rows", "tree_beam", "balanced_assign", "lane_sum", "distances", "pq4_search", "sq8_search",
           "pq4_table"]

_METRICS = ("ip", "cosine", "l2")


# --- argument checks (shared with device.py for the static options) ----------


def check_array(x, name, dtype, ndim):
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if x.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {x.ndim}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")


def check_axis(x, name, axis, expected, what):
    if x.shape[axis] != expected:
        raise ValueError(f"{name}: axis {axis} has length {x.shape[axis]}, expected {expected} ({what})")


def check_options(k=None, min_count=None, agg=None, metric=None, n_threads=0):
    if k is not None and k <= 0:
        raise ValueError(f"k: must be > 0, got {k}")
    if min_count is not None and min_count < 1:
        raise ValueError(f"min_count: must be >= 1, got {min_count}")
    if agg is not None and agg not in ("sum", "max"):
        raise ValueError(f"agg: must be 'sum' or 'max', got {agg!r}")
    if metric is not None and metric not in _METRICS:
        raise ValueError(f"metric: must be 'ip', 'cosine' or 'l2', got {metric!r}")
    if n_threads < 0:
        raise ValueError("n_threads: must be >= 0 (0 = all hardware threads)")


def _check_range(values, name, lo, hi):
    bad = (values < lo) | (values >= hi)
    if bad.any():
        raise ValueError(f"{name}: id {values[bad][0]} out of range [{lo}, {hi})")


def _check_csr(offsets, name, length):
    """offsets [..., n + 1]: starts at 0, non-decreasing, ends within `length`."""
    if (offsets[..., 0] != 0).any():
        raise ValueError(f"{name}: must start at 0")
    if (np.diff(offsets, axis=-1) < 0).any():
        raise ValueError(f"{name}: must be non-decreasing")
    if (offsets[..., -1] > length).any():
        raise ValueError(f"{name}: last offset exceeds the length of the id array")


# --- ranking ------------------------------------------------------------------


def _zero_to_plus(x):
    return np.where(x == 0, np.float32(0), x).astype(np.float32)


def _rank(keys, ids, descending):
    """Positions of `keys` best first: by key (NaN last), then by smaller id."""
    nan = np.isnan(keys)
    primary = np.where(nan, np.float32(0), -keys if descending else keys)
    return np.lexsort((ids, _zero_to_plus(primary), nan), axis=-1)


def _threshold(count, k, min_count):
    """Largest t <= min_count that at least k items reach, else 1; the same t as
    `t = min_count; while t > 1 and (count >= t).sum() < k: t -= 1`."""
    if len(count) < k:
        return 1
    kth_largest = np.partition(count, len(count) - k)[len(count) - k]
    return max(1, min(min_count, int(kth_largest)))


def lane_sum(terms):
    """Sum float32 `terms` [..., d] over the last axis in the canonical order."""
    d = terms.shape[-1]
    acc = np.zeros(terms.shape[:-1] + (8,), np.float32)
    for c in range(0, d, 8):
        chunk = terms[..., c : c + 8]
        acc[..., : chunk.shape[-1]] += chunk
    pairs = acc[..., :4] + acc[..., 4:]
    pairs = pairs[..., :2] + pairs[..., 2:]
    return pairs[..., 0] + pairs[..., 1]


# --- kernels ------------------------------------------------------------------


def _accumulate(bucket_ids, bucket_scores, offsets, members, weights, agg):
    """One query's hits, reduced per item: (sorted unique items, hit counts, scores)."""
    R, m = bucket_ids.shape
    routed = bucket_ids >= 0  # boolean mask in (r, j) order = hit order
    r_slot = np.broadcast_to(np.arange(R)[:, None], (R, m))[routed]
    b_slot, s_slot = bucket_ids[routed], bucket_scores[routed]
    start = offsets[r_slot, b_slot]
    size = offsets[r_slot, b_slot + 1] - start
    r_hit = np.repeat(r_slot, size)
    pos = np.repeat(start - (np.cumsum(size) - size), size) + np.arange(size.sum())
    item = members[r_hit, pos]
    contrib = np.repeat(s_slot, size)
    if weights is not None:
        contrib = contrib * weights[r_hit, pos]
    uniq, inv = np.unique(item, return_inverse=True)
    count = np.bincount(inv, minlength=len(uniq)).astype(np.int32)
    if agg == "sum":
        score = np.zeros(len(uniq), np.float32)
        np.add.at(score, inv, contrib)  # applied in hit order
    else:
        score = np.full(len(uniq), -np.inf, np.float32)
        np.maximum.at(score, inv, contrib)  # NaN propagates
    return uniq, count, score


def _routed_members(bucket_ids, offsets, members):
    """The member ids of every bucket some query routes to (each bucket once)."""
    R, B = offsets.shape[0], offsets.shape[1] - 1
    routed = np.zeros((R, B), bool)
    q, r, j = np.nonzero(bucket_ids >= 0)
    routed[r, bucket_ids[q, r, j]] = True
    parts = [members[r, : offsets[r, B]][np.repeat(routed[r], np.diff(offsets[r]))] for r in range(R)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def merge_topk(bucket_ids, bucket_scores, offsets, members, weights, k, min_count=1, agg="sum", n_items=None,
               n_threads=0):
    """Top-k items of each query's routed buckets, by summed (or max) bucket score.

    bucket_ids int32 [Q, R, m] (-1 skips the slot), bucket_scores float32 [Q, R, m];
    partition per repetition in CSR: offsets int32 [R, B+1], members int32 [R, M]
    (entries past offsets[r, B] are ignored), weights float32 [R, M] or None (all 1).
    Each member of a routed bucket is a hit contributing bucket score * weight.
    Candidates are the items with at least t hits, t = min_count relaxed until k
    items qualify. Member ids must lie in [0, n_items): with n_items given, only the
    members of routed buckets are read and checked (a call's cost does not grow
    with the partition); with None, all are scanned and n_items = max id + 1.
    Returns (ids [Q, k], scores [Q, k], counts [Q, k], n_candidates [Q]), best
    first, padded with -1 / -inf / 0. n_threads is unused.
    """
    check_array(bucket_ids, "bucket_ids", np.int32, 3)
    check_array(bucket_scores, "bucket_scores", np.float32, 3)
    Q, R, m = bucket_ids.shape
    for axis in range(3):
        check_axis(bucket_scores, "bucket_scores", axis, bucket_ids.shape[axis], "bucket_ids' shape")
    check_array(offsets, "offsets", np.int32, 2)
    check_axis(offsets, "offsets", 0, R, "R repetitions")
    if offsets.shape[1] < 1:
        raise ValueError("offsets: needs B + 1 >= 1 columns")
    B = offsets.shape[1] - 1
    check_array(members, "members", np.int32, 2)
    check_axis(members, "members", 0, R, "R repetitions")
    if weights is not None:
        check_array(weights, "weights", np.float32, 2)
        check_axis(weights, "weights", 1, members.shape[1], "members' shape")
        check_axis(weights, "weights", 0, R, "members' shape")
    check_options(k=k, min_count=min_count, agg=agg, n_threads=n_threads)
    if n_items is not None and n_items < 0:
        raise ValueError("n_items: must be >= 0 (or None)")
    _check_csr(offsets, "offsets", members.shape[1])
    if n_items is None:  # every member is scanned for the largest id
        used = np.concatenate([members[r, : offsets[r, B]] for r in range(R)]) if R else np.zeros(0, np.int32)
        _check_range(used, "members", 0, np.inf)
        n_items = int(used.max()) + 1 if used.size else 0
    _check_range(bucket_ids.ravel(), "bucket_ids", -1, B)
    _check_range(_routed_members(bucket_ids, offsets, members), "members", 0, n_items)

    ids = np.full((Q, k), -1, np.int32)
    scores = np.full((Q, k), -np.inf, np.float32)
    counts = np.zeros((Q, k), np.int32)
    n_candidates = np.zeros(Q, np.int32)
    for q in range(Q):
        with np.errstate(all="ignore"):  # inf * 0 and overflow are part of the arithmetic
            uniq, count, score = _accumulate(bucket_ids[q], bucket_scores[q], offsets, members, weights, agg)
        cand = count >= _threshold(count, k, min_count)
        n_candidates[q] = cand.sum()
        c_ids, c_scores, c_counts = uniq[cand], _zero_to_plus(score[cand]), count[cand]
        top = _rank(c_scores, c_ids, descending=True)[:k]
        ids[q, : len(top)] = c_ids[top]
        scores[q, : len(top)] = c_scores[top]
        counts[q, : len(top)] = c_counts[top]
    return ids, scores, counts, n_candidates


def merge_candidates(bucket_ids, offsets, members, min_count=1, min_candidates=1, n_items=None, n_threads=0):
    """Every item hit in at least t repetitions' routed buckets, t = min_count relaxed
    until min_candidates items qualify (the set ANN search re-ranks exactly).

    Returns CSR (cand_offsets int64 [Q+1], cand_ids int32 [T], n_candidates int32
    [Q]) with each query's candidates in ascending id order. Same validation as
    merge_topk (min_candidates plays k's part).
    """
    check_array(bucket_ids, "bucket_ids", np.int32, 3)
    zeros = np.zeros(bucket_ids.shape, np.float32)
    parts = []
    # merge_topk validates the arguments and counts the same candidates.
    _, _, _, n_candidates = merge_topk(bucket_ids, zeros, offsets, members, None, min_candidates, min_count, "sum",
                                       n_items, n_threads)
    for q in range(bucket_ids.shape[0]):
        uniq, count, _ = _accumulate(bucket_ids[q], zeros[q], offsets, members, None, "sum")
        parts.append(uniq[count >= _threshold(count, min_candidates, min_count)].astype(np.int32))
    offsets_out = np.zeros(len(parts) + 1, np.int64)
    offsets_out[1:] = np.cumsum([len(p) for p in parts])
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return offsets_out, ids, n_candidates


def distances(queries, rows, metric):
    """Distance (smaller is better) of queries [..., d] to rows [..., d], float32:
    ip -q.x, cosine 1 - q.x / (|q| |x|) (1 where that denominator is 0),
    l2 squared Euclidean; every reduction in the canonical lane order."""
    with np.errstate(all="ignore"):
        if metric == "l2":
            diff = queries - rows
            return _zero_to_plus(lane_sum(diff * diff))
        dot = lane_sum(queries * rows)
        if metric == "ip":
            return _zero_to_plus(-dot)
        denom = np.sqrt(lane_sum(queries * queries)) * np.sqrt(lane_sum(rows * rows))
        return _zero_to_plus(np.where(denom == 0, np.float32(1), np.float32(1) - dot / denom))


def _candidate_rows(candidates, Q, N):
    """Per-query candidate id arrays from the padded, CSR or CSR-runs form, checked."""
    if isinstance(candidates, tuple) and len(candidates) == 3:
        run_offsets, starts, lens = candidates
        check_array(starts, "run_starts", np.int32, 1)
        check_array(lens, "run_lens", np.int32, 1)
        check_axis(lens, "run_lens", 0, len(starts), "one length per run start")
        _candidate_rows((run_offsets, np.zeros(len(starts), np.int32)), Q, 1)  # checks the offsets
        used = slice(0, int(run_offsets[-1]))
        s, n = starts[used].astype(np.int64), lens[used].astype(np.int64)
        if (n < 0).any():
            raise ValueError(f"run_lens: length {n[n < 0][0]} < 0")
        if ((s < 0) | (s + n > N)).any():
            j = int(np.flatnonzero((s < 0) | (s + n > N))[0])
            raise ValueError(f"run_starts: run [{s[j]}, +{n[j]}) out of range [0, N={N})")
        return [np.concatenate([np.arange(a, a + b, dtype=np.int32) for a, b in
                                zip(s[run_offsets[q]:run_offsets[q + 1]], n[run_offsets[q]:run_offsets[q + 1]])]
                               or [np.zeros(0, np.int32)]) for q in range(Q)]
    if isinstance(candidates, tuple):
        cand_offsets, cand_ids = candidates
        if not isinstance(cand_offsets, np.ndarray) or cand_offsets.dtype not in (np.int32, np.int64):
            raise ValueError("cand_offsets: expected an int32 or int64 numpy array")
        check_array(cand_offsets, "cand_offsets", cand_offsets.dtype, 1)
        check_array(cand_ids, "cand_ids", np.int32, 1)
        check_axis(cand_offsets, "cand_offsets", 0, Q + 1, "Q + 1")
        _check_csr(cand_offsets, "cand_offsets", len(cand_ids))
        _check_range(cand_ids[: cand_offsets[-1]], "cand_ids", -1, N)
        return [cand_ids[cand_offsets[q] : cand_offsets[q + 1]] for q in range(Q)]
    check_array(candidates, "candidates", np.int32, 2)
    check_axis(candidates, "candidates", 0, Q, "one row per query")
    _check_range(candidates.ravel(), "candidates", -1, N)
    return list(candidates)


def rerank_topk(queries, base, candidates, k, metric="ip", n_threads=0):
    """Exact k nearest candidates of each query.

    queries float32 [Q, d], base float32 [N, d]; candidates either padded int32
    [Q, C], CSR (cand_offsets int32/int64 [Q+1], cand_ids int32 [T]; -1 entries are
    skipped) or CSR runs of consecutive rows (run_offsets int32/int64 [Q+1],
    run_starts int32 [T], run_lens int32 [T]: query q's candidates are rows
    s..s+n-1 of its runs); repeated ids count once in every form. Returns (ids [Q, k],
    dist [Q, k], n_unique [Q]), nearest first, padded with -1 / +inf.
    n_threads is unused.
    """
    check_array(queries, "queries", np.float32, 2)
    check_array(base, "base", np.float32, 2)
    Q, d = queries.shape
    check_axis(base, "base", 1, d, "queries' dimension")
    rows = _candidate_rows(candidates, Q, base.shape[0])
    check_options(k=k, metric=metric, n_threads=n_threads)

    ids = np.full((Q, k), -1, np.int32)
    dist = np.full((Q, k), np.inf, np.float32)
    n_unique = np.zeros(Q, np.int32)
    for q in range(Q):
        uniq = np.unique(rows[q])
        uniq = uniq[uniq >= 0]
        n_unique[q] = len(uniq)
        dq = distances(queries[q], base[uniq], metric)
        top = _rank(dq, uniq, descending=False)[:k]
        ids[q, : len(top)] = uniq[top]
        dist[q, : len(top)] = dq[top]
    return ids, dist, n_unique


def merge_rerank_topk(queries, base, bucket_ids, offsets, members, k, min_count=1, metric="ip", n_threads=0):
    """merge_candidates (min_candidates = k, members are rows of base) then rerank_topk of those
    candidates: (ids [Q, k], dist [Q, k], n_candidates [Q]). The host kernel fuses the two so that a
    query's candidates are never written out; the results are the same."""
    check_array(queries, "queries", np.float32, 2)
    check_array(base, "base", np.float32, 2)
    check_array(bucket_ids, "bucket_ids", np.int32, 3)
    check_axis(bucket_ids, "bucket_ids", 0, queries.shape[0], "one row per query")
    cand = merge_candidates(bucket_ids, offsets, members, min_count, k, base.shape[0], n_threads)
    ids, dist, _ = rerank_topk(queries, base, cand[:2], k, metric, n_threads)
    return ids, dist, cand[2]


def _seq_sum(x):
    """float32 sum of a 1-d array in index order (the kernel's running sum)."""
    return np.cumsum(np.asarray(x, np.float32), dtype=np.float32)[-1] if len(x) else np.float32(0)


def pq4_table(query, codebooks, metric):
    """One query's quantized table: (bytes [M, 16] int64, scale, bias) float32 scalars.

    The float table lut[m, j] sums the sub-space's terms in dimension order, float32 (the query zero
    past d): l2 (q - c)^2, ip and cosine -(q . c).
    Each row is shifted by its minimum and scaled by one scale = min(255 / largest row range,
    (65535 - M) / sum of row ranges), rounded half to even and capped at 255, so a sum over the M
    sub-spaces stays below 2^16; a row's value is then float32(sum) * (1 / scale) + bias (the step 1 /
    scale in float32) with bias the sum of the minima (both sums in sub-space order)."""
    m, _, dsub = codebooks.shape
    q = np.zeros(m * dsub, np.float32)
    q[:len(query)] = query
    q = q.reshape(m, 1, dsub)
    acc = np.zeros((m, 16), np.float32)
    for i in range(dsub):
        term = q[:, :, i] - codebooks[:, :, i] if metric == "l2" else q[:, :, i] * codebooks[:, :, i]
        acc = acc + (term * term if metric == "l2" else term)
    lut = acc if metric == "l2" else -acc
    lo = lut.min(1)
    ranges = lut.max(1) - lo
    max_range = ranges.max()
    scale = (min(np.float32(255) / max_range, (np.float32(65535) - np.float32(m)) / _seq_sum(ranges))
             if max_range > 0 else np.float32(1))
    table = np.minimum(np.float32(255), np.rint((lut - lo[:, None]) * scale)).astype(np.int64)
    return table, np.float32(scale), _seq_sum(lo)


def pq4_search(queries, base, codes, codebooks, centres, row_offsets, block_offsets, leaves, lens, reorder, k,
               metric="ip", n_threads=0, row_terms=None, row_ids=None):
    """Probed leaves scored from 4-bit PQ codes, the best `reorder` re-ranked exactly.

    base float32 [N, d] in leaf layout (leaf b: rows row_offsets[b]:row_offsets[b+1], int32 [L+1]);
    codes uint8 [n_blocks, ceil(M/2), 32] (`jaxidx.pq4.block_layout`: leaf b in blocks
    block_offsets[b]:block_offsets[b+1], ceil(rows / 32) of them; block j, pair p, byte v holds
    row 32 j + v's codes of sub-spaces 2p (low nibble) and 2p + 1); codebooks float32 [M, 16, dsub];
    centres float32 [L, d] (residual codes) or None; leaves int32 [Q, P] (-1 = none, no leaf twice per
    query) and lens int32 [Q, P] (the first lens rows of each probed leaf are its candidates; 0 where
    -1). A candidate's approximate value is float32(sum over sub-spaces of its table bytes) * (1 / scale)
    + bias (`pq4_table`, one per query; with centres the bias also has the leaf's `distances(q, centre)`:
    -(q . centre) for ip and cosine). l2 with centres needs row_terms float32 [N] (`jaxidx.pq4.row_terms`: 2 centre .
    r + ||r||^2 of each row's decoded residual r): the table is `pq4_table(2 q, codebooks, "ip")` (-2 q .
    centroid) and a row's value (float32(sum) * (1 / scale) + (bias + ||q - centre||^2)) + row_terms[row],
    ||q - centre - r||^2 expanded. The
    `reorder` candidates of smallest
    (value, row) go to `rerank_topk`'s exact distance; reorder >= k. Returns (rows [Q, k], dist
    [Q, k], n_candidates [Q]). n_threads is unused.

    row_ids int32 [S] (codes of the rows themselves: centres None): row_offsets count slots, not rows;
    leaf b's slots row_offsets[b]:row_offsets[b+1] hold base rows row_ids[slot], a row possibly in
    several leaves (IRLI's repetitions) with the same codes in every copy; each distinct row is scored
    once, and n_candidates counts slots."""
    for a, name, dt, nd in ((queries, "queries", np.float32, 2), (base, "base", np.float32, 2),
                            (codes, "codes", np.uint8, 3), (codebooks, "codebooks", np.float32, 3),
                            (row_offsets, "row_offsets", np.int32, 1), (block_offsets, "block_offsets", np.int32, 1),
                            (leaves, "leaves", np.int32, 2), (lens, "lens", np.int32, 2)):
        check_array(a, name, dt, nd)
    Q, d = queries.shape
    m, _, dsub = codebooks.shape
    check_axis(base, "base", 1, d, "queries' dimension")
    check_axis(codebooks, "codebooks", 1, 16, "16 centroids per sub-space (4-bit codes)")
    if m * dsub < d or (m - 1) * dsub >= d:
        raise ValueError(f"codebooks: shape [M, 16, dsub] must cover the {d} dimensions with M = ceil(d / dsub)")
    check_axis(codes, "codes", 1, (m + 1) // 2, "ceil(M / 2) sub-space pairs")
    check_options(k=k, metric=metric, n_threads=n_threads)
    if reorder < k:
        raise ValueError(f"reorder: must be in [k, 2^31 - 1], got {reorder}")
    if centres is not None:
        check_array(centres, "centres", np.float32, 2)
    if row_terms is not None:
        check_array(row_terms, "row_terms", np.float32, 1)
        check_axis(row_terms, "row_terms", 0, base.shape[0], "one term per base row")
        if metric != "l2" or centres is None:
            raise ValueError("row_terms: only for l2 with residual codes (centres given)")
    elif metric == "l2" and centres is not None:
        raise ValueError("row_terms: required for l2 with residual codes (pq4.row_terms)")
    if row_ids is not None:
        check_array(row_ids, "row_ids", np.int32, 1)
        if centres is not None:
            raise ValueError("row_ids: only with codes of the rows themselves (centres None)")
    leaf = np.repeat(np.arange(len(row_offsets) - 1), np.diff(row_offsets))  # each row's (slot's) leaf
    pos = np.arange(len(leaf)) - row_offsets[leaf]                             # and place in it
    packed = codes[block_offsets[leaf] + pos // 32, :, pos % 32]               # [N, ceil(M / 2)]
    row_codes = np.empty((len(packed), 2 * codes.shape[1]), np.int64)
    row_codes[:, 0::2], row_codes[:, 1::2] = packed & 15, packed >> 4
    row_codes = row_codes[:, :m]
    if row_ids is not None:  # every copy of a row carries its codes
        first = np.full(len(base), -1, np.int64)
        first[row_ids[::-1]] = np.arange(len(row_ids))[::-1]
        if not np.array_equal(row_codes, row_codes[first[row_ids]]):
            raise ValueError("codes: the copies of a row (row_ids) must carry the same codes")
    best = np.full((Q, reorder), -1, np.int32)
    n_cand = np.zeros(Q, np.int32)
    for q in range(Q):
        shared = (pq4_table(2 * queries[q], codebooks, "ip") if row_terms is not None
                  else pq4_table(queries[q], codebooks, metric))
        values, rows = [], []
        for b, n in zip(leaves[q], lens[q]):
            if b < 0 or n == 0:
                continue
            table, scale, bias = shared
            if centres is not None:
                bias = bias + distances(queries[q], centres[b], "l2" if metric == "l2" else "ip")
            r = np.arange(row_offsets[b], row_offsets[b] + n)
            sums = table[np.arange(m), row_codes[r]].sum(1)
            value = sums.astype(np.float32) * (np.float32(1) / scale) + bias
            values.append(value + row_terms[r] if row_terms is not None else value)
            rows.append((r if row_ids is None else row_ids[r]).astype(np.int32))
            n_cand[q] += n
        if rows:
            rows, first = np.unique(np.concatenate(rows), return_index=True)
            values = np.concatenate(values)[first]
            top = _rank(values, rows, descending=False)[:reorder]
            best[q, :len(top)] = rows[top]
    ids, dist, _ = rerank_topk(queries, base, best, k, metric)
    return ids, dist, n_cand


def sq8_search(queries, base, codes, lo, scale, row_terms, row_offsets, leaves, lens, reorder, k, metric="l2",
               n_threads=0):
    """Probed leaves scored from 8-bit codes, the best `reorder` re-ranked exactly.

    base float32 [N, d] in leaf layout (leaf b: rows row_offsets[b]:row_offsets[b+1], int32 [L+1]); codes
    uint8 [N, dpad] (`jaxidx.sq8.encode`: dpad a multiple of 32, zero past d) standing for lo + scale * u
    (lo, scale float32 [d]); leaves int32 [Q, P] (-1 = none, no leaf twice per query) and lens int32 [Q, P]
    (the first lens rows of each probed leaf are its candidates; 0 where -1). Per query, in float32:
    w = (q - lo) * scale (l2) or q * scale (ip), beta = max |w| / 63 (1 if w is 0), w8 = rint(w / beta)
    (7-bit integers), and a row's value is row_terms[row] - (2 beta) * float32(w8 . u) for l2 (row_terms
    float32 [N]: `sq8.row_terms`, required) or -(beta * float32(w8 . u)) for ip (row_terms None); the dot is
    exact (int64 here). The `reorder` rows of smallest (value, row) go to `rerank_topk`'s exact distance;
    reorder >= k; 'cosine' is refused (normalise the rows, use 'ip'). Returns (rows [Q, k], dist [Q, k],
    n_candidates [Q]). n_threads is unused."""
    for a, name, dt, nd in ((queries, "queries", np.float32, 2), (base, "base", np.float32, 2),
                            (codes, "codes", np.uint8, 2), (lo, "lo", np.float32, 1), (scale, "scale", np.float32, 1),
                            (row_offsets, "row_offsets", np.int32, 1), (leaves, "leaves", np.int32, 2),
                            (lens, "lens", np.int32, 2)):
        check_array(a, name, dt, nd)
    Q, d = queries.shape
    check_axis(base, "base", 1, d, "queries' dimension")
    check_axis(codes, "codes", 0, base.shape[0], "one row per base row")
    check_axis(lo, "lo", 0, d, "queries' dimension")
    check_axis(scale, "scale", 0, d, "queries' dimension")
    if codes.shape[1] < d or codes.shape[1] % 32:
        raise ValueError(f"codes: rows of {codes.shape[1]} bytes: need a multiple of 32, >= d")
    if codes.shape[1] > 131072:
        raise ValueError("codes: rows of more than 131072 bytes (the int32 dot products could overflow)")
    check_options(k=k, metric=metric, n_threads=n_threads)
    if metric == "cosine":
        raise ValueError("metric: 'cosine' has no 8-bit form: normalise the rows and use 'ip'")
    if reorder < k:
        raise ValueError(f"reorder: must be in [k, 2^31 - 1], got {reorder}")
    if (row_terms is None) == (metric == "l2"):
        raise ValueError("row_terms: required for l2 (sq8.row_terms)" if row_terms is None else "row_terms: only for l2")
    w = (queries - lo) * scale if metric == "l2" else queries * scale
    amax = np.abs(w).max(1, keepdims=True)
    beta = np.where(amax > 0, amax / np.float32(63), np.float32(1)).astype(np.float32)
    w8 = np.clip(np.rint(w / beta), -63, 63).astype(np.int64)
    factor = (2 * beta[:, 0] if metric == "l2" else beta[:, 0]).astype(np.float32)
    best = np.full((Q, reorder), -1, np.int32)
    n_cand = np.zeros(Q, np.int32)
    for q in range(Q):
        rows = np.concatenate([np.arange(row_offsets[b], row_offsets[b] + n, dtype=np.int32)
                               for b, n in zip(leaves[q], lens[q]) if b >= 0] or [np.zeros(0, np.int32)])
        n_cand[q] = len(rows)
        dot = (codes[rows, :d].astype(np.int64) @ w8[q]).astype(np.float32)
        value = row_terms[rows] - factor[q] * dot if metric == "l2" else -(factor[q] * dot)
        top = _rank(value, rows, descending=False)[:reorder]
        best[q, :len(top)] = rows[top]
    ids, dist, _ = rerank_topk(queries, base, best, k, metric)
    return ids, dist, n_cand


def topk_rows(x, k, n_threads=0):
    """Largest k entries of each row of x float32 [n, c]: (idx int32 [n, k],
    vals float32 [n, k]); ties to the smaller index, NaN last, padded -1 / -inf."""
    check_array(x, "x", np.float32, 2)
    check_options(k=k, n_threads=n_threads)
    n, c = x.shape
    kk = min(k, c)
    col = np.broadcast_to(np.arange(c, dtype=np.int32), x.shape)
    top = _rank(x, col, descending=True)[:, :kk]
    idx = np.full((n, k), -1, np.int32)
    vals = np.full((n, k), -np.inf, np.float32)
    idx[:, :kk] = top
    vals[:, :kk] = np.take_along_axis(x, top, axis=1)
    return idx, vals


def tree_beam(phi, groups, group_logp, rows, bias, n_groups, k, n_threads=0):
    """The k best leaves of a two-level tree below each query's routed groups: (ids int32 [Q, k],
    log p float32 [Q, k]), best first, ties to the smaller id, padded -1 / -inf.

    phi float32 [Q, H]; groups int32 [Q, B] (-1 = none) with their log probabilities group_logp float32
    [Q, B]; rows float32 [C, H] and bias float32 [C] the leaf classifiers, group g owning rows
    [g S, (g + 1) S) with S = C / n_groups. A leaf's log p is its group's plus its log softmax among its
    siblings, ((z - max) - log sum exp(z - max)) over the group's logits z = phi . row + bias (the dot in
    the canonical lane order, all float32).
    """
    for x, name, dtype, ndim in ((phi, "phi", np.float32, 2), (groups, "groups", np.int32, 2),
                                 (group_logp, "group_logp", np.float32, 2), (rows, "rows", np.float32, 2),
                                 (bias, "bias", np.float32, 1)):
        check_array(x, name, dtype, ndim)
    check_options(k=k, n_threads=n_threads)
    Q, H = phi.shape
    C = rows.shape[0]
    check_axis(groups, "groups", 0, Q, "one row per query")
    check_axis(group_logp, "group_logp", 0, Q, "one row per query")
    check_axis(group_logp, "group_logp", 1, groups.shape[1], "one log probability per routed group")
    check_axis(rows, "rows", 1, H, "the width of phi")
    check_axis(bias, "bias", 0, C, "one bias per row")
    if not 1 <= n_groups <= max(C, 1):
        raise ValueError(f"n_groups: must be in [1, rows], got {n_groups}")
    if C % n_groups:
        raise ValueError(f"n_groups: {n_groups} does not divide the {C} rows")
    _check_range(groups, "groups", -1, n_groups)
    S = C // n_groups
    ids = np.full((Q, k), -1, np.int32)
    out = np.full((Q, k), -np.inf, np.float32)
    for q in range(Q):
        routed = groups[q] >= 0
        if not routed.any():
            continue
        leaf = (groups[q][routed][:, None] * S + np.arange(S)).astype(np.int32)  # [b, S]
        z = -distances(phi[q], rows[leaf], "ip") + bias[leaf]
        with np.errstate(all="ignore"):
            shifted = z - z.max(axis=1, keepdims=True)
            logp = group_logp[q][routed][:, None] + (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))
        leaf, logp = leaf.ravel(), logp.ravel().astype(np.float32)
        top = _rank(logp, leaf, descending=True)[:k]
        ids[q, :len(top)], out[q, :len(top)] = leaf[top], logp[top]
    return ids, out


def balanced_assign(candidates, n_buckets, order=None, capacity=0, initial_counts=None, n_choices=0,
                    n_threads=0):
    """Greedy load-balanced bucket assignment (IRLI re-partition), per repetition.

    candidates int32 [R, N, K]: each item's preferred buckets, best first (-1 =
    none). Items are visited in `order` (int32/int64 [R, N] permutation; None =
    0..N-1) and each goes to the least-filled of its first `n_choices` usable
    preferences (0 = all; ties to the earlier one); a bucket with count >=
    capacity (when capacity > 0) is not usable, so a capped item falls back to
    its next preferences in rank order. With no usable preference an item goes
    to the least-filled bucket overall (ties to the smaller id). Counts start
    from initial_counts (int64 [R, B]) or 0. Returns assign int32 [R, N].
    n_threads is unused.
    """
    check_array(candidates, "candidates", np.int32, 3)
    R, N, _ = candidates.shape
    if not 1 <= n_buckets <= np.iinfo(np.int32).max:
        raise ValueError("n_buckets: must be in [1, 2^31 - 1]")
    if capacity < 0:
        raise ValueError("capacity: must be >= 0 (0 = unbounded)")
    if n_choices < 0:
        raise ValueError("n_choices: must be >= 0 (0 = all candidates)")
    if order is not None:
        if not isinstance(order, np.ndarray) or order.dtype not in (np.int32, np.int64):
            raise ValueError("order: expected an int32 or int64 numpy array")
        check_array(order, "order", order.dtype, 2)
        check_axis(order, "order", 0, R, "R repetitions")
        check_axis(order, "order", 1, N, "N items")
    if initial_counts is not None:
        check_array(initial_counts, "initial_counts", np.int64, 2)
        check_axis(initial_counts, "initial_counts", 0, R, "R repetitions")
        check_axis(initial_counts, "initial_counts", 1, n_buckets, "n_buckets")
    check_options(n_threads=n_threads)
    bad = (candidates < -1) | (candidates >= n_buckets)
    if bad.any():
        raise ValueError(f"candidates: bucket {candidates[bad][0]} out of range [-1, n_buckets={n_buckets})")
    if order is not None and (np.sort(order, axis=1) != np.arange(N)).any():
        raise ValueError("order: a row is not a permutation of 0..N-1")
    start = np.zeros((R, n_buckets), np.int64) if initial_counts is None else initial_counts
    if (start < 0).any():
        raise ValueError("initial_counts: must be >= 0")
    if capacity > 0 and (capacity * n_buckets < N + start.sum(axis=1)).any():
        raise ValueError("capacity: capacity * n_buckets is less than the items to place")

    assign = np.zeros((R, N), np.int32)
    for r in range(R):
        counts = start[r].copy()
        for item in range(N) if order is None else order[r]:
            pref = candidates[r, item]
            pref = pref[pref >= 0]
            if capacity > 0:
                pref = pref[counts[pref] < capacity]
            if n_choices:
                pref = pref[:n_choices]
            best = pref[np.argmin(counts[pref])] if len(pref) else np.argmin(counts)
            assign[r, item] = best
            counts[best] += 1
    return assign
