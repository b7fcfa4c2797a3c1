"""Small utilities the end-to-end tests share."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path_and_preset: str, **overrides):
    """`configs/x.py:preset` -> locked ConfigDict with dotted overrides applied (jaxidx's one config loader)."""
    from jaxidx.config import get_config
    path, preset = path_and_preset.split(":", 1)
    return get_config(f"{os.path.basename(path)[:-3]}:{preset}", overrides=overrides)


def run_python(code: str, env_extra: dict | None = None, timeout: int = 300, cwd: str = REPO) -> dict:
    """Run `code` in a fresh interpreter (e.g. with another JAX device count); it prints one JSON line last."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=cwd)
    if out.returncode != 0:
        raise AssertionError(f"subprocess failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def crash_and_resume(method, config, data, mesh, tmp_path):
    """Train run `a` to the end; copy it to `b`, drop every checkpoint after its first mid-epoch
    one (a crash), rerun `b`. Returns (uninterrupted FitResult, resumed FitResult)."""
    import shutil
    from jaxidx.train.loop import fit
    full = fit(method, config, str(tmp_path / "a"), mesh, data_fingerprint=data.fingerprint(), progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ck = tmp_path / "b" / "checkpoints"
    steps = sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    keep = [s for s in steps if s % method.steps_per_epoch][0]  # a mid-epoch checkpoint
    for s in steps:
        if s > keep:
            shutil.rmtree(ck / str(s))
    resumed = fit(method, config, str(tmp_path / "b"), mesh, data_fingerprint=data.fingerprint(), progress=False)
    return full, resumed


def assert_same_params(a, b):
    """Bit-identical parameter trees."""
    import jax
    import numpy as np
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def restore_run(workdir: str):
    """(config, trainable, data, params, aux, step) of a run's newest checkpoint, for tests that inspect
    training state (a user opens the index with `jaxidx.load`)."""
    import ml_collections
    from jaxidx.runner import build
    from jaxidx.train.checkpoint import Checkpointer
    ckpt = Checkpointer(workdir, read_only=True)
    step, params, aux, meta = ckpt.restore_params()
    ckpt.close()
    config = ml_collections.ConfigDict(meta["config"])
    method, data, _ = build(config)
    return config, method, data, params, aux, step


def train_stages(workdir, config, data, stop_at=None):
    """`fit_stages` of a staged method (ELIAS); stop_at=(stage name, global step) sends this process SIGTERM
    before that step of that stage (a stop the run must resume from)."""
    import signal
    from jaxidx.runner import build
    from jaxidx.train.loop import fit_stages
    method, data, mesh = build(config, data=data)
    if stop_at is not None:
        make = method.stage

        def stage(name, previous=None):
            task = make(name, previous)
            if name == stop_at[0]:
                batch = task.batch

                def stopping_batch(epoch, index):
                    if epoch * task.steps_per_epoch + index == stop_at[1]:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return batch(epoch, index)
                task.batch = stopping_batch
            return task
        method.stage = stage
    return fit_stages(method, config, str(workdir), mesh, data_fingerprint=data.fingerprint(), progress=False)
