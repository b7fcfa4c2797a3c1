"""The library's front door: `fit` a learned index on arrays or a data spec, `load` a saved index or a
training run. Both return an `Index` (`jaxidx.index`), which searches, adds, removes and saves."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Optional, Union

import jax
import ml_collections
import numpy as np
import scipy.sparse as sp

from jaxidx import config as config_lib
from jaxidx.data import load as load_data
from jaxidx.data.ann import normalize_rows
from jaxidx.data.specs import absolute_spec
from jaxidx.data.types import ANNData, XMCData, _digest
from jaxidx.index import INDEX_FILE, Index, dense_rows, index_class, load_saved, read_arrays, read_json
from jaxidx.index import write_arrays, write_json_atomic
from jaxidx.train import checkpoint as ckpt_lib

log = logging.getLogger(__name__)

METRICS = {"euclidean": "euclidean", "l2": "euclidean", "angular": "angular", "cosine": "angular",
           "ip": "dot", "dot": "dot"}
ITEMS_DIR = "items"  # a run directory's copy of the ANN base vectors, written once for every checkpoint


# --- data -----------------------------------------------------------------------------------------------

def as_data(data, metric: Optional[str] = None) -> Union[ANNData, XMCData]:
    """An ANNData / XMCData from what `fit` accepts: a float array [N, d] (ANN, with `metric`), a pair
    (X, Y) of features (scipy sparse or dense [n, D]) and labels (sparse or dense 0/1 [n, L]), a data-spec
    string, or an ANNData / XMCData. Refuses NaN / Inf and empty or mis-shaped input, naming it."""
    if isinstance(data, (ANNData, XMCData)) or isinstance(data, str):
        if metric is not None:
            raise ValueError("metric: only for a vector array; a data set carries its own metric")
        return load_data(data) if isinstance(data, str) else data
    if isinstance(data, tuple):
        if len(data) != 2:
            raise ValueError(f"data: an XMC pair is (X, Y), got a tuple of {len(data)}")
        if metric is not None:
            raise ValueError("metric: only for ANN vectors; XMC data (X, Y) has none")
        X = _as_csr(data[0], "X")
        Y = _as_csr(data[1], "Y")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"data: X has {X.shape[0]} rows, Y has {Y.shape[0]}")
        if X.shape[0] == 0 or X.shape[1] == 0 or Y.shape[1] == 0:
            raise ValueError(f"data: X {list(X.shape)} and Y {list(Y.shape)} must be non-empty")
        Y.data[:] = (Y.data != 0)
        Y.eliminate_zeros()
        return XMCData(name=f"arrays-{_digest(X, Y)}", X_train=X, Y_train=Y)
    name = METRICS.get(metric or "euclidean")
    if name is None:
        raise ValueError(f"metric: unknown {metric!r}; valid: euclidean, angular, ip")
    try:
        shape = np.shape(data)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"data: expected vectors [N, d] with N, d >= 1, an (X, Y) pair or a data spec; got "
                         f"{type(data).__name__} of shape {list(shape)}")
    base = dense_rows(data, shape[1], "data")
    if name == "angular":
        base = normalize_rows(base, "data")
    return ANNData(name=f"arrays-{_digest(base)}", base=base, metric=name)


def _as_csr(a, what: str) -> sp.csr_matrix:
    m = sp.csr_matrix(a, dtype=np.float32) if sp.issparse(a) else sp.csr_matrix(dense_rows(a, np.shape(a)[-1], what))
    if not np.isfinite(m.data).all():
        raise ValueError(f"data: {what} holds NaN or Inf")
    m.sort_indices()
    return m


# --- fit ----------------------------------------------------------------------------------------------------

def fit(preset, data, *, workdir: Optional[str] = None, metric: Optional[str] = None, progress: bool = True,
        **overrides) -> Index:
    """Train a learned index and return it.

    preset: "lmi", "irli", "elias" (each method's `auto` preset, sized from the data) or "method:preset"
      ("lmi:glove", "irli:bibtex", "elias:debian-depends"), or a ConfigDict.
    data: float vectors [N, d] (ANN; `metric` "euclidean" (default), "angular" or "ip"), a pair (X, Y) of
      features and labels (XMC), a data-spec string, or an ANNData / XMCData. No queries or ground truth needed.
    workdir: given, checkpoints go there and a run there resumes; absent, training keeps no files.
    overrides: config fields, dotted through `__` (`train__epochs=3`) or as `**{"train.epochs": 3}`; an
      unknown field is a ValueError naming it.
    """
    from jaxidx.runner import build, train_run
    spec = absolute_spec(data) if isinstance(data, str) else None
    data = as_data(data, metric)
    if isinstance(preset, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(preset.to_dict())
        config.lock()
        config_lib.apply_overrides(config, overrides)
    else:
        config = config_lib.get_config(str(preset), data, overrides)
    config.data = spec or data.name  # arrays: "arrays-<digest>", which names them but cannot load them
    method, data, mesh = build(config, data)
    tmp = None
    if workdir is None:
        tmp = workdir = tempfile.mkdtemp(prefix="jaxidx-fit-")
    try:
        task, result = train_run(method, config, workdir, mesh, data, progress, keep_items=tmp is None)
        if result.interrupted:
            raise KeyboardInterrupt(f"training stopped by a signal at step {result.step}"
                                    + ("" if tmp else f"; the checkpoint in {workdir} resumes it"))
        return task.index(jax.device_get(result.params), result.aux)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# --- load ---------------------------------------------------------------------------------------------------

def load(path: str, step: Optional[int] = None) -> Index:
    """Open a saved index (`Index.save`) or a training run directory: its newest complete checkpoint
    (or `step`), parameters and aux only, with no data set loaded and no clustering or training code run
    (an ANN run keeps its vectors once in `<run>/items/`)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
        if step is not None:
            raise ValueError(f"{path}: a saved index has no steps; step= is for a training run directory")
        return load_saved(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such directory (expected a saved index or a training run directory)")
    ckpt_dir = run_checkpoint_dir(path)
    if ckpt_dir is None:
        raise ValueError(f"{path}: neither a saved index ({INDEX_FILE}) nor a training run (checkpoints/)")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    try:
        step, params, aux, meta = ckpt.restore_params(step)
    finally:
        ckpt.close()
    return index_from_checkpoint(path, meta, params, aux)


def run_checkpoint_dir(workdir: str) -> Optional[str]:
    """The directory holding a run's checkpoints: the run itself, or the newest stage directory
    (`stage2`, then `stage1`) of a method trained in stages; None if there is none."""
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return workdir
    stages = sorted(d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d, "checkpoints")))
    return os.path.join(workdir, stages[-1]) if stages else None


def index_from_checkpoint(workdir: str, meta: dict, params, aux: dict, items=None) -> Index:
    """The Index of a checkpoint's (params, aux) and meta; an ANN run's (vectors, metric) come from `items`
    or the run directory's `items/` (or, for runs from before items were kept, the data spec, fingerprint
    checked)."""
    config = ml_collections.ConfigDict(meta["config"])
    config.lock()
    method, shapes = meta["method"], meta.get("shapes", {})
    cls = index_class(method)
    info = {"data_fingerprint": meta.get("data_fingerprint"), "step": meta.get("step"),
            "train_seconds": float(meta.get("train_seconds", 0.0))}
    task = meta.get("task") or ("ann" if method == "lmi" else "xmc" if method == "elias" else None)
    if task is None:  # an IRLI run from before the task was recorded
        task = "ann" if read_items(workdir, meta) is not None else load_data(config.data).task
    if method == "elias":
        info.update(dim=shapes["n_features"], n_features=shapes["n_features"], n_items=shapes["n_labels"],
                    stage=shapes.get("stage"))
        if config.model.input == "text":
            info.update(vocab_size=shapes["vocab_size"], token_len=shapes["token_len"])
        return cls.from_training(config, params, aux, info)
    vectors = None
    if task == "ann":
        vectors, info["metric"] = items or _run_vectors(workdir, meta, config)
    if method == "lmi":
        return cls.from_training(config, params, aux, vectors, info)
    n_features = 0 if task == "ann" or shapes["in_dim"] <= config.model.dense_input_max_features else shapes["in_dim"]
    return cls.from_training(config, params, aux, task, shapes["in_dim"], n_features, vectors, info)


def write_items(workdir: str, data: ANNData) -> None:
    """Keep the base vectors once in `workdir/items/` (checksummed), so `load(workdir)` needs no data set."""
    items = os.path.join(workdir, ITEMS_DIR)
    if os.path.isfile(os.path.join(items, "items.json")):
        doc = read_json(os.path.join(items, "items.json"))
        if doc.get("data_fingerprint") == data.fingerprint():
            return
    os.makedirs(items, exist_ok=True)
    manifest = write_arrays(items, {"vectors": data.base})
    write_json_atomic(os.path.join(items, "items.json"), {"data_fingerprint": data.fingerprint(),
                                                          "metric": data.metric, "arrays": manifest})


def read_items(workdir: str, meta: dict):
    """(vectors, metric) kept in a run directory (or its parent, for a stage directory), or None."""
    for d in (workdir, os.path.dirname(os.path.normpath(workdir))):
        path = os.path.join(d, ITEMS_DIR, "items.json")
        if os.path.isfile(path):
            doc = read_json(path)
            if doc.get("data_fingerprint") != meta.get("data_fingerprint"):
                raise ValueError(f"{path}: the vectors are of other data than the checkpoint's "
                                 f"({doc.get('data_fingerprint')} vs {meta.get('data_fingerprint')})")
            return read_arrays(os.path.dirname(path), doc["arrays"], path)["vectors"], doc["metric"]
    return None


def _run_vectors(workdir: str, meta: dict, config):
    kept = read_items(workdir, meta)
    if kept is not None:
        return kept
    log.info("%s keeps no vectors (a run from before jaxidx kept them): reading %s", workdir, config.data)
    data = load_data(config.data)
    if data.fingerprint() != meta.get("data_fingerprint"):
        raise ckpt_lib.CheckpointError(f"{workdir}: {config.data} is not the data the run was trained on "
                                       f"(fingerprint {data.fingerprint()} vs {meta.get('data_fingerprint')})")
    return data.base, data.metric
