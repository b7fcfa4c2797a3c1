"""The ANN robustness suite: data sets on the axes where presets tuned on GloVe broke (metric, scale,
norms, sparsity, cluster sizes, dimension), all from what the project has, each with exact ground truth
(cached) and a data spec (`jaxidx.data.load`).

- glove-6b-50d: GloVe, angular (the set the presets were tuned on);
- glove-6b-50d-raw: the same vectors unnormalised, euclidean (norms vary);
- xmc-dense:bibtex, xmc-dense:delicious: bag-of-words rows as dense euclidean points (1836-d and 500-d,
  binary): the training rows are the base, the test rows the queries;
- xmc-svd:debian-depends: the tf-idf rows reduced to 256 dimensions by a truncated SVD fitted on the
  training rows (real-valued, euclidean);
- synthetic sets with features in the hundreds, with strongly unequal cluster sizes, and with 512 dimensions.
"""
from __future__ import annotations

import numpy as np

from jaxidx.data.ann import GROUND_TRUTH_K, cache_dir, cached_exact_knn, glove_split, save_npy_atomic
from jaxidx.data.types import ANNData

SUITE = (
    "glove-6b-50d",
    "glove-6b-50d-raw",
    "xmc-dense:bibtex",
    "xmc-dense:delicious",
    "xmc-svd:debian-depends",
    "synthetic-ann:n=100000,q=1000,d=64,clusters=2000,metric=euclidean,seed=3,scale=100,offset=128",
    "synthetic-ann:n=100000,q=1000,d=32,clusters=200,metric=euclidean,seed=5,zipf=1.5",
    "synthetic-ann:n=50000,q=1000,d=512,clusters=200,metric=euclidean,seed=6",
)


def glove_raw(n_base: int | None = None, n_queries: int | None = None) -> ANNData:
    """The canonical GloVe 6B 50d split without the L2 normalisation, euclidean."""
    base, queries = glove_split(normalize=False)
    base, queries = base[:n_base or len(base)], queries[:n_queries or len(queries)]
    stem = f"glove-6b-50d-raw_base{len(base)}_queries{len(queries)}"
    gt_ids, gt_dist = cached_exact_knn(stem + f"_top{GROUND_TRUTH_K}", queries, base, GROUND_TRUTH_K, "euclidean")
    full = n_base is None and n_queries is None
    name = "glove-6b-50d-raw" if full else f"glove-6b-50d-raw:base={len(base)},queries={len(queries)}"
    return ANNData(name=name, base=base, queries=queries, metric="euclidean", gt_ids=gt_ids, gt_dist=gt_dist)


def xmc_rows(data, name: str, dim: int = 0) -> ANNData:
    """An XMC set's feature rows as ANN points, euclidean: the training rows are the base, the test rows
    the queries; dense as they are (dim 0) or reduced to `dim` by a truncated SVD of the training rows."""
    if dim:
        base, queries = _svd_rows(data, dim)
    else:
        base, queries = (np.asarray(x.toarray(), np.float32) for x in (data.X_train, data.X_test))
    k = min(GROUND_TRUTH_K, len(base))
    gt_ids, gt_dist = cached_exact_knn(f"{name.replace(':', '_').replace(',', '_')}_{data.fingerprint()}_top{k}",
                                       queries, base, k, "euclidean")
    return ANNData(name=name, base=base, queries=queries, metric="euclidean", gt_ids=gt_ids, gt_dist=gt_dist)


def _svd_rows(data, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and test rows projected on the top `dim` right singular vectors of the training rows
    (scipy's ARPACK, seeded start vector), cached by the data's fingerprint."""
    import scipy.sparse.linalg as sla
    path = cache_dir() / f"svd_{data.fingerprint()}_{dim}.npy"
    if path.exists():
        vt = np.load(path)
    else:
        X = data.X_train.astype(np.float64)
        if not 1 <= dim < min(X.shape):
            raise ValueError(f"xmc-svd: dim must be in [1, {min(X.shape) - 1}], got {dim}")
        v0 = np.random.default_rng(0).standard_normal(min(X.shape))
        _, _, vt = sla.svds(X, k=dim, v0=v0)
        vt = vt[::-1].astype(np.float32)  # descending singular values
        save_npy_atomic(path, vt)
    return (np.ascontiguousarray((data.X_train @ vt.T).astype(np.float32)),
            np.ascontiguousarray((data.X_test @ vt.T).astype(np.float32)))
