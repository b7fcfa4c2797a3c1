"""XMC repository reader/writer: valid forms, every error path, round trip, fuzzing, real data."""
import os
import tempfile
import time

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxidx.data import read_xmc, write_xmc


def _write(tmp_path, content, name="data.txt"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_valid_forms(tmp_path):
    text = (
        "6 5 4\n"
        "0,2 0:1 3:0.5\n"   # labels and features
        " 1:2\n"            # no labels, leading space
        "4:1.5 2:3\n"       # no labels, starts with f:v (ids unsorted on purpose)
        "\n"                # nothing at all
        "3,3,1\n"           # repeated label collapses; no features
        "1 2:0\n"           # explicit zero is dropped
    )
    X, Y = read_xmc(_write(tmp_path, text))
    assert X.dtype == np.float32 and Y.dtype == np.float32 and X.has_sorted_indices
    np.testing.assert_array_equal(X.toarray(), [[1, 0, 0, .5, 0], [0, 2, 0, 0, 0], [0, 0, 3, 0, 1.5],
                                                [0] * 5, [0] * 5, [0] * 5])
    np.testing.assert_array_equal(Y.toarray(), [[1, 0, 1, 0], [0] * 4, [0] * 4, [0] * 4, [0, 1, 0, 1],
                                                [0, 1, 0, 0]])


def test_crlf_and_missing_final_newline(tmp_path):
    X, Y = read_xmc(_write(tmp_path, "2 3 2\r\n1 0:1\r\n0 2:2"))
    np.testing.assert_array_equal(X.toarray(), [[1, 0, 0], [0, 0, 2]])
    np.testing.assert_array_equal(Y.toarray(), [[0, 1], [1, 0]])


def test_last_example_may_be_empty_line(tmp_path):
    X, Y = read_xmc(_write(tmp_path, "2 3 2\n1 0:1\n\n"))
    assert X.shape == (2, 3) and X.nnz == 1 and Y.nnz == 1


@pytest.mark.parametrize("content, line, words", [
    ("", 1, "empty file"),
    ("  \n\n", 1, "empty file"),
    ("2 3\n0 0:1\n0 0:1\n", 1, "bad header"),
    ("2 3 2 7\n0 0:1\n0 0:1\n", 1, "bad header"),
    ("a 3 2\n0 0:1\n", 1, "bad header"),
    ("1.5 3 2\n0 0:1\n", 1, "bad header"),
    ("\n0 0:1\n", 1, "bad header"),
    ("0 3 2\n", 1, "positive"),
    ("1 -3 2\n0 0:1\n", 1, "positive"),
    ("1 3 0\n0 0:1\n", 1, "positive"),
    ("1 3000000000 2\n0 2999999999:1\n", 1, "at most 2^31 - 1"),  # the id would wrap around in int32
    ("1 3 99999999999999999999\n0 0:1\n", 1, "at most 2^31 - 1"),  # was an OverflowError
    ("1_0 3 2\n0 0:1\n", 1, "bad header"),
    ("1 3 2\n0 1_0:1\n", 2, "bad feature id"),
    ("1 3 2\n\u0661 0:1\n", 2, "bad label id"),  # a non-ASCII digit
    ("3 3 2\n0 0:1\n1 1:1\n", 4, "3 examples"),       # too few lines
    ("1 3 2\n0 0:1\n1 1:1\n", 3, "1 examples"),       # too many lines
    ("1 3 2\n0 0:1\n\n", 3, "1 examples"),            # an extra empty line is an extra example
    ("2 3 2\n0 0:1\n1 3:1\n", 3, "feature id 3 out of range"),
    ("1 3 2\n0 -1:1\n", 2, "feature id -1 out of range"),
    ("1 3 2\n2 0:1\n", 2, "label id 2 out of range"),
    ("1 3 2\n-1 0:1\n", 2, "label id -1 out of range"),
    ("1 3 2\nx 0:1\n", 2, "bad label id"),
    ("1 3 2\n0,,1 0:1\n", 2, "bad label id"),
    ("1 3 2\n0, 0:1\n", 2, "bad label id"),
    ("1 3 2\n0 0:1 5\n", 2, "malformed feature token"),
    ("1 3 2\n0 a:1\n", 2, "bad feature id"),
    ("1 3 2\n0 :1\n", 2, "bad feature id"),
    ("1 3 2\n0 1.5:1\n", 2, "bad feature id"),
    ("1 3 2\n0 0:\n", 2, "non-numeric"),
    ("1 3 2\n0 0:abc\n", 2, "non-numeric"),
    ("1 3 2\n0 0:1:2\n", 2, "non-numeric"),
    ("2 3 2\n0 0:1\n0 0:nan\n", 3, "NaN"),
    ("1 3 2\n0 0:inf\n", 2, "NaN, Inf"),
    ("1 3 2\n0 0:-Infinity\n", 2, "NaN, Inf"),
    ("1 3 2\n0 0:1e39\n", 2, "beyond float32"),
    ("1 3 2\n0 0:1 1:1 0:2\n", 2, "more than once"),
    (b"1 3 2\n0 0:\xff\n", 2, "UTF-8"),
])
def test_errors_name_file_and_line(tmp_path, content, line, words):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError) as err:
        read_xmc(path)
    msg = str(err.value)
    assert f"{path}:{line}:" in msg and words in msg, msg


def _random_xmc(rng, n, d, n_labels):
    X = sp.random(n, d, density=0.2, format="csr", dtype=np.float32, random_state=rng).toarray()
    X[X != 0] = rng.standard_normal(np.count_nonzero(X)) * 10 ** rng.uniform(-6, 6, np.count_nonzero(X))
    Y = (rng.random((n, n_labels)) < 0.1).astype(np.float32)
    X[3] = 0  # a row with no features
    Y[3:5] = 0  # rows with no labels, one of them with features
    return sp.csr_matrix(X), sp.csr_matrix(Y)


def test_write_read_round_trip(tmp_path):
    X, Y = _random_xmc(np.random.default_rng(0), 40, 30, 12)
    path = tmp_path / "rt.txt"
    write_xmc(path, X, Y)
    X2, Y2 = read_xmc(path)
    assert X2.shape == X.shape and Y2.shape == Y.shape
    np.testing.assert_array_equal(X2.toarray(), X.toarray())  # 9 significant digits: exact float32
    np.testing.assert_array_equal(Y2.toarray(), Y.toarray())


def test_write_rejects_row_mismatch(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        write_xmc(tmp_path / "x.txt", sp.csr_matrix((2, 3)), sp.csr_matrix((3, 2)))


def _parse_or_value_error(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fuzz.txt")
        with open(path, "wb") as f:
            f.write(data)
        try:
            X, Y = read_xmc(path)
        except ValueError as e:
            assert str(e).startswith(f"{path}:"), str(e)  # names the file and line
            return
        assert X.shape[0] == Y.shape[0] and np.isfinite(X.data).all()


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _parse_or_value_error(data)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="0123456789 :,\n\r\t-.eEnaif+_", max_size=120),
       st.sampled_from(["", "2 3 2\n", "1 5 5\n", "3 4 3\n"]))
def test_fuzz_near_valid_text(body, header):
    _parse_or_value_error((header + body).encode())


def test_bibtex(shared_xmc):
    X, Y = read_xmc(shared_xmc / "bibtex" / "train.txt")
    assert X.shape == (4880, 1836) and Y.shape == (4880, 159)
    assert set(np.unique(X.data)) == {1.0} and set(np.unique(Y.data)) == {1.0}
    assert 2.3 < Y.nnz / Y.shape[0] < 2.5
    X, Y = read_xmc(shared_xmc / "bibtex" / "test.txt")
    assert X.shape == (2515, 1836) and Y.shape == (2515, 159)


def test_delicious_has_rows_without_labels(shared_xmc):
    X, Y = read_xmc(shared_xmc / "delicious" / "train.txt")
    assert X.shape == (12920, 500) and Y.shape == (12920, 983)
    assert 0 < (np.diff(Y.indptr) == 0).sum() < 100


def test_debian_depends_is_fast(shared_xmc):
    start = time.perf_counter()
    X, Y = read_xmc(shared_xmc / "debian-depends" / "train.txt")
    seconds = time.perf_counter() - start
    assert X.shape == (43691, 20266) and Y.shape == (43691, 17860)
    np.testing.assert_allclose(sp.linalg.norm(X, axis=1)[np.diff(X.indptr) > 0], 1.0, rtol=1e-4)
    assert seconds < 5.0, f"read took {seconds:.1f} s"
