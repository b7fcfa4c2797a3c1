"""Balanced label clustering: PIFA features, leaf count, balance, determinism, recovery of clear clusters."""
import numpy as np
import pytest
import scipy.sparse as sp

from jaxidx.clustering import balanced_tree, leaf_members, n_leaves_for, pifa


def test_pifa_hand_case():
    X = sp.csr_matrix(np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]], np.float32))
    Y = sp.csr_matrix(np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32))
    F = pifa(X, Y).toarray()
    s = np.array([0.6, 0.8, 1.0])  # normalised x0 + normalised x1
    np.testing.assert_allclose(F[0], s / np.linalg.norm(s), rtol=1e-6)
    np.testing.assert_allclose(F[1], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(F[2], 0.0)  # a label without examples


def test_n_leaves_is_power_of_two_above_l_over_max_leaf():
    assert n_leaves_for(17860, 100) == 256
    assert n_leaves_for(100, 100) == 1
    assert n_leaves_for(101, 100) == 2
    assert n_leaves_for(159, 10) == 16
    with pytest.raises(ValueError):
        n_leaves_for(0, 10)


@pytest.mark.parametrize("L,C", [(103, 8), (64, 64), (1000, 16)])
def test_leaves_are_balanced_and_deterministic(L, C):
    F = sp.random(L, 40, density=0.2, random_state=np.random.default_rng(L), format="csr", dtype=np.float32)
    leaf = balanced_tree(F, C, seed=3)
    sizes = np.bincount(leaf, minlength=C)
    assert leaf.dtype == np.int32 and sizes.size == C
    assert sizes.min() in (L // C, -(-L // C)) and sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(leaf, balanced_tree(F, C, seed=3))
    np.testing.assert_array_equal(leaf, balanced_tree(F.toarray(), C, seed=3))  # dense input: same tree
    assert not np.array_equal(leaf, balanced_tree(F, C, seed=4)) or C == L


def test_recovers_separated_groups():
    """4 groups of labels on disjoint features land in 4 pure leaves."""
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(4), 25)
    F = np.zeros((100, 40), np.float32)
    for g in range(4):
        F[group == g, 10 * g:10 * g + 10] = rng.random((25, 10))
    leaf = balanced_tree(F, 4, seed=0)
    for g in range(4):
        assert len(set(leaf[group == g])) == 1
    assert len(set(leaf)) == 4


def test_leaf_members_table():
    t = leaf_members(np.array([1, 0, 1, 2, 0], np.int32), 4)
    np.testing.assert_array_equal(t, [[1, 4], [0, 2], [3, -1], [-1, -1]])


def test_bad_leaf_counts():
    F = np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError, match="power of two"):
        balanced_tree(F, 3)
    with pytest.raises(ValueError, match="cannot all be non-empty"):
        balanced_tree(F, 16)
