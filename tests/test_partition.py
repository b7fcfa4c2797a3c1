import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxidx.partition import Partition, bucket_stats, hash_assignment, murmurhash3_32

# Known values of MurmurHash3_x86_32 on 4-byte little-endian int32 keys (as returned
# by sklearn.utils.murmurhash3_32(key, seed) -> signed int32).
KNOWN = [(0, 0, 593689054), (1, 0, -68075478), (-1, 0, 1982413648), (42, 0, -1134849565),
         (0, 1, 2028806445)]


def test_murmurhash_known_values():
    for key, seed, want in KNOWN:
        assert int(murmurhash3_32(np.array([key]), seed)[0]) == want


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=50), st.integers(0, 2**31 - 1))
def test_murmurhash_matches_sklearn(keys, seed):
    sk = pytest.importorskip("sklearn.utils")
    want = np.array([sk.murmurhash3_32(k, seed=seed) for k in keys], np.int32)
    np.testing.assert_array_equal(murmurhash3_32(np.array(keys), seed), want)


def test_hash_assignment_floor_mod_and_spread():
    a = hash_assignment(10000, 3, 64)
    assert a.shape == (3, 10000) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() < 64
    want = np.mod(murmurhash3_32(np.arange(10000), 2).astype(np.int64), 64)
    np.testing.assert_array_equal(a[2], want)
    # Repetitions differ and every bucket is used.
    assert (a[0] != a[1]).mean() > 0.9
    assert all(len(np.unique(a[r])) == 64 for r in range(3))


def test_partition_csr_roundtrip():
    assign = np.array([[2, 0, 2, 1, 0], [0, 0, 0, 3, 3]])
    p = Partition.from_assignment(assign, 4)
    np.testing.assert_array_equal(p.offsets, [[0, 2, 3, 5, 5], [0, 3, 3, 3, 5]])
    np.testing.assert_array_equal(p.members, [[1, 4, 3, 0, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(p.sizes(), [[2, 1, 2, 0], [3, 0, 0, 2]])
    assert p.max_bucket_size() == 3
    for r in range(2):
        for b in range(4):
            got = p.members[r, p.offsets[r, b]:p.offsets[r, b + 1]]
            np.testing.assert_array_equal(got, np.flatnonzero(assign[r] == b))


def test_partition_rejects_bad_assignment():
    with pytest.raises(ValueError, match="assign"):
        Partition.from_assignment(np.array([[0, 4]]), 4)
    with pytest.raises(ValueError, match="assign"):
        Partition.from_assignment(np.array([0, 1]), 4)


def test_bucket_stats():
    s = bucket_stats(np.array([[4, 0, 2, 2]]))
    assert s["max"] == 4 and s["mean"] == 2 and s["max_over_mean"] == 2 and s["empty_fraction"] == 0.25
