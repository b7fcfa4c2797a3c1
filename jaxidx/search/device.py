"""Pure-JAX twin of the search kernels, for accelerators and jit-compiled code.

Returns what `reference` and `host` return (bit for bit on CPU; a GPU may
reduce floats in another order or fuse multiply-adds, so there scores and
distances agree to rounding). Everything is jit-compiled with static shapes:
k, min_count, agg, metric and, for merge_topk, `max_bucket_size` (the largest
bucket, see `max_bucket_size_of`) are compile-time constants.

merge_topk gathers the members of each query's routed buckets into a padded
[Q, R*m*S] block, stable-sorts it by item id (hit order survives within an
item), reduces runs of equal ids with one scatter, takes the count threshold
from the k-th largest count, and picks the top k with lax.top_k on an int32
key that orders (score desc, NaN last); lax.top_k puts the lower position,
here the smaller id, first among equal keys.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxidx.search.reference import check_options

__all__ = ["merge_topk", "rerank_topk", "topk_rows", "max_bucket_size_of", "csr_to_padded", "lane_sum",
           "distances", "top_k", "pq4_table", "pq4_values"]

_NOT_CANDIDATE = np.iinfo(np.int32).min  # rank keys: below NaN, which is below every number
_NAN = _NOT_CANDIDATE + 1
_NO_ITEM = np.iinfo(np.int32).max  # sorts the empty hit slots last


def top_k(x, k: int):
    """lax.top_k behind an optimization barrier: XLA:CPU turns a TopK whose values are sliced in the same
    fusion (a k-th value, a margin) into a full sort, 15-20x slower at 512-1024 columns."""
    val, idx = jax.lax.top_k(x, k)
    return jax.lax.optimization_barrier(val), idx  # (a barrier on the (val, idx) tuple crashes XLA's SPMD passes)


def _zero_to_plus(x):
    return jnp.where(x == 0, jnp.float32(0), x)


def _rank_key(x, valid):
    """int32 key ordered like float32 x (larger = better, -0.0 == +0.0), NaN
    below every number and entries where not `valid` below NaN."""
    bits = jax.lax.bitcast_convert_type(_zero_to_plus(x), jnp.int32)
    key = jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))
    return jnp.where(valid, jnp.where(jnp.isnan(x), _NAN, key), _NOT_CANDIDATE)


def _take_top(key, k, fields):
    """For each row, the `fields` [(values [..., n], pad)] at the k largest keys
    (ties to the lower position); rows with fewer valid keys are padded."""
    n = key.shape[-1]
    kk = min(k, n)
    lead = key.shape[:-1]
    if kk:
        top_key, pos = jax.lax.top_k(key, kk)
        ok = top_key > _NOT_CANDIDATE
        out = [jnp.where(ok, jnp.take_along_axis(v, pos, axis=-1), pad) for v, pad in fields]
    else:
        out = [jnp.zeros(lead + (0,), v.dtype) for v, _ in fields]
    return [jnp.concatenate([o, jnp.full(lead + (k - kk,), pad, o.dtype)], axis=-1) for o, (_, pad) in
            zip(out, fields)]


def lane_sum(terms):
    """Sum float32 `terms` [..., d] over the last axis in the canonical order of
    reference.lane_sum (8 lanes, then ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)))."""
    d = terms.shape[-1]
    pad = (-d) % 8
    terms = jnp.pad(terms, [(0, 0)] * (terms.ndim - 1) + [(0, pad)])
    chunks = terms.reshape(terms.shape[:-1] + ((d + pad) // 8, 8))
    acc = jnp.zeros(terms.shape[:-1] + (8,), jnp.float32)
    for c in range(chunks.shape[-2]):
        acc = acc + chunks[..., c, :]
    pairs = acc[..., :4] + acc[..., 4:]
    pairs = pairs[..., :2] + pairs[..., 2:]
    return pairs[..., 0] + pairs[..., 1]


def distances(queries, rows, metric):
    """jnp version of reference.distances (ip, cosine or l2; smaller is better)."""
    if metric == "l2":
        diff = queries - rows
        return _zero_to_plus(lane_sum(diff * diff))
    dot = lane_sum(queries * rows)
    if metric == "ip":
        return _zero_to_plus(-dot)
    denom = jnp.sqrt(lane_sum(queries * queries)) * jnp.sqrt(lane_sum(rows * rows))
    return _zero_to_plus(jnp.where(denom == 0, jnp.float32(1), jnp.float32(1) - dot / denom))


def max_bucket_size_of(offsets):
    """Largest bucket of a CSR partition (concrete offsets [R, B+1]): the static
    `max_bucket_size` that merge_topk compiles for."""
    return int(np.diff(np.asarray(offsets), axis=1).max(initial=0))


def merge_topk(bucket_ids, bucket_scores, offsets, members, weights, k, min_count=1, agg="sum", n_items=None,
               n_threads=0, *, max_bucket_size=None):
    """jit-compiled reference.merge_topk. `max_bucket_size` must be at least the
    largest bucket; None computes it from (concrete) offsets. n_items and
    n_threads are accepted for the common signature and unused."""
    check_options(k=k, min_count=min_count, agg=agg, n_threads=n_threads)
    if max_bucket_size is None:
        max_bucket_size = max_bucket_size_of(offsets)
    return _merge_topk(bucket_ids, bucket_scores, offsets, members, weights, k=k, min_count=min_count, agg=agg,
                       max_bucket_size=max_bucket_size)


def _accumulate(bucket_ids, bucket_scores, offsets, members, weights, agg, max_bucket_size):
    """Every query's hits reduced per item: (item [Q, L] ascending per row (padding after), count [Q, L],
    score [Q, L] (agg of the hit contributions)); L = R * m * max_bucket_size slots, unused ones count 0."""
    Q, R, m = bucket_ids.shape
    L = R * m * max_bucket_size
    # Hits [Q, R, m, S] in (r, j, member position) order.
    routed = bucket_ids >= 0
    bucket = jnp.where(routed, bucket_ids, 0)
    rep = jnp.arange(R)[None, :, None]
    start, end = offsets[rep, bucket], offsets[rep, bucket + 1]
    pos = start[..., None] + jnp.arange(max_bucket_size, dtype=start.dtype)
    hit = routed[..., None] & (pos < end[..., None])
    pos = jnp.where(hit, pos, 0)
    item = jnp.where(hit, members[rep[..., None], pos], _NO_ITEM)
    contrib = bucket_scores[..., None]
    if weights is not None:
        contrib = contrib * weights[rep[..., None], pos]
    contrib = jnp.broadcast_to(contrib, hit.shape)

    # Group equal items (stable: each item's hits stay in hit order) and reduce. Sorting
    # (item, position) and gathering the rest is faster on CPU than sorting every operand.
    item, perm = jax.lax.sort((item.reshape(Q, L), jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (Q, L))),
                              dimension=1, num_keys=1, is_stable=True)
    contrib = jnp.take_along_axis(contrib.reshape(Q, L), perm, axis=1)
    hit = jnp.take_along_axis(hit.reshape(Q, L), perm, axis=1).astype(jnp.int32)
    first = jnp.concatenate([jnp.ones((Q, 1), bool), item[:, 1:] != item[:, :-1]], axis=1)
    seg = jnp.cumsum(first, axis=1, dtype=jnp.int32) - 1
    rows = jnp.arange(Q)[:, None]
    count = jnp.zeros((Q, L), jnp.int32).at[rows, seg].add(hit)
    if agg == "sum":
        score = jnp.zeros((Q, L), jnp.float32).at[rows, seg].add(jnp.where(hit > 0, contrib, 0))
    else:
        score = jnp.full((Q, L), -jnp.inf, jnp.float32).at[rows, seg].max(jnp.where(hit > 0, contrib, -jnp.inf))
    seg_item = jnp.zeros((Q, L), jnp.int32).at[rows, seg].max(item)  # ascending along each row
    return seg_item, count, score


def _candidates(count, k, min_count):
    """Items hit in >= t repetitions, t = the largest value <= min_count that k items reach, else 1."""
    if min_count > 1 and k <= count.shape[1]:
        kth_count = top_k(count, k)[0][:, k - 1]
        threshold = jnp.maximum(1, jnp.minimum(min_count, kth_count))[:, None]
    else:
        threshold = 1
    return count >= threshold


@functools.partial(jax.jit, static_argnames=("k", "min_count", "agg", "max_bucket_size"))
def _merge_topk(bucket_ids, bucket_scores, offsets, members, weights, *, k, min_count, agg, max_bucket_size):
    Q, R, m = bucket_ids.shape
    if R * m * max_bucket_size == 0 or members.shape[1] == 0:
        ids, scores, counts = _take_top(jnp.zeros((Q, 0), jnp.int32), k, [
            (jnp.zeros((Q, 0), jnp.int32), -1), (jnp.zeros((Q, 0), jnp.float32), -jnp.inf),
            (jnp.zeros((Q, 0), jnp.int32), 0)])
        return ids, scores, counts, jnp.zeros(Q, jnp.int32)
    seg_item, count, score = _accumulate(bucket_ids, bucket_scores, offsets, members, weights, agg, max_bucket_size)
    cand = _candidates(count, k, min_count)
    score = _zero_to_plus(score)
    ids, scores, counts = _take_top(_rank_key(score, cand), k, [(seg_item, -1), (score, -jnp.inf), (count, 0)])
    return ids, scores, counts, cand.sum(axis=1, dtype=jnp.int32)


def csr_to_padded(cand_offsets, cand_ids):
    """Concrete CSR candidates (offsets [Q+1], ids [T]) as a padded int32 [Q, C] array (-1 = none)."""
    cand_offsets, cand_ids = np.asarray(cand_offsets), np.asarray(cand_ids)
    sizes = np.diff(cand_offsets)
    out = np.full((len(sizes), sizes.max(initial=0)), -1, np.int32)
    out[np.arange(out.shape[1]) < sizes[:, None]] = cand_ids[cand_offsets[0] : cand_offsets[-1]]
    return out


def rerank_topk(queries, base, candidates, k, metric="ip", n_threads=0):
    """jit-compiled reference.rerank_topk on padded candidates [Q, C]; a CSR
    tuple (concrete arrays) is converted with csr_to_padded first. n_threads is unused."""
    check_options(k=k, metric=metric, n_threads=n_threads)
    if isinstance(candidates, tuple):
        candidates = csr_to_padded(*candidates)
    return _rerank_topk(queries, base, candidates, k=k, metric=metric)


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def _rerank_topk(queries, base, candidates, *, k, metric):
    Q = candidates.shape[0]
    cand = jnp.sort(candidates, axis=1)
    unique = (cand >= 0) & jnp.concatenate([jnp.ones((Q, 1), bool), cand[:, 1:] != cand[:, :-1]], axis=1)
    dist = distances(queries[:, None, :], base[jnp.where(unique, cand, 0)], metric)
    ids, dist = _take_top(_rank_key(-dist, unique), k, [(cand, -1), (dist, jnp.inf)])
    return ids, dist, unique.sum(axis=1, dtype=jnp.int32)


def topk_rows(x, k, n_threads=0):
    """jit-compiled reference.topk_rows. n_threads is unused."""
    check_options(k=k, n_threads=n_threads)
    return _topk_rows(x, k=k)


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_rows(x, *, k):
    col = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)
    idx, vals = _take_top(_rank_key(x, True), k, [(col, -1), (x, -jnp.inf)])
    return idx, vals


def _sequential_sum(x):
    """float32 sums over the last axis in index order (reference._seq_sum; jnp.sum may reassociate)."""
    return jax.lax.fori_loop(0, x.shape[-1], lambda i, acc: acc + x[..., i], jnp.zeros(x.shape[:-1], x.dtype))


@functools.partial(jax.jit, static_argnames=("metric",))
def pq4_table(queries, codebooks, metric):
    """reference.pq4_table for a batch: queries [Q, d] -> (table int32 [Q, M, 16], scale [Q], bias [Q]). The same bits as the reference and the C++
    kernel where the table's sums round nothing (exactly representable inputs); elsewhere XLA may fuse a
    product and its sum into one multiply-add (one rounding instead of two), a last-bit difference."""
    m, _, dsub = codebooks.shape
    q, d = queries.shape
    t = jnp.pad(queries, ((0, 0), (0, m * dsub - d))).reshape(q, m, 1, dsub)
    acc = jnp.zeros((q, m, 16), jnp.float32)
    for i in range(dsub):
        term = t[..., i] - codebooks[None, :, :, i] if metric == "l2" else t[..., i] * codebooks[None, :, :, i]
        acc = acc + (term * term if metric == "l2" else term)
    lut = acc if metric == "l2" else -acc
    lo = lut.min(-1)
    ranges = lut.max(-1) - lo
    max_range = ranges.max(-1)
    scale = jnp.where(max_range > 0, jnp.minimum(jnp.float32(255) / max_range,
                                                 (jnp.float32(65535) - jnp.float32(m)) / _sequential_sum(ranges)),
                      jnp.float32(1))
    table = jnp.minimum(jnp.float32(255), jnp.round((lut - lo[..., None]) * scale[:, None, None]))
    return table.astype(jnp.int32), scale, _sequential_sum(lo)


@jax.jit
def pq4_values(table, scale, bias, codes):
    """The quantized scores of rows with codes [C, M] (0..15), a lookup-table gather: (sums int32 [Q, C] of
    their table entries, exactly the kernel's; values float32(sum) * (1 / scale) + bias, to XLA's
    rounding)."""
    m = codes.shape[1]
    sums = table[:, jnp.arange(m)[None, :], codes.astype(jnp.int32)].sum(-1)  # [Q, C]
    return sums, sums.astype(jnp.float32) * (jnp.float32(1) / scale)[:, None] + bias[:, None]
