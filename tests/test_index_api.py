"""The public API: jaxidx.fit on arrays and (X, Y), Index.search / save / add / remove, jaxidx.load of saved
indexes and of run directories, and how bad input and damaged files fail."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import jaxidx
from helpers import REPO, run_python
from jaxidx.data import synthetic_ann, synthetic_xmc
from jaxidx.metrics import knn_recall

FAST = {"train__epochs": 2}


@pytest.fixture(scope="module")
def ann():
    return synthetic_ann(n_base=2000, n_queries=100, dim=16, n_clusters=20, metric="euclidean", seed=1)


@pytest.fixture(scope="module")
def xmc():
    return synthetic_xmc(n_train=1500, n_test=200, n_features=200, n_labels=80, seed=2)


@pytest.fixture(scope="module")
def ann_indexes(ann):
    """LMI and IRLI fitted on raw arrays (the auto presets, shortened)."""
    return {m: jaxidx.fit(m, ann.base, progress=False, **FAST) for m in ("lmi", "irli")}


@pytest.fixture(scope="module")
def xmc_indexes(xmc):
    return {m: jaxidx.fit(m, (xmc.X_train, xmc.Y_train), progress=False, **FAST) for m in ("irli", "elias")}


# --- fit and search --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lmi", "irli"])
def test_fit_on_arrays_searches_and_reports(ann, ann_indexes, method):
    index = ann_indexes[method]
    assert (index.method, index.metric, index.dim, len(index)) == (method, "euclidean", 16, 2000)
    ids, dist = index.search(ann.queries, k=10)
    assert ids.shape == dist.shape == (100, 10) and ids.dtype == np.int64 and dist.dtype == np.float32
    assert knn_recall(ids, ann.gt_ids, 10) > 0.15  # the first (cheapest) setting, 2 epochs; chance ~0.1
    assert ((ids >= 0) == np.isfinite(dist)).all()  # -1 (fewer than k in the probed buckets) has distance inf
    assert (np.diff(np.where(ids >= 0, dist, 3e38), axis=1) >= 0).all()  # euclidean distances, ascending
    # Scores are true L2 distances to the returned items.
    np.testing.assert_allclose(dist[:, 0], np.linalg.norm(ann.base[ids[:, 0]] - ann.queries, axis=1), rtol=1e-4)
    # The widest setting is (near) exact.
    wide = {"n_probe": index.n_leaves} if method == "lmi" else {"m": index.n_buckets}
    ids, _ = index.search(ann.queries, k=10, **wide)
    assert knn_recall(ids, ann.gt_ids, 10) > 0.99
    stats = index.stats()
    assert stats["bytes"] > ann.base.nbytes and stats["bucket_sizes"]["mean"] > 0


@pytest.mark.parametrize("method", ["irli", "elias"])
def test_fit_on_xmc_pair_searches_csr_and_dense(xmc, xmc_indexes, method):
    index = xmc_indexes[method]
    assert (index.method, index.dim, len(index)) == (method, 200, 80)
    ids, scores = index.search(xmc.X_test, k=5)
    assert ids.shape == (200, 5) and (np.diff(scores, axis=1) <= 1e-7).all()  # label scores, descending
    p1 = np.mean(np.asarray(xmc.Y_test[np.arange(200), ids[:, 0]]).ravel())
    assert p1 > 0.5
    dense_ids, _ = index.search(xmc.X_test.toarray(), k=5)
    np.testing.assert_array_equal(dense_ids, ids)


def test_query_blocks_pad_a_short_block_to_a_power_of_two():
    from jaxidx.index import query_blocks
    x = np.arange(300, dtype=np.float32)[:, None]
    for total, block, sizes in ((1, 256, [1]), (3, 256, [4]), (256, 256, [256]), (300, 256, [256, 64]),
                                (130, 100, [100, 32]), (120, 100, [100, 32])):
        blocks = list(query_blocks(x[:total], block))
        assert [len(b) for b, _ in blocks] == sizes and [n for _, n in blocks] == [min(block, total - i * block)
                                                                                  for i in range(len(sizes))]
        np.testing.assert_array_equal(np.concatenate([b[:n] for b, n in blocks]), x[:total])  # every row, in order
    (tokens, n), = query_blocks({"idx": np.ones((5, 2), np.int32)}, 256)  # dicts of rows alike
    assert n == 5 and tokens["idx"].shape == (8, 2)


@pytest.mark.parametrize("method", ["lmi", "irli"])
def test_one_query_gets_the_results_of_its_batch(ann_indexes, ann, method):
    index = ann_indexes[method]
    ids, dist = index.search(ann.queries, k=10)
    for i in (0, 37):
        one_ids, one_dist = index.search(ann.queries[i:i + 1], k=10)
        np.testing.assert_array_equal(one_ids[0], ids[i])
        np.testing.assert_allclose(one_dist[0], dist[i], rtol=1e-6)


def test_fewer_than_k_items_are_minus_one(ann_indexes, ann):
    ids, dist = ann_indexes["lmi"].search(ann.queries[:3], k=2500, n_probe=ann_indexes["lmi"].n_leaves)
    assert (ids[:, 2000:] == -1).all() and np.isinf(dist[:, 2000:]).all() and (ids[:, :2000] >= 0).all()


def test_angular_and_ip_metrics(ann):
    for metric, want in (("angular", "angular"), ("ip", "dot")):
        index = jaxidx.fit("lmi", ann.base, metric=metric, progress=False, **FAST)
        assert index.metric == want
        ids, dist = index.search(ann.queries[:5], k=3, n_probe=index.n_leaves)
        if metric == "angular":
            q = ann.queries[:5] / np.linalg.norm(ann.queries[:5], axis=1, keepdims=True)
            b = ann.base / np.linalg.norm(ann.base, axis=1, keepdims=True)
            np.testing.assert_allclose(dist[:, 0], 1 - np.sum(q * b[ids[:, 0]], 1), atol=1e-5)
        else:
            np.testing.assert_allclose(dist[:, 0], -np.sum(ann.queries[:5] * ann.base[ids[:, 0]], 1), rtol=1e-5)


def test_search_settings_are_validated(ann_indexes, ann):
    lmi, irli = ann_indexes["lmi"], ann_indexes["irli"]
    with pytest.raises(ValueError, match="unknown setting 'nprobe'; valid for lmi: n_probe, max_candidates"):
        lmi.search(ann.queries, nprobe=3)
    with pytest.raises(ValueError, match=f"n_probe=999 must be an integer in \\[1, {lmi.n_leaves}\\]"):
        lmi.search(ann.queries, n_probe=999)
    with pytest.raises(ValueError, match="m=999 must be an integer in \\[1, "):
        irli.search(ann.queries, m=999)
    with pytest.raises(ValueError, match="min_count=9 must be an integer in \\[1, 4\\]"):
        irli.search(ann.queries, m=1, min_count=9)
    with pytest.raises(ValueError, match="mode='mach' scores every label; it is for XMC"):
        irli.search(ann.queries, mode="mach")
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            lmi.search(ann.queries, k=k)
    bad = ann.queries.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="queries: row 3 holds NaN or Inf"):
        lmi.search(bad)
    with pytest.raises(ValueError, match=r"queries: expected shape \[n, 16\] .* got \[100, 15\]"):
        irli.search(ann.queries[:, :15])
    # Array-likes: lists and single vectors.
    ids, _ = lmi.search(ann.queries[:2].tolist(), k=3)
    assert ids.shape == (2, 3)
    assert lmi.search(ann.queries[0], k=3)[0].shape == (1, 3)


def test_fit_refuses_bad_input(ann):
    with pytest.raises(ValueError, match="config field 'train.epochz': train has no field 'epochz'"):
        jaxidx.fit("lmi", ann.base, train__epochz=3)
    bad = ann.base.copy()
    bad[7, 0] = np.inf
    with pytest.raises(ValueError, match="data: row 7 holds NaN or Inf"):
        jaxidx.fit("lmi", bad)
    with pytest.raises(ValueError, match="metric: unknown 'cosinus'"):
        jaxidx.fit("lmi", ann.base, metric="cosinus")
    with pytest.raises(ValueError, match="preset 'tinyy' unknown"):
        jaxidx.fit("lmi:tinyy", ann.base)
    with pytest.raises(ValueError, match="method 'foo'"):
        jaxidx.fit("foo", ann.base)
    with pytest.raises(ValueError, match="X has 3 rows, Y has 2"):
        jaxidx.fit("elias", (np.ones((3, 4)), np.ones((2, 5))))


def test_fit_with_workdir_resumes_and_loads(ann, tmp_path):
    wd = str(tmp_path / "run")
    a = jaxidx.fit("lmi", ann.base, workdir=wd, progress=False, **FAST)
    assert os.path.isdir(os.path.join(wd, "checkpoints")) and os.path.isdir(os.path.join(wd, "items"))
    b = jaxidx.fit("lmi", ann.base, workdir=wd, progress=False, **FAST)  # restores the finished run
    c = jaxidx.load(wd)
    for other in (b, c):
        np.testing.assert_array_equal(other.search(ann.queries)[0], a.search(ann.queries)[0])


# --- save / load -----------------------------------------------------------------------------------------

_FRESH = """
import json, sys, numpy as np, jaxidx
index = jaxidx.load({path!r})
q = np.load({queries!r})
ids, scores = index.search(q, k=10)
print(json.dumps({{"ids": ids.tolist(), "scores": scores.tolist(), "method": index.method, "n": len(index)}}))
"""


@pytest.mark.parametrize("method", ["lmi", "irli", "elias-xmc", "irli-xmc"])
def test_save_load_round_trip_in_a_fresh_process(ann, xmc, ann_indexes, xmc_indexes, method, tmp_path):
    if method.endswith("-xmc"):
        index, queries = xmc_indexes[method[:-4]], xmc.X_test.toarray()
    else:
        index, queries = ann_indexes[method], ann.queries
    path = str(tmp_path / "ix")
    index.save(path)
    np.save(tmp_path / "q.npy", queries)
    ids, scores = index.search(queries, k=10)
    out = run_python(_FRESH.format(path=path, queries=str(tmp_path / "q.npy")), cwd=str(tmp_path))
    np.testing.assert_array_equal(out["ids"], ids)
    np.testing.assert_array_equal(np.asarray(out["scores"], np.float32), scores)
    assert out["method"] == index.method and out["n"] == len(index)
    doc = json.load(open(os.path.join(path, "index.json")))
    assert doc["format_version"] == 1 and doc["data_fingerprint"] and doc["jaxidx_version"] == jaxidx.__version__
    assert not any("opt" in k or "mu" in k for k in doc["arrays"])  # no optimizer state


def test_save_refuses_a_foreign_directory(ann_indexes, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a jaxidx index; refusing to overwrite"):
        ann_indexes["lmi"].save(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _damage(path, how):
    doc = json.load(open(os.path.join(path, "index.json")))
    victim = os.path.join(path, doc["arrays"]["arrays/vectors"]["file"])
    if how == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    elif how == "flip":
        with open(victim, "r+b") as f:
            f.seek(200)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 1]))
    elif how == "missing":
        os.remove(victim)
    elif how == "newer":
        doc["format_version"] = 99
        json.dump(doc, open(os.path.join(path, "index.json"), "w"))
    elif how == "json":
        open(os.path.join(path, "index.json"), "w").write("{not json")
    return victim


@pytest.mark.parametrize("how,message", [
    ("truncate", "damaged or truncated"), ("flip", "damaged or truncated"), ("missing", "missing"),
    ("newer", "format version 99 is newer than this jaxidx reads"), ("json", "index.json: not valid JSON"),
])
def test_damaged_index_is_refused_naming_the_file(ann_indexes, tmp_path, how, message):
    path = str(tmp_path / "ix")
    ann_indexes["lmi"].save(path)
    victim = _damage(path, how)
    with pytest.raises(ValueError, match=message) as err:
        jaxidx.load(path)
    named = "index.json" if how in ("newer", "json") else os.path.basename(victim)
    assert named in str(err.value)


_KILLED_SAVE = """
import os, signal, sys, numpy as np, jaxidx, jaxidx.index as ix
index = jaxidx.load({path!r})
index.add(np.random.default_rng(0).standard_normal((500, 16), dtype=np.float32))
real = ix.write_json_atomic if {where!r} == "commit" else ix.np.save
def killed(*a, **k):
    if {where!r} == "array":  # part of an array file written, then the process dies
        a[0].write(b"\\x93NUMPY partial")
        a[0].flush()
    os.kill(os.getpid(), signal.SIGKILL)
if {where!r} == "commit":
    ix.write_json_atomic = killed
else:
    ix.np.save = killed
index.save({path!r})
"""


@pytest.mark.parametrize("where", ["array", "commit"])
def test_a_killed_save_leaves_the_previous_index(ann, ann_indexes, tmp_path, where):
    path = str(tmp_path / "ix")
    ann_indexes["irli"].save(path)
    before, _ = jaxidx.load(path).search(ann.queries, k=10)
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE.format(path=path, where=where)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    again = jaxidx.load(path)
    assert len(again) == 2000
    np.testing.assert_array_equal(again.search(ann.queries, k=10)[0], before)
    again.save(path)  # the next save cleans up what the killed one left
    leftovers = [f for f in os.listdir(os.path.join(path, "arrays")) if f.endswith(".tmp")]
    assert not leftovers


# --- add / remove ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lmi", "irli"])
def test_add_and_remove_persist(ann, ann_indexes, method, tmp_path):
    path = str(tmp_path / "ix")
    ann_indexes[method].save(path)
    index = jaxidx.load(path)
    wide = {"n_probe": index.n_leaves} if method == "lmi" else {"m": index.n_buckets}
    new = ann.queries[:30] + 0.001
    new_ids = index.add(new)
    np.testing.assert_array_equal(new_ids, np.arange(2000, 2030))
    assert len(index) == 2030
    ids, dist = index.search(new, k=1, **wide)
    np.testing.assert_array_equal(ids[:, 0], new_ids)  # exact search finds each added vector itself
    assert np.all(dist[:, 0] < 1e-3)
    # The trained router places them: a narrow search finds most of them too (IRLI puts an item in the
    # less filled of its top-2 buckets per repetition, so it probes 2).
    narrow = {"n_probe": 1} if method == "lmi" else {"m": 2, "min_count": 1}
    assert (index.search(new, k=1, **narrow)[0][:, 0] == new_ids).mean() > 0.5
    gone = np.concatenate([new_ids[:10], [0, 5, 1999]])
    index.remove(gone)
    assert len(index) == 2030 - 13
    ids, _ = index.search(np.concatenate([new, ann.base[[0, 5, 1999]]]), k=50, **wide)
    assert not np.isin(ids, gone).any()
    more = index.add(ann.queries[30:32])
    np.testing.assert_array_equal(more, [2030, 2031])  # ids continue after the largest ever held
    index.save(path)
    back = jaxidx.load(path)
    assert len(back) == len(index) == 2019
    np.testing.assert_array_equal(back.search(ann.queries, k=10)[0], index.search(ann.queries, k=10)[0])
    assert back.add(ann.queries[:1])[0] == 2032


@pytest.mark.parametrize("method", ["lmi", "irli"])
def test_add_and_remove_refuse_bad_input(ann, ann_indexes, method, tmp_path):
    index = ann_indexes[method]
    n = len(index)
    with pytest.raises(ValueError, match=r"vectors: expected shape \[n, 16\]"):
        index.add(np.ones((3, 8), np.float32))
    bad = np.ones((3, 16), np.float32)
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match="vectors: row 1 holds NaN or Inf"):
        index.add(bad)
    for ids, msg in (([5, 99999], "id 99999 is not in the index"), ([-1], "id -1 is not in the index"),
                     ([3, 3], "ids repeat"), ([1.5], "ids must be integers")):
        with pytest.raises(ValueError, match=msg):
            index.remove(ids)
    assert len(index) == n  # nothing changed


def test_xmc_indexes_refuse_add(xmc_indexes):
    with pytest.raises(TypeError, match="only ANN indexes"):
        xmc_indexes["elias"].add(np.ones((1, 200)))


# --- load from a run directory ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["configs/lmi.py:tiny", "configs/irli.py:tiny", "configs/irli.py:tiny-xmc",
                                    "configs/elias.py:tiny"])
def test_load_a_run_directory_trained_from_the_cli(preset, tmp_path):
    wd = str(tmp_path / "run")
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={preset}",
                          f"--workdir={wd}", "--noprogress", "--config.train.epochs=1"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ev = json.load(open(os.path.join(wd, "eval.json")))
    from jaxidx.data import load
    from jaxidx.evaluate import evaluate
    index = jaxidx.load(wd)  # no data set loaded, no k-means / clustering run, no optimizer state read
    data = load(index.config.data)
    again = evaluate(index, data, index.config.search.settings, index.config.search.k)
    for a, b in zip(ev["results"], again):
        key = "recall@10" if "recall@10" in a else "P@1"
        assert a[key] == b[key] and a["candidates_per_query"] == b["candidates_per_query"]


def test_timed_keeps_the_fastest_of_repeated_short_runs():
    """Benchmarks time a search as the fastest of up to max_runs runs while the runs stay under min_seconds
    in all (after one untimed warm run); a long run is timed once."""
    from jaxidx.evaluate import timed
    calls = []

    def run():
        calls.append(1)
        return len(calls)
    out, seconds = timed(run, warm=True, min_seconds=60.0, max_runs=3)
    assert (len(calls), out) == (4, 4) and seconds >= 0
    calls.clear()
    assert timed(run, warm=False, min_seconds=0.0)[0] == 1 and len(calls) == 1


def test_one_vs_rest_peer_lives_in_the_library(xmc):
    from jaxidx import bench
    from jaxidx.metrics import xmc_report
    pred, timing = bench.run_ovr(xmc, k=5)
    assert pred.shape == (200, 5) and timing["train_seconds"] > 0
    assert xmc_report(pred, xmc.Y_test, train_Y=xmc.Y_train)["P@1"] > 0.5


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("## Use from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert os.path.isfile(tmp_path / "my.index" / "index.json")
    index = jaxidx.load(str(tmp_path / "my.index"))
    assert len(index) == 10000 and index.method == "lmi"


def test_fit_on_a_spec_keeps_it_for_evaluation_and_arrays_say_so(ann, tmp_path):
    from jaxidx.runner import evaluate_checkpoint
    spec = "synthetic-ann:n=1000,q=50,d=8,clusters=5,seed=0"
    index = jaxidx.fit("irli:tiny", spec, workdir=str(tmp_path / "spec"), progress=False, train__epochs=1)
    assert index.config.data == spec
    out = evaluate_checkpoint(str(tmp_path / "spec"))
    assert out["results"][0]["recall@10"] > 0
    jaxidx.fit("irli:tiny", ann.base, workdir=str(tmp_path / "arrays"), progress=False, train__epochs=1)
    with pytest.raises(ValueError, match="arrays given to jaxidx.fit, which no spec can load again"):
        evaluate_checkpoint(str(tmp_path / "arrays"))
