"""The `launch/` entry points as a user runs them: mismatched run directories are refused before any
restore or write, errors are one line with a non-zero status, results are never overwritten silently,
plots work from the README's commands, and data paths are stored absolute."""
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys

import h5py
import numpy as np
import pytest

from helpers import REPO

ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
IRLI = os.path.join(REPO, "configs", "irli.py")


def launch(script, *args, cwd=REPO, env=None, timeout=600):
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], cwd=cwd,
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)


def snapshot(d) -> dict:
    """{relative path: sha256} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def one_line_error(proc) -> str:
    """The process failed with status 2 and exactly one line on stderr, `error: ...`; returns it."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def ann_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ann") / "run")
    out = launch("train.py", f"--config={IRLI}:tiny", f"--workdir={wd}", "--noprogress", "--config.train.epochs=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checkpoints, metrics.jsonl and tensorboard/ in {wd}" in out.stdout
    assert f"results: {wd}/eval.json" in out.stdout
    return wd


@pytest.fixture(scope="module")
def xmc_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("xmc") / "run")
    out = launch("train.py", f"--config={IRLI}:tiny-xmc", f"--workdir={wd}", "--noprogress",
                 "--config.train.epochs=2")
    assert out.returncode == 0, out.stderr[-3000:]
    return wd


@pytest.fixture(scope="module")
def elias_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("elias") / "run")
    out = launch("train.py", "--config=configs/elias.py:tiny", f"--workdir={wd}", "--noprogress",
                 "--config.train.epochs=1", "--config.train.stage2_epochs=1")
    assert out.returncode == 0, out.stderr[-3000:]
    return wd


# --- another run in the run directory -----------------------------------------------------------------

@pytest.mark.parametrize("run,args,needle", [
    ("ann", [f"--config={IRLI}:tiny", "--config.model.n_buckets=32"],
     "checkpoint has n_buckets=16 but the current data/config gives n_buckets=32"),
    ("ann", ["--config=configs/lmi.py:tiny"], "holds a irli run (method 'irli'), not 'lmi'"),
    ("ann", [f"--config={IRLI}:tiny-xmc"], "checkpoint was trained on other data (fingerprint"),
    ("xmc", ["--config=configs/elias.py:tiny"], "holds a irli run (method 'irli'), not 'elias'"),
])
def test_another_run_in_the_workdir_is_refused_and_nothing_written(ann_run, xmc_run, run, args, needle):
    wd = ann_run if run == "ann" else xmc_run
    before = snapshot(wd)
    line = one_line_error(launch("train.py", *args, f"--workdir={wd}", "--noprogress"))
    assert needle in line and wd in line
    assert snapshot(wd) == before  # no checkpoint, log, eval.json or stage directory written


def test_elias_run_refuses_irli(elias_run):
    before = snapshot(elias_run)
    line = one_line_error(launch("train.py", f"--config={IRLI}:tiny-xmc", f"--workdir={elias_run}", "--noprogress"))
    assert "holds a elias run (method 'elias'), not 'irli'" in line
    assert snapshot(elias_run) == before


# --- one-line errors ---------------------------------------------------------------------------------------

def test_config_typo_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    args = [f"--config={IRLI}:tiny", f"--workdir={tmp_path / 'r'}", "--config.train.epochz=3"]
    line = one_line_error(launch("train.py", *args))
    assert "epochz" in line and 'Did you mean "epochs"' in line
    verbose = launch("train.py", *args, "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_preset_and_missing_shared_data(tmp_path):
    line = one_line_error(launch("train.py", f"--config={IRLI}:tinyy", f"--workdir={tmp_path / 'r'}"))
    assert "config preset 'tinyy' unknown; valid:" in line and "tiny-xmc" in line
    env = dict(ENV, JAXIDX_SHARED_DATA=str(tmp_path / "nowhere"))
    line = one_line_error(launch("train.py", f"--config={IRLI}:bibtex", f"--workdir={tmp_path / 'r'}", env=env))
    assert "bibtex: no train.txt and test.txt in" in line and "$JAXIDX_SHARED_DATA" in line


# --- evaluation results are never overwritten silently ----------------------------------------------------

def test_eval_names_results_by_step_and_settings_and_refuses_to_overwrite(ann_run):
    step = json.load(open(os.path.join(ann_run, "eval.json")))["step"]
    train_eval = snapshot(ann_run)["eval.json"]
    out = launch("eval.py", f"--workdir={ann_run}")
    assert out.returncode == 0, out.stderr[-3000:]
    path = os.path.join(ann_run, f"eval-step{step}.json")
    assert f"results: {path}" in out.stdout and os.path.exists(path)
    written = snapshot(ann_run)[os.path.basename(path)]
    line = one_line_error(launch("eval.py", f"--workdir={ann_run}"))
    assert path in line and "--overwrite" in line
    assert snapshot(ann_run)[os.path.basename(path)] == written
    assert launch("eval.py", f"--workdir={ann_run}", "--overwrite").returncode == 0
    other = launch("eval.py", f"--workdir={ann_run}", '--config.search.settings=[{"m": 3, "min_count": 1}]')
    assert other.returncode == 0, other.stderr[-3000:]
    named = re.search(r"results: (\S+)", other.stdout).group(1)
    assert re.fullmatch(rf"eval-step{step}-[0-9a-f]{{8}}\.json", os.path.basename(named))
    assert json.load(open(named))["results"][0]["m"] == 3
    assert snapshot(ann_run)["eval.json"] == train_eval  # the training run's own results stay


@pytest.mark.parametrize("override,needle", [
    ('--config.search.settings=[{"m": 99}]', "search: m=99 must be an integer in [1, 16] (the buckets)"),
    ('--config.search.settings=[{"m": 2, "nprobe": 3}]', "search: unknown setting 'nprobe'; valid for irli: m"),
    ("--config.search.k=0", "search: k must be an integer >= 1, got 0"),
    ("--config.search.settingz=1", "config field 'search.settingz': search has no field 'settingz'"),
])
def test_eval_refuses_bad_settings_in_one_line(ann_run, override, needle):
    before = snapshot(ann_run)
    assert needle in one_line_error(launch("eval.py", f"--workdir={ann_run}", override))
    assert snapshot(ann_run) == before


# --- plots -----------------------------------------------------------------------------------------------

def test_readme_plot_commands_run(ann_run, elias_run, tmp_path):
    readme = open(os.path.join(REPO, "README.md")).read()
    commands = [line for line in readme.splitlines() if "launch/plot.py" in line and not line.startswith("#")]
    assert commands
    for i, line in enumerate(commands):
        args = shlex.split(line)[2:]
        args = [f"--workdir={ann_run}" if a.startswith("--workdir=") else
                f"--out={tmp_path / f'new{i}' / 'dir' / 'plot.png'}" if a.startswith("--out=") else a for a in args]
        out = launch("plot.py", *args)
        assert out.returncode == 0, (line, out.stderr[-3000:])
        assert os.path.exists(tmp_path / f"new{i}" / "dir" / "plot.png")
        assert "INFO" not in out.stderr and "WARNING" not in out.stderr  # library logs stay quiet
    # A run trained in stages keeps its metrics per stage; both are plotted.
    out = launch("plot.py", "curves", f"--workdir={elias_run}", f"--out={tmp_path / 'elias.png'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.exists(tmp_path / "elias.png")


# --- data paths --------------------------------------------------------------------------------------------

def test_relative_data_path_is_stored_absolute(tmp_path):
    from jaxidx.data import synthetic_ann
    d = synthetic_ann(n_base=600, n_queries=40, dim=8, n_clusters=6, metric="euclidean", seed=0)
    with h5py.File(tmp_path / "mine.h5", "w") as f:
        f["train"], f["test"] = d.base, d.queries
        f["neighbors"], f["distances"] = d.gt_ids, d.gt_dist
        f.attrs["distance"] = "euclidean"
    out = launch("train.py", f"--config={IRLI}:tiny", "--workdir=run", "--noprogress", "--config.data=ann-hdf5:mine.h5",
                 "--config.train.epochs=1", cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.load(open(tmp_path / "run" / "eval.json"))["data"] == f"ann-hdf5:{tmp_path / 'mine.h5'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = launch("eval.py", f"--workdir={tmp_path / 'run'}", cwd=str(elsewhere))
    assert out.returncode == 0, out.stderr[-3000:]
    assert np.isfinite(json.load(open(re.search(r"results: (\S+)", out.stdout).group(1)))["results"][0]["recall@10"])
