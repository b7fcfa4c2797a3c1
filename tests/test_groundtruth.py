"""exact_knn and knn_labels against a float64 NumPy brute force; the eval_exact entry point."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxidx.data import exact_knn, knn_chunk_sizes, knn_labels
from jaxidx.data.groundtruth import DEFAULT_MEMORY_BUDGET


def _data(rng, n_queries, n_base, dim, metric):
    q = rng.standard_normal((n_queries, dim)).astype(np.float32)
    b = rng.standard_normal((n_base, dim)).astype(np.float32)
    if metric == "angular":
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
    return q, b


def _numpy_knn(q, b, k, metric):
    """float64 brute force, ascending distance, ties to the smaller id (stable sort)."""
    q, b = q.astype(np.float64), b.astype(np.float64)
    if metric == "angular":
        d = 1.0 - q @ b.T
    elif metric == "dot":
        d = -(q @ b.T)
    else:
        d = np.sqrt(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(d, ids, axis=1), d


@pytest.mark.parametrize("metric", ["angular", "euclidean", "dot"])
@pytest.mark.parametrize("n_base, chunk_size", [
    (3000, None),         # one base chunk, grouped top-k
    (3000, (7, 64)),      # many base chunks, plain top-k, ragged last query chunk
    (2500, (16, 1280)),   # grouped top-k over two chunks, the last one padded
    (37, 16),             # base smaller than a group
])
def test_matches_numpy_float64(metric, n_base, chunk_size):
    rng = np.random.default_rng(0)
    q, b = _data(rng, 45, n_base, 12, metric)
    k = 10
    ref_ids, ref_dist, all_d = _numpy_knn(q, b, k, metric)
    ids, dist = exact_knn(q, b, k, metric, chunk_size=chunk_size)
    assert ids.dtype == np.int32 and dist.dtype == np.float32 and ids.shape == (45, k)
    np.testing.assert_allclose(dist, ref_dist, atol=2e-5)
    # ids must agree exactly on queries whose top k+1 distances are apart by more than float32 error
    tie_free = np.diff(np.sort(all_d, axis=1)[:, :k + 1], axis=1).min(axis=1) > 1e-4
    assert tie_free.mean() > 0.8
    np.testing.assert_array_equal(ids[tie_free], ref_ids[tie_free])


@pytest.mark.parametrize("chunk_size", [None, (5, 96), (8, 1600)])
def test_ties_go_to_the_smaller_id(chunk_size):
    rng = np.random.default_rng(1)
    q, b = _data(rng, 20, 800, 6, "euclidean")
    b = np.concatenate([b, b, b])  # every distance appears three times
    ids, dist = exact_knn(q, b, 9, "euclidean", chunk_size=chunk_size)
    ref_ids, _, _ = _numpy_knn(q, b, 9, "euclidean")
    np.testing.assert_array_equal(ids, ref_ids)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_input_checks():
    rng = np.random.default_rng(2)
    q, b = _data(rng, 3, 20, 4, "dot")
    with pytest.raises(ValueError, match="metric"):
        exact_knn(q, b, 2, "cosine")
    with pytest.raises(ValueError, match="k must be"):
        exact_knn(q, b, 21, "dot")
    with pytest.raises(ValueError, match="dimension"):
        exact_knn(q[:, :3], b, 2, "dot")
    bad = b.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        exact_knn(q, bad, 2, "dot")
    with pytest.raises(ValueError, match="chunk_size"):
        exact_knn(q, b, 5, "dot", chunk_size=(2, 4))
    ids, dist = exact_knn(q[:0], b, 2, "dot")
    assert ids.shape == (0, 2) and dist.shape == (0, 2)


def test_chunk_sizes_bound_memory():
    qc, bc = knn_chunk_sizes(10000, 390000, 100)
    assert 3 * 4 * qc * bc <= DEFAULT_MEMORY_BUDGET and bc % 32 == 0
    # base + padded copy + one score block with temporaries stays far below 2 GiB
    assert 2 * 390000 * 50 * 4 + 3 * 4 * qc * bc < 2 << 30
    qc, bc = knn_chunk_sizes(10000, 390000, 100, memory_budget=8 << 20)
    assert 3 * 4 * qc * bc <= 8 << 20
    assert knn_chunk_sizes(3, 50, 10) == (3, 64)


@pytest.mark.parametrize("metric", ["angular", "euclidean"])
def test_knn_labels(metric):
    rng = np.random.default_rng(3)
    _, b = _data(rng, 1, 300, 8, metric)
    points = b[:50]
    L = knn_labels(points, b, 4, metric)
    assert L.shape == (50, 300) and L.nnz == 200 and L.dtype == np.float32
    ref_ids, _, _ = _numpy_knn(points, b, 4, metric)
    np.testing.assert_array_equal(np.sort(ref_ids, axis=1), L.indices.reshape(50, 4))
    assert (ref_ids[:, 0] == np.arange(50)).all()  # a base row is its own nearest neighbour...

    own = knn_labels(points, b, 4, metric, exclude_ids=np.arange(50))
    assert own.nnz == 200 and own[np.arange(50), np.arange(50)].sum() == 0  # ...unless excluded
    ref_ids, _, _ = _numpy_knn(points, b, 5, metric)
    np.testing.assert_array_equal(np.sort(ref_ids[:, 1:], axis=1), own.indices.reshape(50, 4))

    nothing = knn_labels(points, b, 4, metric, exclude_ids=np.full(50, -1))
    assert (nothing != L).nnz == 0
    with pytest.raises(ValueError, match="exclude_ids"):
        knn_labels(points, b, 4, metric, exclude_ids=np.arange(3))


def _eval_exact(*args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(repo, "launch", "eval_exact.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_eval_exact_entry_point(tmp_path):
    out = tmp_path / "exact.json"
    run = _eval_exact("--data=synthetic-ann:n=3000,q=70,d=8,metric=euclidean", "--batch=32", f"--out={out}")
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["recall@10"] == 1.0 and result["recall@10_distance"] == 1.0
    assert result["n_queries"] == 70 and result["query_chunk"] == 32 and result["queries_per_s"] > 0
    assert "recall@10 by distance: 1.000000" in run.stdout

    run = _eval_exact("--data=synthetic-xmc:n=20,test=5")
    assert run.returncode == 1 and "exact search applies to ANN data only" in run.stderr
