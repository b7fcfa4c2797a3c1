"""Two local JAX processes (gloo collectives on 127.0.0.1), each building only its half of every
batch, train IRLI tiny together as one process with as many devices does; one process then
restores the checkpoint and evaluates it with the same results."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO
from jaxidx.train.metrics_log import read_metrics

pytestmark = pytest.mark.multiprocess

_TRAIN = [sys.executable, os.path.join(REPO, "launch", "train.py"),
          "--config=" + os.path.join(REPO, "configs/irli.py:tiny"), "--noprogress", "--config.train.epochs=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _eval(wd: str, name: str = "eval.json") -> dict:
    with open(os.path.join(wd, name)) as f:
        return json.load(f)


def _losses(wd: str) -> list:
    return [r["train/loss"] for r in read_metrics(wd) if "train/loss" in r]


def test_two_processes_train_then_one_evaluates(tmp_path):
    wd, wd_one = str(tmp_path / "run"), str(tmp_path / "one")
    port = _free_port()
    cmd = _TRAIN + [f"--workdir={wd}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=_env(2), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    trained = _eval(wd)
    assert trained["step"] > 0
    # One process with the same 4 devices trains the same model (sums over devices in another order).
    out = subprocess.run(_TRAIN + [f"--workdir={wd_one}"], env=_env(4), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    np.testing.assert_allclose(_losses(wd), _losses(wd_one), rtol=1e-5)
    for a, b in zip(trained["results"], _eval(wd_one)["results"]):
        assert a["recall@10"] == pytest.approx(b["recall@10"], abs=0.005)
        assert a["candidates_per_query"] == pytest.approx(b["candidates_per_query"], rel=0.01)
    # A single process (1 device) restores the 2-process, 4-device checkpoint and evaluates it.
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), f"--workdir={wd}",
                          "--out=eval_single.json"], env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    single = _eval(wd, "eval_single.json")
    assert single["step"] == trained["step"]
    for a, b in zip(trained["results"], single["results"]):
        assert a["recall@10"] == b["recall@10"] and a["candidates_per_query"] == b["candidates_per_query"]
