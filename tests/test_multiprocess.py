"""Two local JAX processes (gloo collectives on 127.0.0.1) train IRLI tiny together; one
process then restores the checkpoint and evaluates it with the same results."""
import json
import os
import socket
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_then_one_evaluates(tmp_path):
    wd = str(tmp_path / "run")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config=" + os.path.join(REPO, "configs/irli.py:tiny"),
           f"--workdir={wd}", "--noprogress", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           "--config.train.epochs=2"]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    with open(os.path.join(wd, "eval.json")) as f:
        trained = json.load(f)
    assert trained["step"] > 0
    # A single process (1 device) restores the 2-process, 4-device checkpoint and evaluates it.
    env1 = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), f"--workdir={wd}",
                          "--out=eval_single.json"], env=env1, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(wd, "eval_single.json")) as f:
        single = json.load(f)
    assert single["step"] == trained["step"]
    for a, b in zip(trained["results"], single["results"]):
        assert a["recall@10"] == b["recall@10"] and a["candidates_per_query"] == b["candidates_per_query"]
