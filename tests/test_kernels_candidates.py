"""merge_candidates (the ANN candidate set, CSR): C++ == NumPy, and equal to the set of
merge_topk's candidates when k covers them all."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxidx.partition import Partition
from jaxidx.search import host, reference


def _case(seed, R=3, N=200, B=16, Q=20, m=3):
    rng = np.random.default_rng(seed)
    part = Partition.from_assignment(rng.integers(0, B, (R, N)), B)
    ids = np.stack([np.stack([rng.choice(B, m, replace=False) for _ in range(R)]) for _ in range(Q)]).astype(np.int32)
    ids[0, 0, 0] = -1  # a skipped slot
    return ids, part


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 60))
def test_host_equals_reference_and_merge_topk(seed, min_count, min_candidates):
    ids, part = _case(seed)
    a = host.merge_candidates(ids, part.offsets, part.members, min_count, min_candidates, 200)
    b = reference.merge_candidates(ids, part.offsets, part.members, min_count, min_candidates, 200)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    offs, cand, n = a
    assert offs.dtype == np.int64 and cand.dtype == np.int32
    np.testing.assert_array_equal(np.diff(offs), n)
    # The same set merge_topk scores, once k is large enough to hold all of it.
    scores = np.ones(ids.shape, np.float32)
    top, _, _, n_top = host.merge_topk(ids, scores, part.offsets, part.members, None, 200, min_count, "sum", 200)
    # merge_topk relaxes for k=200; compare with the same relaxation target.
    a200 = host.merge_candidates(ids, part.offsets, part.members, min_count, 200, 200)
    for q in range(len(ids)):
        got = a200[1][a200[0][q]:a200[0][q + 1]]
        assert np.all(np.diff(got) > 0)  # ascending, no duplicates
        np.testing.assert_array_equal(got, np.sort(top[q][top[q] >= 0]))


def test_threshold_relaxes_until_enough_candidates():
    # Two repetitions, 4 items; query hits item 0 in both, items 1, 2 in one each.
    offsets = np.array([[0, 2, 4], [0, 2, 4]], np.int32)
    members = np.array([[0, 1, 2, 3], [0, 2, 1, 3]], np.int32)
    ids = np.array([[[0], [0]]], np.int32)  # bucket 0 in both repetitions
    for impl in (host, reference):
        _, cand, _ = impl.merge_candidates(ids, offsets, members, 2, 1, 4)
        np.testing.assert_array_equal(cand, [0])  # item 0 alone reaches 2 hits
        _, cand, _ = impl.merge_candidates(ids, offsets, members, 2, 2, 4)
        np.testing.assert_array_equal(cand, [0, 1, 2])  # relaxed to 1 hit
    with pytest.raises(ValueError, match="min_count"):
        host.merge_candidates(ids, offsets, members, 0, 1, 4)
    with pytest.raises(ValueError, match="bucket_ids"):
        host.merge_candidates(ids.astype(np.int64), offsets, members, 1, 1, 4)


def _rerank_case(seed, R, N, B, Q, m, d=5):
    ids, part = _case(seed, R, N, B, Q, m)
    rng = np.random.default_rng(seed + 1)
    return rng.standard_normal((Q, d), dtype=np.float32), rng.standard_normal((N, d), dtype=np.float32), ids, part


# Small N: candidates listed from the bitmap; large N with few candidates: sorted.
@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 40), st.sampled_from(["ip", "l2", "cosine"]),
       st.sampled_from([(200, 16, 3), (200000, 16384, 1)]))
def test_merge_rerank_equals_merge_then_rerank(seed, min_count, k, metric, shape):
    N, B, m = shape
    q, base, ids, part = _rerank_case(seed, 3, N, B, 12, m)
    fused = host.merge_rerank_topk(q, base, ids, part.offsets, part.members, k, min_count, metric, 1)
    cand = host.merge_candidates(ids, part.offsets, part.members, min_count, k, N, 1)
    apart = host.rerank_topk(q, base, cand[:2], k, metric, 1)
    ref = reference.merge_rerank_topk(q, base, ids, part.offsets, part.members, k, min_count, metric)
    for x, y, z in zip(fused, (*apart[:2], cand[2]), ref):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    three = host.merge_rerank_topk(q, base, ids, part.offsets, part.members, k, min_count, metric, 3)
    for x, y in zip(fused, three):
        np.testing.assert_array_equal(x, y)


def test_hit_counts_beyond_a_byte():
    # One repetition routed to the same bucket 300 times: 300 hits per member. A threshold up to 255
    # is counted in saturating bytes, a larger one in full counters; both as the reference counts.
    offsets = np.array([[0, 3, 6]], np.int32)
    members = np.array([[0, 1, 2, 3, 4, 5]], np.int32)
    ids = np.zeros((1, 1, 300), np.int32)
    ids[0, 0, :2] = 1  # items 3-5 get 2 hits, items 0-2 get 298
    for min_count, k in ((2, 1), (200, 1), (298, 3), (299, 3), (300, 4)):
        a = host.merge_candidates(ids, offsets, members, min_count, k, 6)
        b = reference.merge_candidates(ids, offsets, members, min_count, k, 6)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(host.merge_candidates(ids, offsets, members, 298, 3, 6)[1], [0, 1, 2])
    np.testing.assert_array_equal(host.merge_candidates(ids, offsets, members, 299, 4, 6)[1], [0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("impl", [host, reference])
@pytest.mark.parametrize("name,change", [
    ("queries", dict(queries=np.zeros((12, 5)))), ("base", dict(base=np.zeros((200, 4), np.float32))),
    ("bucket_ids", dict(bucket_ids=np.zeros((3, 3, 3), np.int32))), ("metric", dict(metric="dot")),
    ("members", dict(base=np.zeros((150, 5), np.float32))), ("min_count", dict(min_count=0)), ("k", dict(k=0))])
def test_merge_rerank_validation(impl, name, change):
    q, base, ids, part = _rerank_case(0, 3, 200, 16, 12, 3)
    args = dict(queries=q, base=base, bucket_ids=ids, offsets=part.offsets, members=part.members, k=5,
                min_count=1, metric="l2")
    with pytest.raises(ValueError, match=name):
        impl.merge_rerank_topk(**{**args, **change})
