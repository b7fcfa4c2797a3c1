"""The index layer: what a trained learned index needs to search, and nothing else.

An `Index` holds the router's parameters, its partition, the stored items
(ANN: the vectors, laid out by bucket) and its config; never the `Trainable`,
the mesh, the optimizer or the data set. Each method subclasses it
(`jaxidx.methods.lmi.LMIIndex`, `irli.IRLIIndex`, `elias.ELIASIndex`).

A saved index is one directory, self-contained:

    index.json           format and version, method, metric, dim, items, data fingerprint,
                         jaxidx version, config, and a manifest of every array file with its sha256
    arrays/<name>-<sha>.npy

`save` writes new array files under content-addressed names, then replaces
`index.json` atomically (`os.replace`), then deletes the files the new
manifest no longer names: a process killed at any point leaves the previous
index readable at the same path. `load` checks every file against its
checksum and refuses a truncated or damaged file, or a newer format,
naming the file and the reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any, Iterator

import ml_collections
import numpy as np
import scipy.sparse as sp
from flax import traverse_util

from jaxidx.data.types import KERNEL_METRIC, benchmark_distance
from jaxidx.methods.common import BACKENDS, SearchResult, check_queries, standardize
from jaxidx.train import batches as B_
from jaxidx.train.checkpoint import jsonable

FORMAT = "jaxidx-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
ARRAY_DIR = "arrays"


# --- query blocks ------------------------------------------------------------------------------------

def n_rows(x) -> int:
    """Rows of a dense array or of a dict of row arrays (padded sparse rows, tokens)."""
    return next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]


def query_blocks(queries, block: int) -> Iterator[tuple[Any, int]]:
    """Yield (rows, n): `queries` (dense [Q, d] or a dict of [Q, ...] arrays) in blocks of `block`
    rows, the last one padded by repeating row 0 up to the next power of two (at most `block`), so
    each jitted function compiles once per such size and a search of a few queries pays for a block
    of their size, not of `block`; n is the number of real rows. The one batching rule of every
    search path."""
    total = n_rows(queries)
    for start in range(0, total, block):
        rows = np.arange(start, min(start + block, total))
        n = len(rows)
        size = min(block, 1 << (n - 1).bit_length())
        if n < size:
            rows = np.concatenate([rows, np.zeros(size - n, rows.dtype)])
        yield B_.take(queries, rows), n


# --- array files with checksums ----------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask_mode() -> int:
    """0o666 less the process's umask: what `open` would give a new file (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_arrays(directory: str, arrays: dict[str, np.ndarray]) -> dict:
    """Write each array to `directory/arrays/<name>-<sha16>.npy` (content-addressed, so an existing
    file is never overwritten with other bytes); returns the manifest {name: {file, shape, dtype, sha256}}."""
    adir = os.path.join(directory, ARRAY_DIR)
    os.makedirs(adir, exist_ok=True)
    manifest = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        fd, tmp = tempfile.mkstemp(dir=adir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, a, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _umask_mode())
            digest = _sha256(tmp)
            rel = f"{ARRAY_DIR}/{re.sub(r'[^A-Za-z0-9_.]', '.', name)}-{digest[:16]}.npy"
            os.replace(tmp, os.path.join(directory, rel))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        manifest[name] = {"file": rel, "shape": list(a.shape), "dtype": a.dtype.str, "sha256": digest}
    _fsync_dir(adir)
    return manifest


def read_arrays(directory: str, manifest: dict, what: str) -> dict[str, np.ndarray]:
    """The arrays of a manifest, each checked against its checksum, shape and dtype; a missing,
    truncated or damaged file is a ValueError naming it (`what` names the manifest's owner)."""
    out = {}
    for name, entry in manifest.items():
        try:
            path = os.path.join(directory, entry["file"])
            want_sha, shape, dtype = entry["sha256"], tuple(entry["shape"]), np.dtype(entry["dtype"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{what}: array entry {name!r} is malformed ({e})") from None
        if os.path.dirname(os.path.normpath(entry["file"])) != ARRAY_DIR:
            raise ValueError(f"{what}: array {name!r} points outside {ARRAY_DIR}/: {entry['file']!r}")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing (array {name!r} of {what})")
        if _sha256(path) != want_sha:
            raise ValueError(f"{path}: damaged or truncated (sha256 differs from {what}'s manifest)")
        try:
            a = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path}: unreadable ({e})") from None
        if a.shape != shape or a.dtype != dtype:
            raise ValueError(f"{path}: holds {a.dtype}{list(a.shape)}, {what} says {dtype}{list(shape)}")
        out[name] = a
    return out


def write_json_atomic(path: str, obj: dict) -> None:
    """Write JSON to a temporary file beside `path`, fsync, then rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out


def _remove_unreferenced(directory: str, manifest: dict) -> None:
    keep = {os.path.basename(e["file"]) for e in manifest.values()}
    adir = os.path.join(directory, ARRAY_DIR)
    for name in os.listdir(adir):
        if name not in keep:
            os.remove(os.path.join(adir, name))


# --- the index -----------------------------------------------------------------------------------------

class Index:
    """A searchable learned index. Subclasses set `method`, `setting_keys`, `task` and implement
    `_prepare` (checked queries in the form the router takes) and `_query` (one setting)."""

    method: str = ""
    task: str = ""  # 'ann' or 'xmc'
    setting_keys: tuple = ()

    def __init__(self, config, params, arrays: dict[str, np.ndarray], info: dict):
        # Its own copy: changing an index's search settings never reaches the run that built it.
        self.config = ml_collections.ConfigDict(config.to_dict() if isinstance(config, ml_collections.ConfigDict)
                                                else config)
        self.config.lock()
        self.params = params
        self.arrays = arrays
        self.info = dict(info)
        self._sharded = None  # the device layout of backend="device" (built by `shard`, or on first use)

    # --- properties -----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Dimension of the vectors (ANN) or number of input features (XMC)."""
        return int(self.info["dim"])

    @property
    def metric(self) -> str:
        """ANN: 'euclidean', 'angular' or 'dot' (inner product); XMC: 'score'."""
        return self.info.get("metric", "score")

    def __len__(self) -> int:
        """Items the index can return: vectors (ANN) or labels (XMC)."""
        return int(self.info["n_items"])

    def stats(self) -> dict:
        """Bucket sizes (per repetition) and bytes of every array and of the parameters."""
        import jax
        from jaxidx.partition import bucket_stats
        sizes = np.diff(self.arrays["offsets"].reshape(-1, self.arrays["offsets"].shape[-1]), axis=1)
        param_bytes = sum(int(np.asarray(p).nbytes) for p in jax.tree.leaves(self.params))
        array_bytes = {k: int(v.nbytes) for k, v in self.arrays.items()}
        return {"method": self.method, "n_items": len(self), "dim": self.dim, "metric": self.metric,
                "n_buckets": int(sizes.shape[1]), "n_reps": int(sizes.shape[0]), "bucket_sizes": bucket_stats(sizes),
                "param_bytes": param_bytes, "array_bytes": array_bytes,
                "bytes": param_bytes + sum(array_bytes.values())}

    def __repr__(self) -> str:
        return f"<jaxidx {self.method} index: {len(self)} items, dim {self.dim}, metric {self.metric}>"

    # --- search ---------------------------------------------------------------------------------
    def default_setting(self) -> dict:
        return dict(self.config.search.settings[0])

    def resolve_setting(self, setting: dict) -> dict:
        """The config's first search setting updated with `setting` (`query` validates the result: unknown
        keys and bad values are ValueErrors naming them and the valid range)."""
        return {**{k: v for k, v in self.default_setting().items() if k in self.setting_keys + ("backend",)},
                **setting}

    def _check_keys(self, setting: dict) -> None:
        unknown = sorted(set(setting) - set(self.setting_keys) - {"backend"})
        if unknown:
            raise ValueError(f"search: unknown setting {', '.join(map(repr, unknown))}; valid for {self.method}: "
                             f"{', '.join(self.setting_keys)}, backend")

    def _check_setting(self, setting: dict) -> None:
        """Ranges of the method's settings (subclasses)."""

    def search(self, queries, k: int = 10, **setting) -> tuple[np.ndarray, np.ndarray]:
        """The k best items per query: (ids int64 [n, k] (-1 where fewer than k exist), scores float32 [n, k]).

        ANN scores are distances, ascending: euclidean L2 distance, angular 1 - cos, dot -<q, x>.
        XMC scores are the method's label scores, descending (IRLI: summed bucket probability, or the
        summed logit with mode='mach'; ELIAS: path score x label probability).
        `setting`: the method's search keywords (`setting_keys`), defaulting to the config's first setting,
        and for every method backend='host' (the C++ kernels, the default) or backend='device' (jitted JAX
        on the accelerator: over the devices of `shard(mesh)`, else the first device); both give the same
        ids on tie-free data.
        """
        res = self.query(queries, self.resolve_setting(setting), k)
        scores = res.scores
        if self.task == "ann":
            scores = np.where(res.ids >= 0, benchmark_distance(scores, self.metric), np.inf).astype(np.float32)
        return res.ids.astype(np.int64), scores

    def query(self, queries, setting: dict, k: int) -> SearchResult:
        """One resolved setting: ids, scores (kernel form) and candidates per query (for evaluators)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"search: k must be an integer >= 1, got {k!r}")
        self._check_keys(setting)
        backend = setting.get("backend", "host")
        if backend not in BACKENDS:
            raise ValueError(f"search: backend={backend!r} must be one of {', '.join(BACKENDS)}")
        self._check_setting(setting)
        run = self._query if backend == "host" else self._query_device
        return run(self._prepare(queries), setting, int(k))

    def shard(self, mesh=None) -> "Index":
        """Split the stored items over the devices of `mesh` (default: every device of every process) for
        backend='device'; returns the index."""
        raise NotImplementedError(f"shard: the {self.method} {self.task.upper()} index has no sharded layout")

    def device_bytes(self) -> int:
        """Bytes each device holds of the index after `shard` (its share of the items; 0 before any)."""
        return 0 if self._sharded is None else self._sharded.device_bytes()

    def _query_device(self, queries, setting: dict, k: int) -> SearchResult:
        raise NotImplementedError(f"search: backend='device' is not built for the {self.method} {self.task.upper()} "
                                  f"index; use backend='host'")

    def router_input(self, x: np.ndarray) -> np.ndarray:
        """ANN vectors as the router was trained on them: standardised by the stored `input_center` /
        `input_scale` (an index without them routes x as is); the exact re-rank keeps x."""
        if "input_center" not in self.arrays:
            return x
        return standardize(x, self.arrays["input_center"], self.arrays["input_scale"])

    def _prepare(self, queries):
        raise NotImplementedError

    def _query(self, queries, setting: dict, k: int) -> SearchResult:
        raise NotImplementedError

    # --- add / remove ---------------------------------------------------------------------------
    def add(self, vectors) -> np.ndarray:
        raise TypeError(f"add: a {self.method} {self.task.upper()} index holds labels fixed by training; only "
                        "ANN indexes (LMI, IRLI on vectors) take new items")

    def remove(self, ids) -> None:
        raise TypeError(f"remove: a {self.method} {self.task.upper()} index holds labels fixed by training; only "
                        "ANN indexes (LMI, IRLI on vectors) remove items")

    # --- save -----------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write the index to directory `path` (self-contained, atomic; see the module docstring)."""
        import jax
        from jaxidx import __version__
        path = os.path.abspath(path)
        if os.path.exists(path) and not (os.path.isdir(path) and (
                os.path.isfile(os.path.join(path, INDEX_FILE)) or not os.listdir(path))):
            raise ValueError(f"{path}: exists and is not a jaxidx index; refusing to overwrite it")
        os.makedirs(path, exist_ok=True)
        flat = {f"params/{k}": np.asarray(v) for k, v in
                traverse_util.flatten_dict(jax.device_get(self.params), sep="/").items()}
        manifest = write_arrays(path, {**flat, **{f"arrays/{k}": v for k, v in self.arrays.items()}})
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "jaxidx_version": __version__,
               "method": self.method, "task": self.task, "metric": self.metric, "dim": self.dim,
               "n_items": len(self), "data_fingerprint": self.info.get("data_fingerprint"),
               "info": jsonable(self.info), "config": jsonable(self.config.to_dict()), "arrays": manifest}
        write_json_atomic(os.path.join(path, INDEX_FILE), doc)
        _remove_unreferenced(path, manifest)
        return path


def index_class(method: str):
    """The Index subclass of a method name (its trainable's `index_type`)."""
    from jaxidx.methods import get_method
    return get_method(method).index_type


def load_saved(path: str) -> Index:
    """Open an index written by `Index.save`."""
    index_file = os.path.join(path, INDEX_FILE)
    doc = read_json(index_file)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{index_file}: not a jaxidx index (format {doc.get('format')!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{index_file}: format version {version!r} is newer than this jaxidx reads "
                         f"({FORMAT_VERSION}); upgrade jaxidx")
    for field in ("method", "config", "info", "arrays"):
        if field not in doc:
            raise ValueError(f"{index_file}: field {field!r} missing")
    arrays = read_arrays(path, doc["arrays"], index_file)
    params = traverse_util.unflatten_dict({k[len("params/"):]: v for k, v in arrays.items()
                                           if k.startswith("params/")}, sep="/")
    rest = {k[len("arrays/"):]: v for k, v in arrays.items() if k.startswith("arrays/")}
    return index_class(doc["method"])(ml_collections.ConfigDict(doc["config"]), params, rest, doc["info"])


# --- queries ---------------------------------------------------------------------------------------------

def dense_rows(x, dim: int, what: str = "queries") -> np.ndarray:
    """Array-like [n, dim] -> C-contiguous float32, refusing another shape and NaN / Inf (naming the row)."""
    if sp.issparse(x):
        x = x.toarray()
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected a float array [n, {dim}] ({e})") from None
    if a.ndim == 1 and a.shape[0] == dim:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != dim:
        raise ValueError(f"{what}: expected shape [n, {dim}] (the index's dimension), got {list(np.shape(x))}")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: row {int(np.flatnonzero(bad)[0])} holds NaN or Inf")
    return np.ascontiguousarray(a)


def sparse_rows(x, n_features: int) -> dict:
    """XMC queries -> padded sparse rows {'idx', 'val'} (+ 'tokens' passed through): a scipy sparse matrix or
    a dense array [n, n_features] (padded to a power-of-two width), or padded rows as given. Feature ids and
    values are checked."""
    if isinstance(x, dict):
        out = dict(x)
    else:
        if not sp.issparse(x):
            x = dense_rows(x, n_features)
        x = sp.csr_matrix(x, dtype=np.float32)
        if x.shape[1] != n_features:
            raise ValueError(f"queries: expected [n, {n_features}] features (the index's), got {list(x.shape)}")
        out = B_.pad_sparse_rows(x, pow2=True)
    check_queries(out, n_features)
    if not np.isfinite(np.asarray(out["val"], np.float32)).all():
        raise ValueError("queries: feature values hold NaN or Inf")
    return out


def kernel_metric(metric: str) -> str:
    return KERNEL_METRIC[metric]


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def rows_of_ids(row_ids: np.ndarray, ids) -> np.ndarray:
    """Rows holding each of `ids` (distinct ids the index holds), or a ValueError naming the first bad one."""
    try:
        ids = np.asarray(ids)
    except (TypeError, ValueError) as e:
        raise ValueError(f"remove: ids must be integers ({e})") from None
    ids = ids.reshape(-1)
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"remove: ids must be integers, got dtype {ids.dtype}")
    order = np.argsort(row_ids, kind="stable")
    pos = np.searchsorted(row_ids[order], ids)
    found = (pos < len(order)) & (row_ids[order][np.minimum(pos, len(order) - 1)] == ids) if len(order) else \
        np.zeros(ids.shape, bool)
    if not found.all():
        raise ValueError(f"remove: id {int(ids[~found][0])} is not in the index (ids held: {len(row_ids)}, "
                         f"largest {int(row_ids.max()) if len(row_ids) else -1})")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("remove: ids repeat")
    return order[pos]
