"""Search kernels: hand-worked cases, C++ vs NumPy on balanced_assign, thread
counts, edge shapes and argument validation. The three-backend property tests
are in test_kernels_equivalence.py."""
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxidx import search
from jaxidx.search import device, host, reference

BACKENDS = {"host": host, "reference": reference, "device": device}
f32, i32 = np.float32, np.int32


def as_numpy(outs):
    return tuple(np.asarray(x) for x in outs)


def assert_same(got, want):
    """Equal dtypes, shapes and bits (float32 compared bit for bit)."""
    assert len(got) == len(want)
    for x, y in zip(as_numpy(got), as_numpy(want)):
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
        if x.dtype == f32:
            np.testing.assert_array_equal(x.view(i32), y.view(i32))
        else:
            np.testing.assert_array_equal(x, y)


# --- a small soft partition, worked by hand ------------------------------------
# repetition 0: bucket 0 = {0, 1}, bucket 1 = {2}, bucket 2 = {}      (members past 3 ignored)
# repetition 1: bucket 0 = {1, 3}, bucket 1 = {0, 1}, bucket 2 = {4}  (item 1 in two buckets)
OFFSETS = np.array([[0, 2, 3, 3], [0, 2, 4, 5]], i32)
MEMBERS = np.array([[0, 1, 2, -1, -1], [1, 3, 0, 1, 4]], i32)
WEIGHTS = np.array([[1.0, 0.5, 2.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.25, 1.0]], f32)
# one query: rep 0 routes bucket 0 (0.5) and bucket 1 (0.25); rep 1 routes bucket 1 (1.0) and skips a slot.
BUCKET_IDS = np.array([[[0, 1], [1, -1]]], i32)
BUCKET_SCORES = np.array([[[0.5, 0.25], [1.0, 9.0]]], f32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_sum_by_hand(backend):
    # hits: item0 0.5 (r0) + 1.0*0.5 (r1) = 1.0, count 2; item1 0.5*0.5 + 1.0*0.25 = 0.5, count 2;
    # item2 0.25*2 = 0.5, count 1.
    ids, scores, counts, n_cand = as_numpy(BACKENDS[backend].merge_topk(
        BUCKET_IDS, BUCKET_SCORES, OFFSETS, MEMBERS, WEIGHTS, k=4))
    np.testing.assert_array_equal(ids, [[0, 1, 2, -1]])
    np.testing.assert_array_equal(scores, np.array([[1.0, 0.5, 0.5, -np.inf]], f32))
    np.testing.assert_array_equal(counts, [[2, 2, 1, 0]])
    np.testing.assert_array_equal(n_cand, [3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_min_count_relaxes(backend):
    b = BACKENDS[backend]
    # min_count 2 keeps items 0 and 1 (2 >= k=2 items reach it).
    ids, _, counts, n_cand = as_numpy(b.merge_topk(BUCKET_IDS, BUCKET_SCORES, OFFSETS, MEMBERS, WEIGHTS, 2,
                                                   min_count=2))
    np.testing.assert_array_equal(ids, [[0, 1]])
    np.testing.assert_array_equal(n_cand, [2])
    # k=3: only 2 items reach 2 hits, so the threshold relaxes to 1; min_count 99 relaxes all the way.
    for mc in (2, 99):
        ids, _, _, n_cand = as_numpy(b.merge_topk(BUCKET_IDS, BUCKET_SCORES, OFFSETS, MEMBERS, WEIGHTS, 3,
                                                  min_count=mc))
        np.testing.assert_array_equal(ids, [[0, 1, 2]])
        np.testing.assert_array_equal(n_cand, [3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_max_and_unweighted(backend):
    b = BACKENDS[backend]
    # max of contributions: item0 max(0.5, 0.5) = 0.5, item1 max(0.25, 0.25) = 0.25, item2 0.5.
    ids, scores, counts, _ = as_numpy(b.merge_topk(BUCKET_IDS, BUCKET_SCORES, OFFSETS, MEMBERS, WEIGHTS, 3,
                                                   agg="max"))
    np.testing.assert_array_equal(ids, [[0, 2, 1]])
    np.testing.assert_array_equal(scores, np.array([[0.5, 0.5, 0.25]], f32))
    np.testing.assert_array_equal(counts, [[2, 1, 2]])
    # weights None = 1, and rep 1 routes buckets 0 and 1, which both hold item 1:
    # item0 0.5 + 2.0, item1 0.5 + 1.0 + 2.0 (3 hits), item2 0.25, item3 1.0.
    bids = np.array([[[0, 1], [0, 1]]], i32)
    bsc = np.array([[[0.5, 0.25], [1.0, 2.0]]], f32)
    ids, scores, counts, n_cand = as_numpy(b.merge_topk(bids, bsc, OFFSETS, MEMBERS, None, 3))
    np.testing.assert_array_equal(ids, [[1, 0, 3]])
    np.testing.assert_array_equal(scores, np.array([[3.5, 2.5, 1.0]], f32))
    np.testing.assert_array_equal(counts, [[3, 2, 1]])
    np.testing.assert_array_equal(n_cand, [4])


def test_threshold_matches_the_literal_loop():
    rng = np.random.default_rng(0)
    for _ in range(300):
        count = rng.integers(1, 6, rng.integers(0, 12))
        k, min_count = int(rng.integers(1, 10)), int(rng.integers(1, 8))
        t = min_count
        while t > 1 and (count >= t).sum() < k:
            t -= 1
        assert reference._threshold(count, k, min_count) == t


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerank_by_hand(backend):
    b = BACKENDS[backend]
    base = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [2, 0]], f32)
    queries = np.array([[1, 0], [0, 0]], f32)
    cands = np.array([[4, 1, -1, 4, 2, 0], [3, 3, 1, -1, -1, -1]], i32)
    ids, dist, n_unique = as_numpy(b.rerank_topk(queries, base, cands, 3, "ip"))
    np.testing.assert_array_equal(ids, [[4, 0, 2], [1, 3, -1]])  # query 1: all distances 0, ties by id
    np.testing.assert_array_equal(dist, np.array([[-2, -1, -1], [0, 0, np.inf]], f32))
    np.testing.assert_array_equal(n_unique, [4, 2])
    ids, dist, _ = as_numpy(b.rerank_topk(queries, base, cands, 4, "l2"))
    np.testing.assert_array_equal(ids, [[0, 2, 4, 1], [3, 1, -1, -1]])
    np.testing.assert_array_equal(dist, np.array([[0, 1, 1, 2], [0, 1, np.inf, np.inf]], f32))
    ids, dist, _ = as_numpy(b.rerank_topk(queries, base, cands, 4, "cosine"))
    # query 0: cos(0) = 1 for items 0 and 4 -> 0, item 2 -> 1 - 1/sqrt 2, item 1 -> 1; query 1 has zero norm.
    np.testing.assert_array_equal(ids, [[0, 4, 2, 1], [1, 3, -1, -1]])
    np.testing.assert_allclose(dist[0], [0, 0, 1 - 1 / np.sqrt(2), 1], rtol=1e-6)
    np.testing.assert_array_equal(dist[1], np.array([1, 1, np.inf, np.inf], f32))
    # the same candidates in CSR form
    csr = (np.array([0, 6, 9], np.int64), np.array([4, 1, -1, 4, 2, 0, 3, 3, 1], i32))
    assert_same(b.rerank_topk(queries, base, csr, 4, "cosine"), (ids, dist, np.array([4, 2], i32)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_rows_by_hand(backend):
    x = np.array([[1.0, np.nan, 3.0, 3.0, -np.inf], [0.0, -0.0, np.nan, np.nan, 2.0]], f32)
    idx, vals = as_numpy(BACKENDS[backend].topk_rows(x, 6))
    np.testing.assert_array_equal(idx, [[2, 3, 0, 4, 1, -1], [4, 0, 1, 2, 3, -1]])
    want = np.array([[3, 3, 1, -np.inf, np.nan, -np.inf], [2, 0, -0.0, np.nan, np.nan, -np.inf]], f32)
    np.testing.assert_array_equal(vals, want)
    assert np.signbit(vals[1, 2])  # values are returned as given (-0.0 stays -0.0)


@pytest.mark.parametrize("backend", ["host", "reference"])
def test_balanced_assign_by_hand(backend):
    b = BACKENDS[backend]
    # 3 buckets, counts start at 0. Items 0-1 prefer (0, 1), item 2 (1, 0), item 3 nothing, item 4 (2, 2),
    # item 5 (1, 1). item0 -> 0 (tie: the better-scored); item1 -> 1; item2 -> 1 (tie (1, 1): its first);
    # item3 -> 2, the least-filled overall; item4 -> 2; item5 -> 1.
    cand = np.array([[[0, 1], [0, 1], [1, 0], [-1, -1], [2, 2], [1, 1]]], i32)
    np.testing.assert_array_equal(b.balanced_assign(cand, 3), [[0, 1, 1, 2, 2, 1]])
    # capacity 2: bucket 1 is full when item5 comes, so it goes to the least-filled bucket, 0.
    np.testing.assert_array_equal(b.balanced_assign(cand, 3, capacity=2), [[0, 1, 1, 2, 2, 0]])
    # bucket 0 starts full at capacity 3: items 0-2 go to 1 (then full), items 3-5 to 2.
    init = np.array([[3, 0, 0]], np.int64)
    np.testing.assert_array_equal(b.balanced_assign(cand, 3, capacity=3, initial_counts=init),
                                  [[1, 1, 1, 2, 2, 2]])
    # reversed order: item5 -> 1, item4 -> 2, item3 -> 0 (all at 1: smallest id), item2 -> 1, item1 -> 0,
    # item0 -> 0 (tie (2, 2): its first).
    order = np.array([[5, 4, 3, 2, 1, 0]], np.int64)
    np.testing.assert_array_equal(b.balanced_assign(cand, 3, order=order), [[0, 0, 1, 0, 2, 1]])


def random_assign_problem(rng, R, N, K, B):
    cand = rng.integers(-1, B, (R, N, K)).astype(i32)
    cand[rng.random((R, N)) < 0.05] = -1
    order = np.stack([rng.permutation(N) for _ in range(R)])
    init = rng.integers(0, 5, (R, B)).astype(np.int64)
    return cand, order, init


@pytest.mark.parametrize("K", [1, 3])
def test_balanced_assign_matches_reference(K):
    rng = np.random.default_rng(K)
    R, N, B = 3, 400, 17
    cand, order, init = random_assign_problem(rng, R, N, K, B)
    cap = (N + int(init.sum(axis=1).max()) + B - 1) // B  # tight: overflow is common
    for kw in ({}, {"order": order}, {"order": order.astype(i32), "capacity": cap},
               {"capacity": cap, "initial_counts": init}, {"order": order, "capacity": cap + 3,
                                                           "initial_counts": init}):
        got = host.balanced_assign(cand, B, n_threads=2, **kw)
        np.testing.assert_array_equal(got, reference.balanced_assign(cand, B, **kw))
        if "capacity" in kw:
            start = kw.get("initial_counts", np.zeros((R, B), np.int64))
            for r in range(R):
                filled = np.bincount(got[r], minlength=B) + start[r]
                assert (filled <= np.maximum(kw["capacity"], start[r])).all()


def test_balanced_assign_overflow_is_fast():
    # every item wants bucket 0: all but `capacity` of them overflow to the global least-filled bucket.
    R, N, B = 2, 200_000, 4096
    cand = np.zeros((R, N, 2), i32)
    got = host.balanced_assign(cand, B, capacity=(N + B - 1) // B)
    for r in range(R):
        counts = np.bincount(got[r], minlength=B)
        assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("n_threads", [1, 2, 3, 0])
def test_host_thread_counts_agree(n_threads):
    rng = np.random.default_rng(1)
    Q, R, m, N, B, d = 37, 3, 4, 300, 20, 9
    offsets = np.zeros((R, B + 1), i32)
    members = np.zeros((R, N), i32)
    for r in range(R):
        bucket = rng.integers(0, B, N)
        members[r] = np.argsort(bucket, kind="stable")
        offsets[r, 1:] = np.cumsum(np.bincount(bucket, minlength=B))
    bids = rng.integers(-1, B, (Q, R, m)).astype(i32)
    bsc = rng.random((Q, R, m), dtype=f32)
    args = (bids, bsc, offsets, members, None, 7, 2)
    assert_same(host.merge_topk(*args, n_threads=n_threads), reference.merge_topk(*args))
    base = rng.standard_normal((N, d), dtype=f32)
    queries = rng.standard_normal((Q, d), dtype=f32)
    cands = rng.integers(-1, N, (Q, 50)).astype(i32)
    assert_same(host.rerank_topk(queries, base, cands, 5, "l2", n_threads=n_threads),
                reference.rerank_topk(queries, base, cands, 5, "l2"))
    x = rng.standard_normal((Q, 30), dtype=f32)
    assert_same(host.topk_rows(x, 4, n_threads=n_threads), reference.topk_rows(x, 4))
    cand, order, init = random_assign_problem(rng, 5, 60, 2, 7)
    np.testing.assert_array_equal(host.balanced_assign(cand, 7, order, 12, init, n_threads=n_threads),
                                  reference.balanced_assign(cand, 7, order, 12, init))


@pytest.mark.parametrize("d", [1, 7, 8, 9, 16, 50])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_rerank_every_dimension_matches_reference(d, metric):
    rng = np.random.default_rng(d)
    base = rng.standard_normal((40, d), dtype=f32)
    queries = rng.standard_normal((6, d), dtype=f32)
    cands = rng.integers(-1, 40, (6, 30)).astype(i32)
    assert_same(host.rerank_topk(queries, base, cands, 8, metric), reference.rerank_topk(queries, base, cands, 8,
                                                                                           metric))


@pytest.mark.parametrize("d", [1, 9, 50])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_rerank_runs_match_ids_and_reference(d, metric):
    """Candidates as runs of consecutive rows (overlapping, empty and repeated runs) give the same
    results as the same rows listed as ids, in the C++ kernel and the reference."""
    rng = np.random.default_rng(d)
    base = rng.standard_normal((60, d), dtype=f32)
    queries = rng.standard_normal((5, d), dtype=f32)
    run_offsets = np.array([0, 3, 3, 4, 7, 9], np.int64)
    starts = rng.integers(0, 50, 9).astype(i32)
    lens = rng.integers(0, 11, 9).astype(i32)
    lens[0] = 0
    starts[5] = starts[4]  # a repeated run counts once
    lens[5] = lens[4]
    runs = (run_offsets, starts, lens)
    ids = [np.concatenate([np.arange(a, a + n) for a, n in zip(starts[run_offsets[q]:run_offsets[q + 1]],
                                                                 lens[run_offsets[q]:run_offsets[q + 1]])]
                          + [np.zeros(0, int)]) for q in range(5)]
    csr = (np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64),
           np.concatenate(ids).astype(i32))
    got = host.rerank_topk(queries, base, runs, 8, metric)
    assert_same(got, reference.rerank_topk(queries, base, runs, 8, metric))
    assert_same(got, host.rerank_topk(queries, base, csr, 8, metric))


@pytest.mark.parametrize("d", [1, 9, 50, 300])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_rerank_shared_runs_match_reference(d, metric):
    """Many queries probing the same long runs (the kernel scans them leaf-major, 8 rows at a time, in
    tiles: at d = 300 a run spans several), with duplicate rows (ties by id), zero and NaN rows, and
    several threads: the reference's bits, whatever the query order."""
    rng = np.random.default_rng(d)
    base = rng.standard_normal((700, d), dtype=f32)
    base[100:110] = base[5]  # exact ties
    base[200:203] = 0.0  # cosine's zero norm
    base[300, 0] = np.nan
    queries = rng.standard_normal((64, d), dtype=f32)
    queries[3] = base[5]
    leaves = np.array([0, 37, 150, 151, 420, 699, 700])  # runs between consecutive bounds
    pick = rng.integers(0, len(leaves) - 1, (64, 3))
    starts, lens = leaves[pick].astype(i32).ravel(), (leaves[pick + 1] - leaves[pick]).astype(i32).ravel()
    runs = (np.arange(0, 64 * 3 + 1, 3, dtype=np.int64), starts, lens)
    want = reference.rerank_topk(queries, base, runs, 12, metric)
    for threads in (1, 3):
        assert_same(host.rerank_topk(queries, base, runs, 12, metric, n_threads=threads), want)
    order = rng.permutation(64)  # queries in another order: each query's own answer
    runs_perm = (runs[0], starts.reshape(64, 3)[order].ravel(), lens.reshape(64, 3)[order].ravel())
    assert_same(host.rerank_topk(queries[order], base, runs_perm, 12, metric), tuple(a[order] for a in want))


def test_rerank_portable_path_matches_reference():
    """The non-AVX2 distance loops (forced with JAXIDX_NO_AVX2), over ids and runs, give the same bits."""
    code = """
import numpy as np
from jaxidx.search import host, reference
rng = np.random.default_rng(0)
for d in (3, 8, 50):
    base = rng.standard_normal((40, d), dtype=np.float32)
    queries = rng.standard_normal((6, d), dtype=np.float32)
    cands = rng.integers(-1, 40, (6, 30)).astype(np.int32)
    runs = (np.arange(7, dtype=np.int64) * 2, rng.integers(0, 20, 12).astype(np.int32),
            rng.integers(0, 21, 12).astype(np.int32))
    for metric in ("ip", "cosine", "l2"):
        for c in (cands, runs):
            for got, want in zip(host.rerank_topk(queries, base, c, 8, metric),
                                 reference.rerank_topk(queries, base, c, 8, metric)):
                assert got.tobytes() == want.tobytes(), (d, metric)
"""
    env = dict(os.environ, JAXIDX_NO_AVX2="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_lane_sum_order():
    x = np.arange(1, 20, dtype=f32)  # lanes: a_l = sum of x[i] for i = l mod 8
    a = [x[lane::8].sum(dtype=f32) for lane in range(8)]
    want = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
    assert reference.lane_sum(x) == want
    rng = np.random.default_rng(0)
    t = rng.standard_normal((5, 37), dtype=f32)
    np.testing.assert_array_equal(np.asarray(device.lane_sum(t)), reference.lane_sum(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shapes(backend):
    b = BACKENDS[backend]
    offsets = np.zeros((2, 4), i32)
    ids, scores, counts, n_cand = as_numpy(b.merge_topk(np.zeros((3, 2, 2), i32), np.ones((3, 2, 2), f32), offsets,
                                                        np.zeros((2, 0), i32), None, 2))
    np.testing.assert_array_equal(ids, -np.ones((3, 2)))
    np.testing.assert_array_equal(scores, np.full((3, 2), -np.inf, f32))
    np.testing.assert_array_equal(n_cand, [0, 0, 0])
    ids, dist, n_unique = as_numpy(b.rerank_topk(np.ones((0, 4), f32), np.ones((5, 4), f32), np.zeros((0, 3), i32),
                                                 2))
    assert ids.shape == (0, 2) and dist.shape == (0, 2) and n_unique.shape == (0,)
    ids, dist, n_unique = as_numpy(b.rerank_topk(np.ones((2, 4), f32), np.ones((5, 4), f32), np.zeros((2, 0), i32),
                                                 2))
    np.testing.assert_array_equal(ids, -np.ones((2, 2)))
    np.testing.assert_array_equal(n_unique, [0, 0])
    idx, vals = as_numpy(b.topk_rows(np.zeros((2, 0), f32), 1))
    np.testing.assert_array_equal(idx, [[-1], [-1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_nan_and_inf(backend):
    # inf * 0 weight = NaN; NaN ranks after every number; max propagates NaN.
    offsets = np.array([[0, 2, 4]], i32)
    members = np.array([[0, 1, 1, 2]], i32)
    weights = np.array([[1.0, 0.0, 1.0, 1.0]], f32)
    bids = np.array([[[0, 1]]], i32)
    bsc = np.array([[[np.inf, -2.0]]], f32)
    for agg in ("sum", "max"):
        ids, scores, counts, _ = as_numpy(BACKENDS[backend].merge_topk(bids, bsc, offsets, members, weights, 3,
                                                                       agg=agg))
        np.testing.assert_array_equal(ids, [[0, 2, 1]])
        np.testing.assert_array_equal(scores, np.array([[np.inf, -2.0, np.nan]], f32))
        np.testing.assert_array_equal(counts, [[1, 1, 2]])


def test_n_items_default_and_bound():
    args = (BUCKET_IDS, BUCKET_SCORES, OFFSETS, MEMBERS, WEIGHTS, 3)
    assert_same(host.merge_topk(*args, n_items=5), host.merge_topk(*args))
    assert_same(host.merge_topk(*args, n_items=1000), reference.merge_topk(*args))
    # Item 4 is only in repetition 1's bucket 2: unrouted, it is not read and not checked ...
    for b in (host, reference):
        assert_same(b.merge_topk(*args, n_items=4), reference.merge_topk(*args))
    # ... routed, it is refused; without n_items every member is scanned, routed or not.
    routed = BUCKET_IDS.copy()
    routed[0, 1, 1] = 2
    negative = MEMBERS.copy()
    negative[1, 4] = -3
    for b in (host, reference):
        with pytest.raises(ValueError, match="members"):
            b.merge_topk(routed, *args[1:], n_items=4)
        with pytest.raises(ValueError, match="members"):
            b.merge_topk(BUCKET_IDS, BUCKET_SCORES, OFFSETS, negative, WEIGHTS, 3)


def test_huge_n_items_costs_no_scratch():
    """n_items = 2^31 (the largest valid) over a few routed items: the per-thread scratch spans the routed
    ids, not n_items, so the merges run in a 4 GiB address space (they used to raise MemoryError)."""
    code = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
import numpy as np
from jaxidx.search import host, reference
b = np.zeros((2, 2, 2), np.int32)
off = np.array([[0, 2, 4, 7], [0, 2, 4, 7]], np.int32)
mem = np.arange(14, dtype=np.int32).reshape(2, 7) % 5
for got, want in zip(host.merge_candidates(b, off, mem, 1, 2, 2**31, 0),
                     reference.merge_candidates(b, off, mem, 1, 2, 2**31)):
    assert got.tobytes() == want.tobytes()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_scratch_kept_across_calls_stays_clean():
    """Per-item scratch outlives a call (and a call that fails part-way drops its own): calls of
    growing and shrinking size, with failing calls between them, all equal the reference."""
    from jaxidx.partition import Partition

    rng = np.random.default_rng(5)
    for N in (50, 6000, 20, 6000, 300):
        R, B, Q, m = 3, 8, 40, 3
        part = Partition.from_assignment(rng.integers(0, B, (R, N)).astype(i32), B)
        bids = rng.integers(-1, B, (Q, R, m)).astype(i32)
        bsc = (rng.integers(-16, 17, (Q, R, m)) / 8).astype(f32)
        bad = part.members.copy()
        bad[0, 0] = N  # in repetition 0's first non-empty bucket, which every query routes to
        first = np.full_like(bids, np.argmax(np.diff(part.offsets[0]) > 0))
        for b in (host, reference):
            with pytest.raises(ValueError, match="members"):
                b.merge_topk(first, bsc, part.offsets, bad, None, 5, 2, "sum", N, 2)
        args = (bids, bsc, part.offsets, part.members, None, 5, 2, "sum", N)
        assert_same(host.merge_topk(*args, 2), reference.merge_topk(*args))
        cand = (bids, part.offsets, part.members, 2, 5, N)
        assert_same(host.merge_candidates(*cand, 2), reference.merge_candidates(*cand))
        queries, base = rng.random((Q, 4), dtype=f32), rng.random((N, 4), dtype=f32)
        ids = rng.integers(-1, N, (Q, 30)).astype(i32)
        assert_same(host.rerank_topk(queries, base, ids, 3, "l2", 2), reference.rerank_topk(queries, base, ids, 3, "l2"))


def test_csr_to_padded():
    padded = device.csr_to_padded(np.array([0, 2, 2, 5]), np.array([7, 8, 1, 2, 3, 99], i32))
    np.testing.assert_array_equal(padded, [[7, 8, -1], [-1, -1, -1], [1, 2, 3]])


def test_device_merge_under_jit():
    import jax

    fn = jax.jit(lambda *a: device.merge_topk(*a, k=3, max_bucket_size=2))
    assert_same(fn(BUCKET_IDS, BUCKET_SCORES, OFFSETS, MEMBERS, WEIGHTS),
                reference.merge_topk(BUCKET_IDS, BUCKET_SCORES, OFFSETS, MEMBERS, WEIGHTS, 3))
    assert device.max_bucket_size_of(OFFSETS) == 2


def test_package_exports_host():
    assert search.merge_topk is host.merge_topk and search.balanced_assign is host.balanced_assign


# --- validation -------------------------------------------------------------------

def merge_case(**change):
    args = dict(bucket_ids=BUCKET_IDS, bucket_scores=BUCKET_SCORES, offsets=OFFSETS, members=MEMBERS,
                weights=WEIGHTS, k=2)
    args.update(change)
    return args


MERGE_BAD = {
    "bucket_ids": [BUCKET_IDS.astype(np.int64), BUCKET_IDS[0], np.asfortranarray(np.zeros((2, 2, 2), i32))[:1],
                   BUCKET_IDS + 3, BUCKET_IDS - 2, BUCKET_IDS.tolist()],
    "bucket_scores": [BUCKET_SCORES.astype(np.float64), BUCKET_SCORES[..., :1], BUCKET_SCORES[:, :, ::-1]],
    "offsets": [OFFSETS.astype(np.int64), OFFSETS[:1], OFFSETS[:, ::-1].copy(), OFFSETS + 1,
                np.array([[0, 2, 3, 3], [0, 2, 4, 6]], i32), np.zeros((2, 0), i32)],
    "members": [MEMBERS.astype(np.uint32), MEMBERS[:1], np.array([[0, 1, -2, -1, -1], [1, 3, 0, 1, 4]], i32),
                MEMBERS.T.copy().T],
    "weights": [WEIGHTS.astype(np.float64), WEIGHTS[:, :4], WEIGHTS[None]],
    "k": [0, -1],
    "min_count": [0],
    "agg": ["mean"],
    "n_items": [-2],
    "n_threads": [-1],
}


@pytest.mark.parametrize("backend", ["host", "reference"])
@pytest.mark.parametrize("name,bad", [(n, v) for n, vs in MERGE_BAD.items() for v in vs])
def test_merge_validation(backend, name, bad):
    with pytest.raises(ValueError, match=name):
        BACKENDS[backend].merge_topk(**merge_case(**{name: bad}))


def rerank_case(**change):
    rng = np.random.default_rng(0)
    args = dict(queries=rng.random((2, 3), dtype=f32), base=rng.random((6, 3), dtype=f32),
                candidates=np.array([[0, 5, -1], [2, 2, 1]], i32), k=2, metric="ip")
    args.update(change)
    return args


CSR_OFFSETS = np.array([0, 2, 3], np.int64)
CSR_IDS = np.array([0, 5, 1], i32)
RERANK_BAD = {
    "queries": [np.zeros((2, 3)), np.zeros(3, f32), np.zeros((2, 6), f32)[:, ::2], np.zeros((2, 4), f32)],
    "base": [np.zeros((6, 3), np.float16), np.zeros((6, 3, 1), f32), np.zeros((6, 6), f32)[:, ::2]],
    "candidates": [np.array([[0, 6, -1], [2, 2, 1]], i32), np.array([[0, -2, -1], [2, 2, 1]], i32),
                   np.zeros((2, 3), np.int64), np.zeros((3, 3), i32), np.zeros(3, i32)],
    "cand_offsets": [(np.array([0, 2, 1], np.int64), CSR_IDS), (np.array([1, 2, 3], np.int64), CSR_IDS),
                     (np.array([0, 2, 4], np.int64), CSR_IDS), (np.array([0, 3], np.int64), CSR_IDS),
                     (CSR_OFFSETS.astype(np.uint64), CSR_IDS)],
    "cand_ids": [(CSR_OFFSETS, np.array([0, 6, 1], i32)), (CSR_OFFSETS, CSR_IDS.astype(np.int64)),
                 (CSR_OFFSETS, CSR_IDS[None])],
    "k": [0],
    "metric": ["dot"],
    "n_threads": [-3],
}
RUN_OFFSETS = np.array([0, 1, 2], np.int64)
RUN_STARTS = np.array([0, 3], i32)
RUN_LENS = np.array([2, 3], i32)
RERANK_RUNS_BAD = {
    "run_starts": [(RUN_OFFSETS, np.array([0, 4], i32), RUN_LENS), (RUN_OFFSETS, np.array([-1, 3], i32), RUN_LENS),
                   (RUN_OFFSETS, RUN_STARTS.astype(np.int64), RUN_LENS)],
    "run_lens": [(RUN_OFFSETS, RUN_STARTS, np.array([-1, 3], i32)), (RUN_OFFSETS, RUN_STARTS, RUN_LENS[:1]),
                 (RUN_OFFSETS, RUN_STARTS, RUN_LENS.astype(np.int64))],
    "cand_offsets": [(np.array([0, 2, 1], np.int64), RUN_STARTS, RUN_LENS),
                     (np.array([0, 1, 3], np.int64), RUN_STARTS, RUN_LENS)],
}


@pytest.mark.parametrize("backend", ["host", "reference"])
@pytest.mark.parametrize("name,bad", [(n, v) for n, vs in RERANK_BAD.items() for v in vs])
def test_rerank_validation(backend, name, bad):
    key = "candidates" if name.startswith("cand_") else name
    with pytest.raises(ValueError, match=name):
        BACKENDS[backend].rerank_topk(**rerank_case(**{key: bad}))


@pytest.mark.parametrize("backend", ["host", "reference"])
@pytest.mark.parametrize("name,bad", [(n, v) for n, vs in RERANK_RUNS_BAD.items() for v in vs])
def test_rerank_runs_validation(backend, name, bad):
    with pytest.raises(ValueError, match=name):
        BACKENDS[backend].rerank_topk(**rerank_case(candidates=bad))


@pytest.mark.parametrize("backend", ["host", "reference"])
def test_topk_rows_validation(backend):
    b = BACKENDS[backend]
    for bad in (np.zeros((2, 3)), np.zeros(3, f32), np.zeros((2, 6), f32)[:, ::2], [[1.0]]):
        with pytest.raises(ValueError, match="x"):
            b.topk_rows(bad, 1)
    with pytest.raises(ValueError, match="k"):
        b.topk_rows(np.zeros((2, 3), f32), 0)


def assign_case(**change):
    args = dict(candidates=np.zeros((2, 4, 2), i32), n_buckets=3, order=np.tile(np.arange(4), (2, 1)),
                capacity=0, initial_counts=np.zeros((2, 3), np.int64))
    args.update(change)
    return args


ASSIGN_BAD = {
    "candidates": [np.zeros((2, 4, 2), np.int64), np.zeros((2, 4), i32), np.full((2, 4, 2), 3, i32),
                   np.full((2, 4, 2), -2, i32)],
    "n_buckets": [0],
    "order": [np.zeros((2, 4), np.int64), np.tile(np.arange(4), (2, 1)).astype(np.float32),
              np.tile(np.arange(4), (3, 1)), np.tile(np.arange(1, 5), (2, 1)), np.tile(np.arange(4), (2, 2))[:, ::2]],
    "capacity": [-1, 1],
    "n_choices": [-1],
    "initial_counts": [np.zeros((2, 3), i32), np.zeros((2, 4), np.int64), -np.ones((2, 3), np.int64)],
    "n_threads": [-1],
}


@pytest.mark.parametrize("backend", ["host", "reference"])
@pytest.mark.parametrize("name,bad", [(n, v) for n, vs in ASSIGN_BAD.items() for v in vs])
def test_assign_validation(backend, name, bad):
    with pytest.raises(ValueError, match=name):
        BACKENDS[backend].balanced_assign(**assign_case(**{name: bad}))


def test_device_validates_options():
    with pytest.raises(ValueError, match="k"):
        device.topk_rows(np.zeros((2, 3), f32), 0)
    with pytest.raises(ValueError, match="agg"):
        device.merge_topk(**merge_case(agg="mean"))
    with pytest.raises(ValueError, match="min_count"):
        device.merge_topk(**merge_case(min_count=0))
    with pytest.raises(ValueError, match="metric"):
        device.rerank_topk(**rerank_case(metric="dot"))
