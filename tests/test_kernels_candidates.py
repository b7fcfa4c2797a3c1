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
