"""balanced_assign's n_choices: least-filled among the first n usable preferences, so a
capacity-capped item falls back to its next preferences in rank order (C++ == NumPy)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxidx.search import host, reference


def test_capped_item_falls_back_in_preference_order():
    # 4 items all prefer 0 > 1 > 2 > 3, capacity 1, one choice: each takes the best non-full bucket.
    cand = np.tile(np.array([0, 1, 2, 3], np.int32), (1, 4, 1))
    for impl in (host, reference):
        np.testing.assert_array_equal(impl.balanced_assign(cand, 4, capacity=1, n_choices=1), [[0, 1, 2, 3]])
        # All choices: least-filled among all four usable preferences - the same here.
        np.testing.assert_array_equal(impl.balanced_assign(cand, 4, capacity=2, n_choices=0), [[0, 1, 2, 3]])
        # Two choices, capacity 2: least-filled of {0, 1} three times (0, 1, 0); bucket 0 is then
        # full, so the last item's first two usable preferences are {1, 2} and 2 is emptier.
        np.testing.assert_array_equal(impl.balanced_assign(cand, 4, capacity=2, n_choices=2), [[0, 1, 0, 2]])
    with pytest.raises(ValueError, match="n_choices"):
        host.balanced_assign(cand, 4, n_choices=-1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.integers(1, 60), st.integers(2, 12), st.integers(1, 6), st.integers(0, 3),
       st.integers(0, 2**31 - 1))
def test_n_choices_host_equals_reference(R, N, B, K, choices, seed):
    rng = np.random.default_rng(seed)
    cand = rng.integers(-1, B, (R, N, K)).astype(np.int32)
    capacity = int(rng.integers(0, 3)) * -(-N // B)
    order = np.stack([rng.permutation(N) for _ in range(R)]).astype(np.int64)
    a = host.balanced_assign(cand, B, order=order, capacity=capacity, n_choices=choices)
    b = reference.balanced_assign(cand, B, order=order, capacity=capacity, n_choices=choices)
    np.testing.assert_array_equal(a, b)
