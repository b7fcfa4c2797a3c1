"""Orbax checkpoints: the train state together with everything needed to use it.

A checkpoint is one step directory holding `state` (params, optimizer state,
step and the method's aux arrays, e.g. the partition the model was trained
against) and `meta` (JSON: method, epoch, config, data fingerprint and shapes).
Orbax writes into a temporary directory and renames it when complete, so a
kill during a save never leaves a step that looks finished; a finished step
that fails to restore (corrupted files) is skipped with a warning in favour of
the previous good one. Arrays are saved in their global, mesh-independent form,
so a checkpoint written on 8 devices restores on 1.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not fit the current model/data."""


@contextlib.contextmanager
def quiet_orbax():
    """Hide orbax's absl warnings about a read-only manager and item metadata (the reads are meant)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _manager(workdir: str, max_to_keep: Optional[int] = 3, read_only: bool = False) -> ocp.CheckpointManager:
    with quiet_orbax():
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
        return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


class Checkpointer:
    """Save / restore (state, meta) pairs under `workdir/checkpoints`."""

    def __init__(self, workdir: str, max_to_keep: Optional[int] = 3, read_only: bool = False):
        self.workdir = workdir
        self._mngr = _manager(workdir, max_to_keep, read_only)

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._mngr.wait_until_finished()

    def read_meta(self, step: Optional[int] = None) -> tuple[int, dict]:
        """Meta of `step` (default: the newest readable one)."""
        for s in self._candidates(step):
            try:
                out = self._mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                return s, dict(out["meta"])
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                self._skip(s, step, e)
        raise CheckpointError(f"no readable checkpoint in {self.workdir}/checkpoints")

    def restore(self, target: Any, step: Optional[int] = None) -> tuple[int, Any, dict]:
        """Restore a whole train state into `target`: a tree of the structure, dtypes and shardings to
        restore into, or a function `(params_metadata, aux_metadata) -> tree` that builds it from each
        step's own array metadata (so resuming needs no model init). Tries `step` (or the newest step,
        then older ones if it is corrupted)."""
        for s in self._candidates(step):
            try:
                if callable(target):
                    tree = self._array_metadata(s)
                    abstract_state = target(tree["state"]["params"], tree["aux"])
                else:
                    abstract_state = target
                out = self._mngr.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return s, out["state"], dict(out["meta"])
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                if isinstance(e, CheckpointError):
                    raise
                self._skip(s, step, e)
        raise CheckpointError(f"no restorable checkpoint in {self.workdir}/checkpoints")

    def restore_params(self, step: Optional[int] = None) -> tuple[int, Any, dict, dict]:
        """(step, params, aux, meta) as host arrays, for serving: an orbax partial restore of the
        parameters and the aux arrays alone, shapes read from the checkpoint's own metadata (no
        optimizer moments are read, no model is initialised). Falls back past corrupted steps like `restore`."""
        import numpy as np
        for s in self._candidates(step):
            try:
                path = self._state_dir(s)
                tree = self._array_metadata(s)
                target = {"state": {"params": tree["state"]["params"]}, "aux": tree["aux"]}
                target = jax.tree.map(lambda m: np.zeros(tuple(m.shape), m.dtype), target)
                args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
                with quiet_orbax():
                    out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
                        item=target, restore_args=args, partial_restore=True))
                _, meta = self.read_meta(s)
                return s, out["state"]["params"], dict(out["aux"]), meta
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                if isinstance(e, CheckpointError):
                    raise
                self._skip(s, step, e)
        raise CheckpointError(f"no restorable checkpoint in {self.workdir}/checkpoints")

    def _state_dir(self, step: int) -> str:
        return os.path.join(str(self._mngr.directory), str(step), "state")

    def _array_metadata(self, step: int) -> dict:
        """The saved state's tree of array metadata (shape, dtype per leaf)."""
        with quiet_orbax():
            tree = ocp.PyTreeCheckpointer().metadata(self._state_dir(step))
        tree = getattr(tree, "item_metadata", tree)
        return getattr(tree, "tree", tree)

    def _candidates(self, step: Optional[int]) -> list[int]:
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"step {step} not in {self.workdir}/checkpoints (have {steps})")
            return [step]
        return steps[::-1]

    def _skip(self, s: int, asked: Optional[int], err: Exception) -> None:
        if asked is not None:
            raise CheckpointError(f"checkpoint step {s} in {self.workdir} cannot be restored: {err}") from err
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                    s, self.workdir, type(err).__name__, err)

    def close(self) -> None:
        self._mngr.close()


def newest_meta(workdir: str) -> Optional[dict]:
    """The meta of the newest finished step under `workdir/checkpoints` that has readable meta, read as a
    file: no orbax manager, so a check that each process of a multi-process run makes at its own moment
    never enters one of orbax's collectives. None without checkpoints."""
    import json
    d = os.path.join(workdir, "checkpoints")
    steps = sorted((int(n) for n in os.listdir(d) if n.isdigit()), reverse=True) if os.path.isdir(d) else []
    for s in steps:
        try:
            with open(os.path.join(d, str(s), "meta", "metadata"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):  # damaged: restoring falls back past it, with a warning
            continue
    return None


def check_compatible(meta: dict, expected: dict, where: str) -> None:
    """Refuse a checkpoint whose recorded shapes/data differ from the current ones, naming the field."""
    for key, want in expected.items():
        have = meta.get("shapes", {}).get(key)
        if have is not None and have != want:
            raise CheckpointError(
                f"{where}: checkpoint has {key}={have} but the current data/config gives {key}={want}")


def jsonable(x):
    """Plain JSON types for metadata: dict keys as strings, tuples as lists, NumPy scalars as Python ones."""
    import numpy as np
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x
