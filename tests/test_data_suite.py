"""The ANN robustness suite's data specs, and `bench_ann.py --suite` end to end on a tiny set."""
import json
import os
import subprocess
import sys

import numpy as np

from helpers import REPO
from jaxidx.data import exact_knn, load
from jaxidx.data.suite import SUITE


def _check_ground_truth(d, n=5):
    ids, dist = exact_knn(d.queries[:n], d.base, 10, d.metric)
    np.testing.assert_array_equal(ids[:, :3], d.gt_ids[:n, :3])
    np.testing.assert_allclose(dist, d.gt_dist[:n, :10], rtol=1e-4, atol=1e-4)


def test_every_suite_spec_parses():
    from jaxidx.data.specs import SPEC_FORMS
    kinds = {spec.split(":")[0] for spec in SUITE}
    assert kinds <= {"glove-6b-50d", "glove-6b-50d-raw", "xmc-dense", "xmc-svd", "synthetic-ann"}
    assert any("xmc-svd" in f for f in SPEC_FORMS) and any("glove-6b-50d-raw" in f for f in SPEC_FORMS)


def test_glove_raw_is_unnormalised_euclidean():
    raw = load("glove-6b-50d-raw:base=3000,queries=20")
    unit = load("glove-6b-50d:base=3000,queries=20")
    norms = np.linalg.norm(raw.base, axis=1)
    assert raw.metric == "euclidean" and norms.std() > 0.5  # norms vary
    np.testing.assert_allclose(raw.base / norms[:, None], unit.base, atol=1e-5)
    _check_ground_truth(raw)


def test_xmc_rows_dense_and_svd(shared_xmc):
    dense = load("xmc-dense:bibtex")
    assert dense.base.shape == (4880, 1836) and set(np.unique(dense.base)) <= {0.0, 1.0}
    assert dense.metric == "euclidean"
    _check_ground_truth(dense)
    svd = load("xmc-svd:bibtex,dim=16")
    assert svd.base.shape == (4880, 16) and svd.queries.shape == (2515, 16)
    _check_ground_truth(svd)


def test_unequal_clusters():
    d = load("synthetic-ann:n=5000,q=10,d=8,clusters=50,metric=euclidean,seed=5,zipf=1.5")
    uniform = load("synthetic-ann:n=5000,q=10,d=8,clusters=50,metric=euclidean,seed=5")
    assert d.name.endswith("zipf=1.5") and d.base.shape == uniform.base.shape
    # The largest cluster holds about a third of the points under zipf 1.5 (1/ζ-ish), far above 1/50.
    from scipy.cluster.vq import vq
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((50, 8)).astype(np.float32)
    sizes = np.bincount(vq(d.base, centres)[0], minlength=50)
    assert sizes.max() > 0.2 * len(d.base)


def test_bench_ann_suite_runs_and_reports_ratios_to_ivf(tmp_path):
    spec = "synthetic-ann:n=2000,q=50,d=8,clusters=20,metric=euclidean,seed=1"
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "bench_ann.py"), "--suite", f"--suite_data={spec}",
                          "--nohnsw", f"--suite_dir={tmp_path / 'runs'}", f"--out={tmp_path / 'suite.json'}"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.load(open(tmp_path / "suite.json"))
    rows = {r["method"].split(" ")[0]: r for r in res["suite"]}
    assert {"lmi", "irli", "faiss-ivf-flat", "brute"} <= set(rows)
    assert rows["faiss-ivf-flat"]["qps_vs_ivf@0.90"] == 1.0
    ivf = [r for r in res["rows"][spec] if r["method"].startswith("faiss-ivf-flat")]
    assert max(r["candidates_per_query"] for r in ivf) == 2000  # all lists: the base once (not once per timed run)
    for m in ("lmi", "irli"):
        assert rows[m]["cand@0.90"] != "not reached" and rows[m]["cand_vs_ivf@0.90"] > 0
