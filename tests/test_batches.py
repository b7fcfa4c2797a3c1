import numpy as np
import pytest
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


def test_process_shards_concatenate_to_the_global_batch():
    order = batches.epoch_order(10, seed=0, epoch=0)
    for n in (1, 2, 4):
        for index in (0, 2):  # a full batch and the partial last one
            rows, w = batches.batch_rows(order, index, 4)
            parts = [batches.batch_rows(order, index, 4, (k, n)) for k in range(n)]
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), rows)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), w)


def test_process_block_of_the_data_axis():
    from jaxidx.train.mesh import process_block
    # 2 processes x 4 devices, model_parallel 2: mesh [4 data, 2 model]; each process holds half the rows.
    ids = np.repeat([0, 1], 4).reshape(4, 2)
    assert [process_block(ids, p) for p in (0, 1)] == [(0, 2), (1, 2)]
    # model_parallel 4 over 2 processes of 2 devices: every process needs the whole batch.
    assert process_block(np.array([[0, 0, 1, 1]]), 1) == (0, 1)
    assert process_block(np.zeros((8, 1), int), 0) == (0, 1)  # one process
    with pytest.raises(ValueError, match="aligned block"):
        process_block(np.array([[0], [1], [0], [1]]), 0)
