"""Interrupted runs lose nothing; bad configs, broken checkpoints and queries that do not fit the index
fail loudly or fall back."""
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import REPO, load_config
from jaxidx.runner import build, evaluate_checkpoint
from jaxidx.train.checkpoint import Checkpointer
from jaxidx.train.batches import xmc_inputs
from jaxidx.train.loop import fit

TRAIN = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config=" + os.path.join(REPO, "configs/irli.py:tiny"),
         "--noprogress", "--config.train.epochs=3", "--config.train.checkpoint_every_steps=3",
         "--config.train.keep_checkpoints=100"]
ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def _steps(wd):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(wd, "checkpoints", "*"))
                  if os.path.basename(p).isdigit())


def _final_state(wd):
    step, params, aux, _ = Checkpointer(wd, read_only=True).restore_params()
    return step, params, aux


def _assert_same(a, b):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[2]["assign"], b[2]["assign"])
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _start(wd):
    return subprocess.Popen(TRAIN + [f"--workdir={wd}"], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_steps(proc, wd, n, timeout=240):
    t0 = time.time()
    while len([s for s in _steps(wd) if s > 0]) < n:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout, "training made no checkpoints in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("whole"))
    out = subprocess.run(TRAIN + [f"--workdir={wd}"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return _final_state(wd)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    wd = str(tmp_path / "killed")
    proc = _start(wd)
    _wait_for_steps(proc, wd, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = _steps(wd)
    assert done and done[-1] < uninterrupted[0]
    # A kill may land in the middle of a save: leave a half-written step behind on purpose.
    os.makedirs(os.path.join(wd, "checkpoints", f"{done[-1] + 1}.orbax-checkpoint-tmp-123"), exist_ok=True)
    out = subprocess.run(TRAIN + [f"--workdir={wd}"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _assert_same(_final_state(wd), uninterrupted)


def test_sigterm_saves_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    wd = str(tmp_path / "term")
    proc = _start(wd)
    _wait_for_steps(proc, wd, 1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]  # not 0: a scheduler can tell and requeue
    assert "stopped by signal 15: checkpoint of step" in out
    out = subprocess.run(TRAIN + [f"--workdir={wd}"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _assert_same(_final_state(wd), uninterrupted)


def test_corrupted_newest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    config = load_config("configs/irli.py:tiny", **{"train.epochs": 2, "train.keep_checkpoints": 10})
    method, data, mesh = build(config)
    fit(method, config, str(tmp_path), mesh, data_fingerprint=data.fingerprint(), progress=False)
    steps = _steps(str(tmp_path))
    newest = os.path.join(str(tmp_path), "checkpoints", str(steps[-1]), "state")
    for path in glob.glob(os.path.join(newest, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"garbage")
    with caplog.at_level("WARNING"):
        step, _, _, _ = Checkpointer(str(tmp_path), read_only=True).restore_params()
    assert step == steps[-2]
    assert any("unreadable" in r.message for r in caplog.records)


@pytest.mark.parametrize("field,value,needle", [
    ("model.n_buckets", 1, "model.n_buckets"),
    ("partition.top_k", 99, "partition.top_k"),
    ("train.learning_rate", -1.0, "train.learning_rate"),
    ("search.k", 0, "search.k"),
    ("model.loss", "hinge", "model.loss"),
    ("search.settings", [{"m": 17, "min_count": 1}], "m=17"),
    ("search.settings", [{"m": 2, "min_count": 3}], "min_count=3"),
    ("partition.capacity_factor", 0.5, "partition.capacity_factor"),
])
def test_invalid_config_values_are_rejected_with_the_field(field, value, needle):
    config = load_config("configs/irli.py:tiny", **{field: value})
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        build(config)


def test_unknown_override_fails_at_start():
    with pytest.raises(ValueError, match="no field .epochz."):
        load_config("configs/irli.py:tiny", **{"train.epochz": 3})
    out = subprocess.run(TRAIN + ["--workdir=/nonexistent/x", "--config.train.epochz=3"], env=ENV, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "epochz" in out.stderr


def test_batch_not_divisible_by_devices_is_rejected(tmp_path):
    code = f"""
import sys; sys.path.insert(0, 'tests')
from helpers import load_config
from jaxidx.runner import build
from jaxidx.train.loop import fit
config = load_config('configs/irli.py:tiny', **{{'train.batch_size': 100}})
method, data, mesh = build(config)
try:
    fit(method, config, {str(tmp_path)!r}, mesh, data_fingerprint=data.fingerprint(), progress=False)
except ValueError as e:
    print(__import__('json').dumps({{'error': str(e)}}))
"""
    from helpers import run_python
    out = run_python(code, {"JAX_NUM_CPU_DEVICES": "8"})
    assert "train.batch_size" in out["error"] and "8" in out["error"]


# --- queries that do not fit the index ---------------------------------------------------------------

def _untrained_index(preset, **overrides):
    """(index, data, first search setting) of a freshly initialised method (stage 1 for ELIAS)."""
    config = load_config(preset, **overrides)
    method, data, _ = build(config)
    task = method.stage("stage1") if getattr(method, "stages", ()) else method
    params, aux = task.init(jax.random.key(0))
    return task.index(params, aux), data, dict(config.search.settings[0])


@pytest.mark.parametrize("preset", ["configs/irli.py:tiny", "configs/lmi.py:tiny"])
def test_ann_queries_of_another_dimension_are_refused(preset):
    index, data, setting = _untrained_index(preset)
    assert index.query(data.queries[:5], setting, 10).ids.shape == (5, 10)
    assert index.query(data.queries[0], setting, 10).ids.shape == (1, 10)  # one query as a vector
    for queries in (data.queries[:, :8], data.queries[0, :8], data.queries[None]):
        with pytest.raises(ValueError) as err:
            index.query(queries, setting, 10)
        assert str(err.value) == (f"queries: expected shape [n, 16] (the index's dimension), got "
                                  f"{list(queries.shape)}")


@pytest.mark.parametrize("preset, overrides", [
    ("configs/irli.py:tiny-xmc", {"model.dense_input_max_features": 0}),  # embedding bag: would clamp silently
    ("configs/irli.py:tiny-xmc", {}),  # densified input
    ("configs/elias.py:tiny", {}),
])
def test_xmc_feature_ids_beyond_the_index_are_refused(preset, overrides):
    index, data, setting = _untrained_index(preset, **overrides)
    queries = xmc_inputs(data.X_test)
    assert index.query(queries, setting, 10).ids.shape == (data.X_test.shape[0], 10)
    queries["idx"][1, 0] = data.n_features
    with pytest.raises(ValueError, match=f"queries: feature id {data.n_features} outside the index's "
                                         f"{data.n_features} features"):
        index.query(queries, setting, 10)


def test_evaluate_checkpoint_on_data_of_another_dimension_is_refused(tmp_path):
    config = load_config("configs/lmi.py:tiny", **{"train.epochs": 0})
    method, data, mesh = build(config)
    fit(method, config, str(tmp_path), mesh, data_fingerprint=data.fingerprint(), progress=False)
    with pytest.raises(ValueError, match="checkpoint has dim=16 but the current data/config gives dim=8"):
        evaluate_checkpoint(str(tmp_path), overrides={"data": "synthetic-ann:n=3000,q=200,d=8,clusters=30,seed=0"})
    assert not (tmp_path / "eval.json").exists()


def test_non_finite_loss_stops_naming_step_and_metric_and_keeps_the_last_good_checkpoint(tmp_path):
    from jaxidx.train.loop import NonFiniteError
    config = load_config("configs/irli.py:tiny", **{"train.epochs": 1, "train.log_every": 1,
                                                    "train.checkpoint_every_steps": 2, "train.keep_checkpoints": 10})
    method, data, mesh = build(config)
    batch = method.batch

    def poisoned(epoch, index):  # the data turns to NaN from the 6th step on
        out = batch(epoch, index)
        if epoch * method.steps_per_epoch + index >= 5:
            out["x"] = np.full_like(out["x"], np.nan)
        return out
    method.batch = poisoned
    with pytest.raises(NonFiniteError, match=r"train/loss is nan at step 6; training stopped \(step 4 is the last "
                                             r"good checkpoint\)"):
        fit(method, config, str(tmp_path), mesh, data_fingerprint=data.fingerprint(), progress=False)
    assert _steps(str(tmp_path)) == [0, 2, 4]
    step, params, _, _ = Checkpointer(str(tmp_path), read_only=True).restore_params()
    assert step == 4 and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
