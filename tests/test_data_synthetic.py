"""Synthetic generators: deterministic, well-formed, and carrying recoverable structure."""
import time

import numpy as np
import pytest
import scipy.sparse as sp

from jaxidx.data import exact_knn, synthetic_ann, synthetic_xmc


def _same_csr(a, b):
    return a.shape == b.shape and (a != b).nnz == 0


@pytest.mark.parametrize("metric", ["angular", "euclidean", "dot"])
def test_synthetic_ann(metric):
    a = synthetic_ann(n_base=2000, n_queries=30, dim=8, n_clusters=5, metric=metric, seed=3)
    b = synthetic_ann(n_base=2000, n_queries=30, dim=8, n_clusters=5, metric=metric, seed=3)
    c = synthetic_ann(n_base=2000, n_queries=30, dim=8, n_clusters=5, metric=metric, seed=4)
    np.testing.assert_array_equal(a.base, b.base)
    np.testing.assert_array_equal(a.gt_ids, b.gt_ids)
    assert not np.array_equal(a.base, c.base)
    assert a.base.shape == (2000, 8) and a.queries.shape == (30, 8) and a.gt_ids.shape == (30, 100)
    assert a.metric == metric and a.base.dtype == np.float32
    if metric == "angular":
        np.testing.assert_allclose(np.linalg.norm(a.base, axis=1), 1.0, rtol=1e-5)
    ids, _ = exact_knn(a.queries, a.base, 100, metric)
    np.testing.assert_array_equal(ids, a.gt_ids)


def test_synthetic_ann_small_base_and_errors():
    a = synthetic_ann(n_base=40, n_queries=3, dim=4, n_clusters=2, seed=0)
    assert a.gt_ids.shape == (3, 40)
    with pytest.raises(ValueError, match="metric"):
        synthetic_ann(metric="cosine")
    with pytest.raises(ValueError):
        synthetic_ann(n_clusters=0)


def test_synthetic_xmc_deterministic_and_well_formed():
    kw = dict(n_train=3000, n_test=600, n_features=800, n_labels=300, labels_per_example=4, features_per_label=8)
    a, b, c = synthetic_xmc(seed=5, **kw), synthetic_xmc(seed=5, **kw), synthetic_xmc(seed=6, **kw)
    for name in ("X_train", "Y_train", "X_test", "Y_test"):
        assert _same_csr(getattr(a, name), getattr(b, name))
    assert not _same_csr(a.Y_train, c.Y_train)
    assert a.X_train.shape == (3000, 800) and a.Y_test.shape == (600, 300)
    for X, Y in ((a.X_train, a.Y_train), (a.X_test, a.Y_test)):
        assert X.dtype == np.float32 and Y.dtype == np.float32 and set(np.unique(Y.data)) == {1.0}
        assert (np.diff(Y.indptr) >= 1).all() and (np.diff(X.indptr) >= 1).all()
        np.testing.assert_allclose(sp.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
        assert (X.data > 0).all()
    mean_labels = a.Y_train.nnz / 3000
    assert 2.5 < mean_labels <= 4.0


def test_synthetic_xmc_is_long_tailed():
    d = synthetic_xmc(n_train=20000, n_test=10, n_labels=2000, labels_per_example=3, seed=0, zipf=1.0)
    freq = np.sort(np.asarray(d.Y_train.sum(axis=0)).ravel())[::-1]
    assert freq[0] > 50 * np.median(freq)
    flat = synthetic_xmc(n_train=20000, n_test=10, n_labels=2000, labels_per_example=3, seed=0, zipf=0.0)
    flat_freq = np.asarray(flat.Y_train.sum(axis=0)).ravel()
    assert flat_freq.max() < 3 * np.median(flat_freq)


def test_synthetic_xmc_labels_recoverable_from_features():
    """Label centroids of training features (PIFA) rank test labels far above popularity."""
    d = synthetic_xmc(n_train=4000, n_test=500, n_features=2000, n_labels=200, seed=1)
    centroids = (d.Y_train.T @ d.X_train).toarray()
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    top1 = np.asarray((d.X_test @ centroids.T).argmax(axis=1)).ravel()
    p_at_1 = np.asarray(d.Y_test[np.arange(500), top1]).mean()
    popular = np.asarray(d.Y_train.sum(axis=0)).ravel().argmax()
    baseline = d.Y_test[:, popular].mean()
    assert p_at_1 > 0.6 and p_at_1 > 2 * baseline


def test_synthetic_xmc_scales():
    start = time.perf_counter()
    d = synthetic_xmc(n_train=100000, n_test=1000, n_features=50000, n_labels=100000, labels_per_example=5,
                      features_per_label=10, seed=0)
    assert d.X_train.shape == (100000, 50000) and d.Y_train.shape == (100000, 100000)
    assert time.perf_counter() - start < 20.0
