"""Train-then-evaluate and evaluate-from-checkpoint, the two jobs every entry point runs."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

import jax
import ml_collections

from jaxidx import config as config_lib
from jaxidx.data import load
from jaxidx.data.specs import absolute_spec
from jaxidx.evaluate import evaluate, write_eval
from jaxidx.methods import get_method
from jaxidx.train import checkpoint as ckpt_lib
from jaxidx.train import mesh as mesh_lib
from jaxidx.train.loop import fit_stages

log = logging.getLogger(__name__)


def build(config, data=None, mesh=None):
    """(method instance, data, mesh) for a config; the data is loaded from `config.data` if not given."""
    data = load(config.data) if data is None else data
    mesh = mesh_lib.make_mesh(config.mesh.model_parallel) if mesh is None else mesh
    return get_method(config.method)(config, data, mesh), data, mesh


def check_run_kind(workdir: str, method) -> None:
    """Refuse a run directory that holds another kind of run: checkpoints of a single-stage method where
    a staged one would train (or stage directories where a single-stage one would), naming the method.
    Checkpoints of the same kind are checked field by field by the train loop before any restore."""
    from jaxidx.api import run_checkpoint_dir
    if not os.path.isdir(workdir):
        return
    found = run_checkpoint_dir(workdir)
    if found is None:
        return
    staged = bool(getattr(method, "stages", ()))
    if staged == (found == workdir):
        other = (ckpt_lib.newest_meta(found) or {}).get("method", "other")
        raise ckpt_lib.CheckpointError(f"{workdir}: holds a {other} run (method {other!r}), not {method.name!r}; "
                                       "use a new --workdir")


def train_run(method, config, workdir: str, mesh, data, progress: bool = True, keep_items: bool = True):
    """Train `method` in `workdir` (resuming), after checking the directory holds no other run (from the
    checkpoints' meta files, no orbax collective); an ANN run keeps its base vectors once in
    `workdir/items/` (unless not `keep_items`), so its checkpoints load as indexes without the data set."""
    from jaxidx.api import write_items
    from jaxidx.train.loop import check_run_dir
    check_run_kind(workdir, method)
    if not getattr(method, "stages", ()):
        check_run_dir(workdir, method, data.fingerprint())  # before the items are written
    if keep_items and data.task == "ann" and jax.process_index() == 0:
        write_items(workdir, data)
    return fit_stages(method, config, workdir, mesh, data_fingerprint=data.fingerprint(), progress=progress)


def train_and_evaluate(config, workdir: str, progress: bool = True) -> dict:
    """Train (resuming if `workdir` has a checkpoint), then evaluate and write `workdir/eval.json`.
    A relative data path in `config.data` is made absolute first, so the run evaluates from anywhere."""
    config.data = absolute_spec(config.data)
    method, data, mesh = build(config)
    task, result = train_run(method, config, workdir, mesh, data, progress)
    out = {"method": method.name, "data": config.data, "step": result.step,
           "train_seconds": result.train_seconds, "interrupted": result.interrupted,
           "stop_signal": result.stop_signal, "results": [], "checkpoints": os.path.abspath(workdir)}
    if result.interrupted:
        return out
    index = task.index(jax.device_get(result.params), result.aux)
    out["results"] = evaluate(index, data, config.search.settings, config.search.k)
    if jax.process_index() == 0:
        out["eval_path"] = write_eval(workdir, method.name, config.data, result.step, result.train_seconds,
                                      out["results"])
    return out


def eval_filename(step: int, overrides: Optional[dict]) -> str:
    """eval-step<N>.json, or eval-step<N>-<digest of the overrides>.json: a name per step and settings."""
    if not overrides:
        return f"eval-step{step}.json"
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"eval-step{step}-{digest}.json"


def evaluate_checkpoint(workdir: str, step: Optional[int] = None, overrides: Optional[dict] = None,
                        filename: Optional[str] = None, overwrite: bool = False) -> dict:
    """Evaluate a run's checkpoint (parameters and aux only, as `jaxidx.load`) on its data's test queries,
    or on other data (`overrides={"data": SPEC}`) whose shapes fit; the config's fields can be overridden
    for the evaluation (search settings, query batch, threads). Results go to `workdir/filename`, by default
    `eval-step<N>.json` (with a digest of the overrides when there are any); an existing file is refused
    unless `overwrite`, so no result is replaced silently."""
    from jaxidx.api import index_from_checkpoint, run_checkpoint_dir
    ckpt_dir = run_checkpoint_dir(workdir) if os.path.isdir(workdir) else None
    if ckpt_dir is None:
        raise ckpt_lib.CheckpointError(f"{workdir}: no checkpoints (is it a training run directory?)")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    try:
        step, meta = ckpt.read_meta(step)
        config = ml_collections.ConfigDict(meta["config"])
        config.lock()
        config_lib.apply_overrides(config, overrides or {})
        data = load(config.data)
        if data.fingerprint() != meta.get("data_fingerprint"):  # other data: the model's shapes must still fit
            method, _, _ = build(config, data)
            if getattr(method, "stages", ()):
                method = method.stage(os.path.basename(os.path.normpath(ckpt_dir)))
            ckpt_lib.check_compatible(meta, method.shapes(), workdir)
        filename = filename or eval_filename(step, overrides)
        if not overwrite and os.path.exists(os.path.join(workdir, filename)) and jax.process_index() == 0:
            raise ValueError(f"{os.path.join(workdir, filename)}: exists (an earlier evaluation); pass --overwrite "
                             "or another --out")
        step, params, aux, meta = ckpt.restore_params(step)
    finally:
        ckpt.close()
    meta = dict(meta, config=config.to_dict())
    index = index_from_checkpoint(ckpt_dir, meta, params, aux, (data.base, data.metric) if data.task == "ann" else None)
    results = evaluate(index, data, config.search.settings, config.search.k)
    out = {"method": meta["method"], "data": config.data, "step": step,
           "train_seconds": float(meta.get("train_seconds", 0.0)), "results": results}
    if jax.process_index() == 0:
        out["eval_path"] = write_eval(workdir, meta["method"], config.data, step, out["train_seconds"], results,
                                      filename)
    return out
