"""The scaling study (launch/bench_scaling.py) at sizes of seconds: its data generators, the XMC and ANN
measurements (run in this process instead of one process per measurement) and the devices part."""
import importlib.util
import os

import numpy as np
import pytest

from jaxidx.data import glove_split, load
from jaxidx.data.synthetic import scaling_xmc_rows, scaling_xmc_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", os.path.join(REPO, "launch", "bench_scaling.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _in_process(scaling):
    return lambda kind, job, env=None: scaling.WORKERS[kind](job)


def test_scaling_xmc_data_has_fixed_examples_per_label_and_power_law_labels():
    for n_labels in (1000, 4000):
        data = load(scaling_xmc_spec(n_labels, n_test=50))
        assert data.X_train.shape[0] == scaling_xmc_rows(n_labels) == n_labels // 20
        assert (data.n_labels, data.n_features, data.X_test.shape[0]) == (n_labels, 10000, 50)
        counts = np.sort(np.asarray(data.Y_train.sum(axis=0)).ravel())[::-1]
        assert counts[0] >= 10 * max(np.median(counts), 1)  # a heavy head, most labels rare


def test_glove_copies_extend_glove_with_seeded_noisy_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXIDX_CACHE", str(tmp_path))  # ground truth cache
    spec = "glove-copies:base=390300,queries=20,noise=0.5,seed=0"
    data = load(spec)
    base, queries = glove_split()
    np.testing.assert_array_equal(data.base[:390000], base)
    np.testing.assert_array_equal(data.queries, queries[:20])
    copies = data.base[390000:]
    np.testing.assert_allclose(np.linalg.norm(copies, axis=1), 1.0, atol=1e-5)
    cos = np.sum(copies * base[:300], axis=1)  # noise of norm 0.5: cos about 1 / sqrt(1.25) = 0.89
    assert 0.85 < cos.mean() < 0.93 and cos.min() > 0.7
    exact = np.argsort(-(data.queries @ data.base.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(data.gt_ids[:, :10], exact)
    again = load(spec)  # same copies from the seed; ground truth from the cache
    np.testing.assert_array_equal(again.base, data.base)
    np.testing.assert_array_equal(again.gt_ids, data.gt_ids)
    np.testing.assert_array_equal(load("glove-copies:base=1000,queries=5").base, base[:1000])


def test_small_xmc_study_fills_the_table_and_memory_is_linear_in_labels(tmp_path, scaling):
    cfg = dict(scaling.SMALL, workdir=str(tmp_path))
    rows = (scaling.xmc_part(dict(cfg, xmc_methods=["irli"]), run=_in_process(scaling))["rows"]
            + scaling.xmc_part(dict(cfg, xmc_methods=["elias"], xmc_labels=cfg["xmc_labels"][:1]),
                               run=_in_process(scaling))["rows"])
    measured = [r for r in rows if "note" not in r]
    assert [(r["method"], r["labels"]) for r in measured] == [("irli", n) for n in cfg["xmc_labels"]] + [
        ("elias", cfg["xmc_labels"][0]), ("elias (dense label AdamW)", cfg["xmc_labels"][0]),  # lazy vs dense rows
        ("elias (C = L/100, cluster tree of 4 groups)", cfg["xmc_labels"][0])]  # C = 16 clusters under 4 groups
    assert any(r["method"] == "lmi" and "TypeError" in r["note"] for r in rows)  # LMI does not do XMC: said so
    for r in measured:
        for col in set(scaling.XMC_COLUMNS) - {"note", "device_peak_mb", "array_growth"}:
            assert r[col] is not None, col
        assert r["train_examples"] == r["labels"] // 20 and 0.0 <= r["P@1"] <= 1.0
        assert 0 < r["candidates_per_query"] <= r["labels"]
        assert min(r["latency_ms_p50"], r["queries_per_second"], r["train_rss_mb"], r["search_rss_mb"]) > 0
        assert all(float(ms) > 0 for ms in r["step_ms"].split("/"))
        assert len(r["step_ms"].split("/")) == (2 if r["method"].startswith("elias") else 1)
    # O(N + L): no array of the trained state or the index grows faster than L (B grows like sqrt L).
    assert measured[1]["array_growth"] <= 1.05


def test_small_ann_study_beside_faiss_and_hnswlib(tmp_path, scaling):
    cfg = dict(scaling.SMALL, workdir=str(tmp_path), ann_sizes=[2000, 4000], irli_ann_max=2000,
               hnsw_budget=0.0)  # hnswlib: built once, then skipped
    out = scaling.ann_part(cfg, run=_in_process(scaling))
    summary, sweeps = out["rows"], out["sweeps"]
    n1, n2 = cfg["ann_sizes"]
    rows = {(r["method"], r["n"]): r for r in summary}
    assert {m for m, n in rows if n == n1} == {"lmi", "irli", "faiss-ivf-flat", "brute force", "hnswlib"}
    assert "skipped" in rows[("irli", n2)]["note"]
    assert "skipped" in rows[("hnswlib", n2)]["note"] and "vectors/s" in rows[("hnswlib", n2)]["note"]
    faiss = rows[("faiss-ivf-flat", n1)]
    for method in ("lmi", "irli"):
        r = rows[(method, n1)]
        assert r["buckets"] == faiss["buckets"] and r["build_s"] > 0 and 0 <= r["recall@10"] <= 1
        assert r["queries_per_second"] > 0
        params = sum(b for k, (_, b) in r["arrays"].items() if k.startswith("index.params"))
        per_vector = r["bytes_per_vector"] - params / n1  # the vectors and the partition
        assert 200 <= per_vector <= faiss["bytes_per_vector"] * (1.05 if method == "lmi" else 1.1)
    assert rows[("lmi", n2)]["array_growth"] <= 1.05
    assert rows[("brute force", n1)]["recall@10"] == 1.0
    assert all(0 <= s["recall@10"] <= 1 for s in sweeps)


def test_small_devices_study_trains_the_same_on_1_2_4_8_devices(tmp_path, scaling):
    cfg = dict(scaling.SMALL, workdir=str(tmp_path), device_methods=["irli"])
    rows = scaling.devices_part(cfg)["rows"]  # one process with 8 simulated CPU devices
    assert [r["devices"] for r in rows] == [1, 2, 4, 8]
    for r in rows:
        assert r["same_training"] and r["max_loss_rel_diff"] < 1e-4, r
        assert r["steps"] > 0 and r["examples_per_second"] > 0
