"""Train-then-evaluate and evaluate-from-checkpoint, the two jobs every entry point runs."""
from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from jaxidx.data import load
from jaxidx.evaluate import evaluate, write_eval
from jaxidx.methods import get_method
from jaxidx.train import checkpoint as ckpt_lib
from jaxidx.train import mesh as mesh_lib
from jaxidx.train import state as state_lib
from jaxidx.train.loop import _check_meta, fit_stages, stage_dir

log = logging.getLogger(__name__)


def build(config, data=None, mesh=None):
    """(method instance, data, mesh) for a config; the data is loaded from `config.data` if not given."""
    data = load(config.data) if data is None else data
    mesh = mesh_lib.make_mesh(config.mesh.model_parallel) if mesh is None else mesh
    return get_method(config.method)(config, data, mesh), data, mesh


def train_and_evaluate(config, workdir: str, progress: bool = True) -> dict:
    """Train (resuming if `workdir` has a checkpoint), then evaluate and write `workdir/eval.json`."""
    method, data, mesh = build(config)
    task, result = fit_stages(method, config, workdir, mesh, data_fingerprint=data.fingerprint(), progress=progress)
    out = {"method": method.name, "data": config.data, "step": result.step,
           "train_seconds": result.train_seconds, "interrupted": result.interrupted, "results": []}
    if result.interrupted:
        return out
    index = task.index(jax.device_get(result.params), result.aux)
    out["results"] = evaluate(index, data, config.search.settings, config.search.k)
    if jax.process_index() == 0:
        write_eval(workdir, method.name, config.data, result.step, result.train_seconds, out["results"])
    return out


def restore(workdir: str, step: Optional[int] = None, overrides: Optional[dict] = None):
    """Rebuild the method from a checkpoint's config (plus overrides) and restore (params, aux).

    The checkpoint is refused, with the mismatch named, if the data or config
    would change the model's shapes. For a method trained in stages the newest
    stage that holds checkpoints is restored, and its Trainable is returned.
    """
    asked = step  # None: the newest restorable step, falling back past corrupted ones
    ckpt_dir = workdir if _has_checkpoints(workdir) else _any_stage_dir(workdir)
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    step, meta = ckpt.read_meta(step if ckpt_dir == workdir else None)
    config = ml_collections.ConfigDict(meta["config"])
    config.lock()
    for key, value in (overrides or {}).items():
        _set(config, key, value)
    task, data, mesh = build(config)
    if getattr(task, "stages", ()):
        if ckpt_dir == workdir:  # the directory of one stage
            name = os.path.basename(os.path.normpath(workdir))
            if name not in task.stages:
                raise ckpt_lib.CheckpointError(f"{workdir}: a {task.name} run keeps its checkpoints in stage "
                                               f"directories {task.stages}, not in {name!r}")
        else:  # the run directory: its newest stage
            name = next(n for n in reversed(task.stages) if _has_checkpoints(stage_dir(workdir, n)))
            ckpt.close()
            ckpt = ckpt_lib.Checkpointer(stage_dir(workdir, name), read_only=True)
            step, meta = ckpt.read_meta(step)
        task = task.stage(name)
    if config.data == meta["config"]["data"]:
        _check_meta(meta, task, data.fingerprint(), workdir)
    else:  # evaluating on other data: the model's shapes must still fit
        ckpt_lib.check_compatible(meta, task.shapes(), workdir)
    params, aux = task.init(jax.random.key(config.seed))
    tx = task.optimizer(1)
    # Shapes only: the optimizer state (2x the parameters under Adam) is not allocated twice.
    shapes = jax.eval_shape(lambda p: state_lib.create(p, tx), params)
    del params
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                          state_lib.state_shardings(shapes, mesh, task.leaf_spec))
    step, restored, meta = ckpt.restore({"state": target, "aux": aux}, asked)
    ckpt.close()
    aux = {k: np.asarray(v) for k, v in restored["aux"].items()}
    return config, task, data, jax.device_get(restored["state"].params), aux, step, meta


def _has_checkpoints(d: str) -> bool:
    return os.path.isdir(os.path.join(d, "checkpoints"))


def _any_stage_dir(workdir: str) -> str:
    """A stage directory of a staged run (its checkpoints' config names the stages), else `workdir` itself."""
    subdirs = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
    return next((os.path.join(workdir, d) for d in subdirs if _has_checkpoints(os.path.join(workdir, d))), workdir)


def evaluate_checkpoint(workdir: str, step: Optional[int] = None, overrides: Optional[dict] = None,
                        filename: str = "eval.json") -> dict:
    config, method, data, params, aux, step, meta = restore(workdir, step, overrides)
    results = evaluate(method.index(params, aux), data, config.search.settings, config.search.k)
    out = {"method": method.name, "data": config.data, "step": step,
           "train_seconds": float(meta.get("train_seconds", 0.0)), "results": results}
    if jax.process_index() == 0:
        write_eval(workdir, method.name, config.data, step, out["train_seconds"], results, filename)
    return out


def _set(config, dotted: str, value) -> None:
    """config['a.b.c'] = value, failing on unknown keys (the config is locked)."""
    *path, last = dotted.split(".")
    node = config
    for p in path:
        node = node[p]
    if last not in node:
        raise KeyError(f"--config.{dotted}: unknown config field {last!r}")
    node[last] = value
