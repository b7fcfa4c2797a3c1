"""tree_beam (the second level of ELIAS's cluster tree): C++ == NumPy reference, against every leaf's
log probability computed densely, padding and argument checks."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxidx.search import host, reference


def _problem(seed, Q=6, H=20, G=8, S=4, B=3):
    rng = np.random.default_rng(seed)
    phi = rng.standard_normal((Q, H)).astype(np.float32)
    rows = rng.standard_normal((G * S, H)).astype(np.float32)
    bias = rng.standard_normal(G * S).astype(np.float32)
    groups = np.stack([rng.permutation(G)[:B] for _ in range(Q)]).astype(np.int32)
    group_logp = np.log(rng.dirichlet(np.ones(G), Q)).astype(np.float32)[np.arange(Q)[:, None], groups]
    return phi, groups, np.ascontiguousarray(group_logp), rows, bias, G


def test_leaves_match_a_dense_log_softmax():
    phi, groups, glogp, rows, bias, G = _problem(0)
    S = rows.shape[0] // G
    z = phi.astype(np.float64) @ rows.T.astype(np.float64) + bias  # [Q, C]
    z = z.reshape(len(phi), G, S)
    within = z - z.max(-1, keepdims=True)
    within -= np.log(np.exp(within).sum(-1, keepdims=True))
    for impl in (host, reference):
        ids, logp = impl.tree_beam(phi, groups, glogp, rows, bias, G, 5)
        for q in range(len(phi)):
            want = {int(g) * S + c: glogp[q, j] + within[q, g, c] for j, g in enumerate(groups[q]) for c in range(S)}
            best = sorted(want, key=lambda c: -want[c])[:5]
            np.testing.assert_array_equal(ids[q], best)
            np.testing.assert_allclose(logp[q], [want[c] for c in best], rtol=1e-5, atol=1e-5)


def test_unrouted_groups_and_short_rows_are_padded():
    phi, groups, glogp, rows, bias, G = _problem(1, B=2)
    groups[0, 1] = -1
    groups[1] = -1
    for impl in (host, reference):
        ids, logp = impl.tree_beam(phi, groups, glogp, rows, bias, G, 6)  # row 0: one group of 4 leaves
        assert (ids[0, 4:] == -1).all() and np.isneginf(logp[0, 4:]).all()
        assert ids[0, :4].min() // 4 == groups[0, 0] and (ids[1] == -1).all() and np.isneginf(logp[1]).all()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 9), st.integers(1, 40), st.sampled_from([1, 2, 4, 8]), st.integers(1, 5), st.integers(1, 4),
       st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_host_equals_reference(Q, H, G, S, B, k, seed):
    rng = np.random.default_rng(seed)
    phi = rng.standard_normal((Q, H)).astype(np.float32)
    rows = rng.standard_normal((G * S, H)).astype(np.float32)
    bias = rng.standard_normal(G * S).astype(np.float32)
    groups = rng.integers(-1, G, (Q, B)).astype(np.int32)
    glogp = -rng.random((Q, B)).astype(np.float32) * 3
    a_ids, a_lp = host.tree_beam(phi, groups, glogp, rows, bias, G, k, n_threads=2)
    b_ids, b_lp = reference.tree_beam(phi, groups, glogp, rows, bias, G, k)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_allclose(a_lp, b_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [host, reference])
def test_bad_arguments_name_the_argument(impl):
    phi, groups, glogp, rows, bias, G = _problem(2)
    with pytest.raises(ValueError, match="n_groups"):
        impl.tree_beam(phi, groups, glogp, rows, bias, 3, 4)  # does not divide 32 rows
    with pytest.raises(ValueError, match="groups"):
        impl.tree_beam(phi, np.full_like(groups, G), glogp, rows, bias, G, 4)
    with pytest.raises(ValueError, match="rows"):
        impl.tree_beam(phi, groups, glogp, rows[:, :-1].copy(), bias, G, 4)
    with pytest.raises(ValueError, match="group_logp"):
        impl.tree_beam(phi, groups, glogp[:, :-1].copy(), rows, bias, G, 4)
    with pytest.raises(ValueError, match="bias"):
        impl.tree_beam(phi, groups, glogp, rows, bias.astype(np.float64), G, 4)
    with pytest.raises(ValueError, match="k"):
        impl.tree_beam(phi, groups, glogp, rows, bias, G, 0)
