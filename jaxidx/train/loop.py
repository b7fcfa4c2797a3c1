"""The train loop shared by every method: epochs of jitted steps, end-of-epoch hooks
(re-partitioning), checkpoints, resume, metrics and a clean stop on SIGTERM / Ctrl-C.

Everything is derived from the global step: the epoch, the position in the
epoch, the batch order (seeded by (seed, epoch)) and the PRNG key, so a run
resumed from any checkpoint continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from functools import partial
from typing import Any, Optional, Protocol

import jax
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from jaxidx.train import checkpoint as ckpt_lib
from jaxidx.train import mesh as mesh_lib
from jaxidx.train import state as state_lib
from jaxidx.train import throughput
from jaxidx.train.metrics_log import MetricsWriter

log = logging.getLogger(__name__)


class Trainable(Protocol):
    """What a method provides to `fit`. Model maths stays in pure functions."""

    name: str
    task: str  # 'ann' or 'xmc' (recorded in checkpoints, so a run's index loads without its data)
    steps_per_epoch: int
    batch_size: int

    def init(self, rng: jax.Array) -> tuple[Any, dict]:
        """Initial params and aux (host numpy arrays saved with the checkpoint, e.g. the partition)."""

    def optimizer(self, total_steps: int) -> optax.GradientTransformation: ...

    def loss(self, params, batch: dict, aux_device: Any, rng: jax.Array) -> tuple[jax.Array, dict]: ...

    def batch(self, epoch: int, index: int) -> dict:
        """This process's rows (`mesh.process_shard`) of global batch `index` of `epoch`, as numpy
        arrays of fixed shapes (deterministic)."""

    def device_aux(self, aux: dict) -> Any:
        """The part of aux the loss reads, as host arrays (placed replicated by the loop)."""

    def end_of_epoch(self, epoch: int, params, aux: dict) -> tuple[dict, dict]:
        """Hook after `epoch` epochs are done (e.g. re-partition). Returns (aux, scalars to log)."""

    def leaf_spec(self, leaf) -> P:
        """How a state leaf is laid out on the mesh (replicated unless split over 'model')."""

    def shapes(self) -> dict:
        """Model/data shapes recorded in checkpoints and checked on restore."""


@dataclasses.dataclass
class FitResult:
    params: Any
    aux: dict
    step: int
    epoch: int
    train_seconds: float
    interrupted: bool = False
    stop_signal: Optional[int] = None  # the signal that stopped the run (SIGTERM / SIGINT), if one did
    # Phase times of this call: init_s (the method's init: k-means, clustering), end_of_epoch_s (each hook
    # call that did work: re-partition, leaf placement), step_ms (median over the logging windows of the
    # time per step, compilation, hooks and checkpoints excluded).
    phases: dict = dataclasses.field(default_factory=dict)


class _StopFlag:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.raised: Optional[int] = None

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            self.raised = signum
        try:
            old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread: no signal handling
            yield self
            return
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def fit(task: Trainable, config, workdir: str, mesh: Mesh, *, data_fingerprint: str,
        progress: bool = True, epochs: Optional[int] = None, seconds_before: float = 0.0) -> FitResult:
    """Train `task` for `epochs` (default `config.train.epochs`), resuming from `workdir` if it holds a checkpoint.

    `train_seconds` counts from `seconds_before` (earlier stages' training time) and includes the
    method's init (k-means, clustering), so the last stage's checkpoints and eval.json hold the whole
    run's build time.
    """
    tc = config.train
    n_data = mesh_lib.data_size(mesh)
    if task.batch_size % n_data:
        raise ValueError(f"train.batch_size: {task.batch_size} is not divisible by the {n_data} data-parallel devices")
    spe = task.steps_per_epoch
    total = (tc.epochs if epochs is None else epochs) * spe
    tx = task.optimizer(total)
    check_run_dir(workdir, task, data_fingerprint)  # a mismatched checkpoint is named before any work or write
    ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    phases = {"init_s": 0.0, "end_of_epoch_s": [], "step_ms": []}
    train_seconds = seconds_before
    if ckpt.steps():  # resume: shapes come from the checkpoint itself, so init (k-means, clustering) never runs
        step, restored, meta = ckpt.restore(partial(_restore_target, tx, mesh, task.leaf_spec))
        state, aux = restored["state"], {k: np.asarray(v) for k, v in restored["aux"].items()}
        train_seconds = float(meta.get("train_seconds", 0.0))
        log.info("resumed %s from step %d (epoch %.2f)", workdir, step, step / spe)
    else:
        t_init = time.perf_counter()
        params, aux = task.init(jax.random.key(config.seed))
        phases["init_s"] = time.perf_counter() - t_init
        train_seconds += phases["init_s"]  # a build's time includes its k-means / clustering / neighbours
        state = state_lib.create(params, tx)
        state = jax.device_put(state, state_lib.state_shardings(state, mesh, task.leaf_spec))
    shardings = state_lib.state_shardings(state, mesh, task.leaf_spec)
    writer = MetricsWriter(workdir)

    def save(step: int):
        meta = {"method": task.name, "task": getattr(task, "task", None), "step": step, "epoch": step / spe,
                "train_seconds": train_seconds, "data_fingerprint": data_fingerprint, "shapes": task.shapes(),
                "config": config.to_dict()}
        ckpt.save(step, {"state": state, "aux": aux}, ckpt_lib.jsonable(meta))

    step_fn = state_lib.make_train_step(task.loss, tx, mesh, shardings, config.seed)
    compiled, flops = None, None  # the step compiled once for the fixed batch shapes, and its FLOPs
    peak = throughput.peak_flops(mesh.devices.flat[0].device_kind, throughput.compute_dtype(state.params))
    aux_dev = mesh_lib.put_replicated(task.device_aux(aux), mesh)
    step = int(state.step)
    if step == 0 and not ckpt.steps():
        save(0)  # the initial pair (hash partition + init params): evaluation works from step 0
    stop = _StopFlag()
    bar = _progress(progress, total, step)
    interrupted = False
    window, t_win, n_win = [], time.perf_counter(), 0
    last_saved = step if ckpt.steps() else None
    try:
        with stop.installed():
            t0 = time.perf_counter()
            while step < total:
                epoch, index = divmod(step, spe)
                batch = mesh_lib.put_batch(task.batch(epoch, index), mesh)
                if compiled is None:
                    compiled = step_fn.lower(state, batch, aux_dev).compile()
                    flops = throughput.step_flops(compiled, mesh.size)
                    t_win = time.perf_counter()  # throughput counts steps, not the compilation
                state, metrics = compiled(state, batch, aux_dev)
                step += 1
                window.append(metrics)
                n_win += task.batch_size
                if bar is not None:
                    bar.update(1)
                if step % tc.log_every == 0 or step % spe == 0:
                    check_finite(window, step, last_saved, workdir)
                    scalars = {k: np.mean([float(m[k]) for m in window]) for k in window[0]}
                    dt = time.perf_counter() - t_win
                    scalars["examples_per_second"] = n_win / max(dt, 1e-9)
                    scalars["step_ms"] = 1e3 * dt / len(window)
                    phases["step_ms"].append(scalars["step_ms"])
                    scalars.update(throughput.step_scalars(flops, max(dt, 1e-9) / len(window), mesh.size, peak))
                    writer.write(step, scalars, prefix="train/")
                    if bar is not None:
                        bar.set_postfix(loss=f"{scalars['loss']:.4f}", ex_s=f"{scalars['examples_per_second']:.0f}")
                    window, t_win, n_win = [], time.perf_counter(), 0
                if step % spe == 0:
                    t_hook = time.perf_counter()
                    aux, scalars = task.end_of_epoch(step // spe, state.params, aux)
                    if scalars:  # the hook did work (re-partition, leaf placement)
                        phases["end_of_epoch_s"].append(time.perf_counter() - t_hook)
                    aux_dev = mesh_lib.put_replicated(task.device_aux(aux), mesh)
                    if scalars:
                        writer.write(step, scalars, prefix="partition/")
                at_epoch_end = step % spe == 0
                if at_epoch_end or (tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0) \
                        or stop.raised is not None:
                    train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    check_finite(window, step, last_saved, workdir)  # never save a diverged state
                    save(step)
                    last_saved = step
                if stop.raised is not None:
                    log.warning("signal %d: saved step %d in %s and stopped", stop.raised, step, workdir)
                    interrupted = True
                    break
                if not window:  # hooks and saves stay out of the next window's step time
                    t_win = time.perf_counter()
            train_seconds += time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    phases["step_ms"] = float(np.median(phases["step_ms"])) if phases["step_ms"] else None
    return FitResult(params=state.params, aux=aux, step=step, epoch=step // spe,
                     train_seconds=train_seconds, interrupted=interrupted, stop_signal=stop.raised, phases=phases)


def fit_stages(method, config, workdir: str, mesh: Mesh, *, data_fingerprint: str,
               progress: bool = True) -> tuple[Trainable, FitResult]:
    """Train a method; returns (the Trainable of its last stage, that stage's FitResult).

    A single-stage method is itself the Trainable and trains in `workdir`. A
    method with `stages` (names) and `stage(name, previous_result)` (a
    Trainable with an `epochs` attribute) trains each stage in `workdir/<name>`,
    in order, each starting from the previous stage's result; re-running
    resumes whichever stage was interrupted (finished stages restore at once).
    """
    if not getattr(method, "stages", ()):
        return method, fit(method, config, workdir, mesh, data_fingerprint=data_fingerprint, progress=progress)
    result = None
    for name in method.stages:
        task = method.stage(name, result)
        result = fit(task, config, stage_dir(workdir, name), mesh, data_fingerprint=data_fingerprint,
                     progress=progress, epochs=task.epochs, seconds_before=result.train_seconds if result else 0.0)
        if result.interrupted:
            break
    return task, result


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


class NonFiniteError(FloatingPointError, ValueError):
    """A training metric became NaN or Inf; the run stops and its last good checkpoint stays."""


def check_finite(window: list, step: int, last_saved: Optional[int], workdir: str) -> None:
    """Raise NonFiniteError naming the first step and metric in `window` (the per-step metrics of the
    steps up to `step`) that is NaN or Inf, and the checkpoint a rerun resumes from."""
    for i, metrics in enumerate(window):
        for name in sorted(metrics, key=lambda k: k != "loss"):  # the loss first, then the rest
            value = float(metrics[name])
            if not np.isfinite(value):
                kept = f"step {last_saved} is the last good checkpoint" if last_saved is not None else "no checkpoint"
                raise NonFiniteError(
                    f"{workdir}: train/{name} is {value} at step {step - len(window) + i + 1}; training stopped "
                    f"({kept}). Lower train.learning_rate or look for extreme values in the data.")


def _restore_target(tx, mesh: Mesh, leaf_spec, params_meta, aux_meta) -> dict:
    """What a train state restores into, from a checkpoint's own array metadata: the parameters' shapes
    give the optimizer state's (by `eval_shape`, nothing allocated), laid out on `mesh`; aux as host arrays."""
    params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), params_meta)
    shapes = jax.eval_shape(lambda p: state_lib.create(p, tx), params)
    shardings = state_lib.state_shardings(shapes, mesh, leaf_spec)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return {"state": state, "aux": jax.tree.map(lambda m: np.zeros(tuple(m.shape), m.dtype), aux_meta)}


def check_run_dir(workdir: str, task: Trainable, fingerprint: str) -> None:
    """Refuse, before anything is read into memory or written, a `workdir` whose newest readable
    checkpoint is of another method, other data or other shapes (one message naming the field, the
    checkpoint's value and the new one). A directory without checkpoints passes."""
    meta = ckpt_lib.newest_meta(workdir)
    if meta is not None:
        _check_meta(meta, task, fingerprint, workdir)


def _check_meta(meta: dict, task: Trainable, fingerprint: str, workdir: str) -> None:
    if meta.get("method") != task.name:
        raise ckpt_lib.CheckpointError(
            f"{workdir}: holds a {meta.get('method')} run (method {meta.get('method')!r}), not {task.name!r}; "
            "use a new --workdir")
    if meta.get("data_fingerprint") != fingerprint:
        raise ckpt_lib.CheckpointError(
            f"{workdir}: checkpoint was trained on other data (fingerprint {meta.get('data_fingerprint')} "
            f"vs {fingerprint}); use a new --workdir")
    ckpt_lib.check_compatible(meta, task.shapes(), workdir)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
