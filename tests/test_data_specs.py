"""Data spec strings: every form, path resolution, and the errors."""
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from jaxidx.data import ANNData, XMCData, load, repo_root, resolve_path, write_xmc


def _xmc_dir(root, name="toy", d=6, n_labels=3, test_d=None):
    folder = root / name
    folder.mkdir(parents=True)
    X = sp.csr_matrix(np.eye(4, d, dtype=np.float32))
    Y = sp.csr_matrix(np.eye(4, n_labels, dtype=np.float32))
    write_xmc(folder / "train.txt", X, Y)
    write_xmc(folder / "test.txt", sp.csr_matrix(np.eye(2, test_d or d, dtype=np.float32)), Y[:2])
    return folder


def test_xmc_dir_and_pair(tmp_path):
    folder = _xmc_dir(tmp_path)
    data = load(f"xmc:{folder}")
    assert isinstance(data, XMCData) and data.name == "toy"
    assert data.X_train.shape == (4, 6) and data.Y_test.shape == (2, 3)
    pair = load(f"xmc:{folder / 'train.txt'},{folder / 'test.txt'}")
    assert pair.name == "toy" and (pair.X_test != data.X_test).nnz == 0


def test_relative_path_resolves_against_cwd_then_repo(tmp_path, monkeypatch):
    _xmc_dir(tmp_path / "here")
    monkeypatch.chdir(tmp_path)
    assert load("xmc:here/toy").name == "toy"  # relative to the current directory
    assert resolve_path("jaxidx/data/specs.py") == repo_root() / "jaxidx/data/specs.py"  # then to the repo


def test_config_style_relative_spec(tmp_path, monkeypatch):
    """Configs say xmc:../shared/data/xmc/bibtex; it must work from any directory."""
    if not (repo_root().parent / "shared" / "data" / "xmc" / "bibtex").is_dir():
        pytest.skip("no shared/data/xmc/bibtex beside the checkout")
    monkeypatch.chdir(tmp_path)
    assert load("xmc:../shared/data/xmc/bibtex").X_train.shape == (4880, 1836)


def test_short_names(shared_xmc):
    data = load("bibtex")
    assert data.name == "bibtex" and data.X_train.shape == (4880, 1836) and data.Y_train.shape == (4880, 159)
    assert data.X_test.shape == (2515, 1836)
    assert load("delicious").Y_train.shape == (12920, 983)


def test_short_names_follow_env(tmp_path, monkeypatch):
    _xmc_dir(tmp_path, name="bibtex", d=5)
    monkeypatch.setenv("JAXIDX_SHARED_DATA", str(tmp_path))
    assert load("bibtex").X_train.shape == (4, 5)
    with pytest.raises(ValueError, match="no train.txt and test.txt"):
        load("delicious")


def test_dimension_mismatch(tmp_path):
    folder = _xmc_dir(tmp_path, test_d=7)
    with pytest.raises(ValueError, match="train has 6 features"):
        load(f"xmc:{folder}")


def test_ann_hdf5(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.hdf5"
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = "euclidean"
        f["train"] = rng.standard_normal((20, 3)).astype(np.float32)
        f["test"] = rng.standard_normal((2, 3)).astype(np.float32)
        f["neighbors"] = np.zeros((2, 5), np.int32)
        f["distances"] = np.zeros((2, 5), np.float32)
    data = load(f"ann-hdf5:{path}")
    assert isinstance(data, ANNData) and data.n_items == 20


def test_synthetic_specs():
    a = load("synthetic-ann:n=300,q=4,d=6,clusters=3,metric=euclidean,seed=2")
    assert a.base.shape == (300, 6) and a.metric == "euclidean" and a.queries.shape == (4, 6)
    assert isinstance(load("synthetic-ann"), ANNData)  # every key is optional
    big = load("synthetic-ann:n=300,q=4,d=6,clusters=3,metric=euclidean,seed=2,scale=100,offset=128")
    np.testing.assert_allclose(big.base, a.base * 100 + 128, rtol=1e-5)
    np.testing.assert_array_equal(big.gt_ids[:, :5], a.gt_ids[:, :5])  # the same neighbours, scaled
    assert load(big.name).fingerprint() == big.fingerprint()  # its name is its spec
    x = load("synthetic-xmc:n=50,test=10,features=40,labels=12,per_example=2,per_label=3,zipf=0.5,seed=1")
    assert x.X_train.shape == (50, 40) and x.Y_test.shape == (10, 12)
    assert isinstance(load("synthetic-xmc"), XMCData)


def test_glove_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXIDX_CACHE", str(tmp_path))
    data = load("glove-6b-50d:base=1000,queries=5")
    assert data.base.shape == (1000, 50) and data.gt_ids.shape == (5, 100)


@pytest.mark.parametrize("spec, words", [
    ("nonsense", "valid forms"),
    ("bibtex:extra", "valid forms"),
    ("xmc:", "valid forms"),
    ("ann-hdf5:", "valid forms"),
    ("glove-6b-50d:foo=1", "valid keys: base, queries"),
    ("glove-6b-50d:base", "malformed parameter"),
    ("synthetic-ann:n=ten", "not a valid int"),
    ("synthetic-ann:dim=3", "valid keys: n, q, d, clusters, metric, seed, scale, offset"),
    ("synthetic-xmc:labels=5,size=2", "valid keys: n, test, features, labels, per_example, per_label, zipf, seed"),
    ("xmc:a,b,c", "expected xmc:DIR"),
])
def test_spec_errors(spec, words):
    with pytest.raises(ValueError) as err:
        load(spec)
    assert words in str(err.value), str(err.value)


def test_unknown_spec_lists_every_form():
    with pytest.raises(ValueError) as err:
        load("imagenet")
    for form in ("glove-6b-50d", "ann-hdf5:PATH", "xmc:DIR", "bibtex", "synthetic-ann", "synthetic-xmc"):
        assert form in str(err.value)
