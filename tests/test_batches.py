import numpy as np
import scipy.sparse as sp

from jaxidx.train import batches


def test_pad_sparse_rows_equals_dense():
    X = sp.random(20, 15, density=0.2, format="csr", random_state=0, dtype=np.float32)
    X[3] = 0  # an empty row
    X.eliminate_zeros()
    p = batches.pad_sparse_rows(X)
    dense = np.zeros((20, 15), np.float32)
    np.add.at(dense, (np.repeat(np.arange(20), p["idx"].shape[1]), p["idx"].ravel()), p["val"].ravel())
    np.testing.assert_allclose(dense, X.toarray())
    assert p["idx"].shape[1] == max(np.diff(X.indptr))


def test_pad_label_lists():
    Y = sp.csr_matrix(np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], np.float32))
    np.testing.assert_array_equal(batches.pad_label_lists(Y), [[0, 2], [-1, -1], [1, -1]])
    np.testing.assert_array_equal(batches.pad_label_lists(Y, 1), [[0], [-1], [1]])


def test_epoch_covers_every_row_once_with_filler_weight_zero():
    n, bs = 10, 4
    order = batches.epoch_order(n, seed=3, epoch=1)
    seen, weights = [], []
    for i in range(batches.steps_per_epoch(n, bs)):
        rows, w = batches.batch_rows(order, i, bs)
        assert len(rows) == bs
        seen += list(rows[w > 0])
        weights += list(w)
    assert sorted(seen) == list(range(n))
    assert weights.count(0.0) == 2
    np.testing.assert_array_equal(order, batches.epoch_order(n, seed=3, epoch=1))
    assert not np.array_equal(order, batches.epoch_order(n, seed=3, epoch=2))
