"""tensorflow-datasets builders: build to ArrayRecord without TensorFlow and read back exactly."""
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from jaxidx.data import read_xmc, write_xmc

tfds_builders = pytest.importorskip("jaxidx.data.tfds_builders", reason="tensorflow-datasets not installed")


def _equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and (a != b).nnz == 0


def test_bibtex_round_trip_without_tensorflow(shared_xmc, tmp_path):
    data = tfds_builders.load_tfds("bibtex", tmp_path / "tfds", manual_dir=shared_xmc)
    files = list((tmp_path / "tfds" / "xmc_repository" / "bibtex").rglob("*.array_record-*"))
    assert len(files) == 2  # train and test, ArrayRecord
    X_train, Y_train = read_xmc(shared_xmc / "bibtex" / "train.txt")
    X_test, Y_test = read_xmc(shared_xmc / "bibtex" / "test.txt")
    assert data.name == "bibtex"
    assert _equal(data.X_train, X_train) and _equal(data.Y_train, Y_train)
    assert _equal(data.X_test, X_test) and _equal(data.Y_test, Y_test)
    assert "tensorflow" not in sys.modules
    again = tfds_builders.load_tfds("bibtex", tmp_path / "tfds", manual_dir=shared_xmc)  # prepared: reused
    assert _equal(again.X_train, X_train)


def test_manual_dir_may_be_the_data_set_itself(tmp_path):
    """Empty rows and rows without labels survive the round trip."""
    rng = np.random.default_rng(0)
    X = ((rng.random((9, 7)) < 0.3) * rng.random((9, 7))).astype(np.float32)
    Y = (rng.random((9, 4)) < 0.4).astype(np.float32)
    X[2], Y[2], Y[5] = 0, 0, 0
    X, Y = sp.csr_matrix(X), sp.csr_matrix(Y)
    src = tmp_path / "src"
    src.mkdir()
    write_xmc(src / "train.txt", X, Y)
    write_xmc(src / "test.txt", X[:3], Y[:3])
    data = tfds_builders.load_tfds("delicious", tmp_path / "tfds", manual_dir=src)
    assert _equal(data.X_train, read_xmc(src / "train.txt")[0]) and _equal(data.Y_train, read_xmc(src / "train.txt")[1])
    assert data.X_test.shape == (3, 7) and data.Y_test.shape == (3, 4)


def test_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="valid: bibtex"):
        tfds_builders.load_tfds("mnist", tmp_path)
