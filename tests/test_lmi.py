"""LMI: tree maths, search order, empty buckets, starter and tree end to end, resume, devices."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxidx
from helpers import assert_same_params, crash_and_resume, load_config, run_python
from jaxidx.data import load
from jaxidx.search import reference
from jaxidx.methods.lmi import (LMIIndex, candidate_runs, centroid_targets, leaf_log_probs, node_loss,
                                repair_empty, select_leaves)
from jaxidx.runner import build, evaluate_checkpoint, train_and_evaluate
from jaxidx.train.loop import fit


# --- pure maths ------------------------------------------------------------------------------------
def test_leaf_log_probs_hand_checked_order():
    # Root: 2 children with p = (0.6, 0.4); child 0 splits (0.5, 0.5), child 1 splits (0.9, 0.1).
    # Leaves 0..3 = (0,0), (0,1), (1,0), (1,1): path probabilities 0.30, 0.30, 0.36, 0.04.
    root = jnp.log(jnp.array([[[0.6, 0.4]]]))
    kids = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    p = np.exp(np.asarray(leaf_log_probs([root, kids])))[0]
    np.testing.assert_allclose(p, [0.30, 0.30, 0.36, 0.04], rtol=1e-5)
    assert list(np.argsort(-p, kind="stable")) == [2, 0, 1, 3]  # the best leaf is not under the best root child


def test_node_loss_ignores_filler_and_counts_accuracy():
    logits = jnp.array([[[2.0, 0.0]], [[0.0, 3.0]]])  # b=2, one node, 2 children
    loss, acc = node_loss(logits, jnp.array([[0], [0]]), jnp.array([[1.0], [0.0]]))
    np.testing.assert_allclose(float(loss), np.log1p(np.exp(-2.0)), rtol=1e-6)
    assert float(acc) == 1.0


def test_centroid_targets_follow_kmeans_scores():
    x = jnp.array([[[1.0, 0.0]]])  # b=1, one node
    cents = jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # third child has no points
    t = np.asarray(centroid_targets(x, cents, 0.5, spherical=True))[0, 0]
    np.testing.assert_allclose(t, [np.exp(2) / (np.exp(2) + 1), 1 / (np.exp(2) + 1), 0.0], rtol=1e-6)
    sharp = np.asarray(centroid_targets(x, cents, 1e-3, spherical=False))[0, 0]  # L2: nearest centroid
    np.testing.assert_allclose(sharp, [1.0, 0.0, 0.0], atol=1e-6)


def test_repair_empty_moves_kmeans_points_back():
    leaf, moved = repair_empty(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 2]), 3)
    np.testing.assert_array_equal(leaf, [0, 2, 1, 2])
    assert moved == 2
    same, moved = repair_empty(np.array([0, 1, 2]), np.array([2, 1, 0]), 3)  # nothing empty: nothing moves
    np.testing.assert_array_equal(same, [0, 1, 2])
    assert moved == 0


def test_candidate_runs_and_budget():
    sizes = np.array([3, 0, 2, 4])
    offsets = np.array([0, 3, 3, 5, 9])
    leaves = np.array([[2, 0, -1], [3, 2, 0]], np.int32)
    lens = select_leaves(sizes, leaves)
    np.testing.assert_array_equal(lens, [[2, 3, 0], [4, 2, 3]])
    off, starts, run_lens = candidate_runs(offsets, leaves, lens)
    np.testing.assert_array_equal(off, [0, 3, 6])
    np.testing.assert_array_equal(starts, [3, 0, 0, 5, 3, 0])
    np.testing.assert_array_equal(run_lens, [2, 3, 0, 4, 2, 3])
    # The kernel sees the rows of the visited leaves (in row order), each once.
    rows = reference._candidate_rows((off, starts, run_lens), 2, 9)
    assert [sorted(r) for r in rows] == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 8]]
    # Budget 5: leaves are taken while fewer than 5 candidates are gathered (the first always).
    np.testing.assert_array_equal(select_leaves(sizes, leaves, 5), [[2, 3, 0], [4, 2, 0]])
    np.testing.assert_array_equal(select_leaves(sizes, leaves, 1), [[2, 0, 0], [4, 0, 0]])


# --- end to end on tiny synthetic data -------------------------------------------------------------
@pytest.fixture(scope="module")
def tree_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("lmi_tree"))
    config = load_config("configs/lmi.py:tiny")
    return wd, config, train_and_evaluate(config, wd, progress=False)


@pytest.fixture(scope="module")
def restored(tree_run):
    """(method, data, params, aux, index) of the tiny tree, restored from its checkpoint once."""
    from jaxidx.train.checkpoint import Checkpointer
    index = jaxidx.load(tree_run[0])  # parameters and aux only, no data
    _, params, aux, _ = Checkpointer(tree_run[0], read_only=True).restore_params()
    return index, load(index.config.data), params, aux, index


def test_tree_end_to_end(tree_run):
    wd, config, out = tree_run
    with open(os.path.join(wd, "eval.json")) as f:
        ev = json.load(f)
    assert ev["method"] == "lmi" and ev["step"] == out["step"] > 0
    rs = ev["results"]
    assert [r["n_probe"] for r in rs] == [s["n_probe"] for s in config.search.settings]
    for r in rs:
        assert {"recall@10", "recall@10_distance", "candidates_per_query", "queries_per_second"} <= set(r)
    # 2 of 16 leaves hold ~1/8 of the data; chance recall would be ~0.12.
    assert rs[1]["recall@10"] > 0.85 and rs[1]["candidates_per_query"] < 0.35 * 3000
    assert rs[2]["recall@10"] >= rs[1]["recall@10"] >= rs[0]["recall@10"]
    assert rs[2]["candidates_per_query"] > rs[1]["candidates_per_query"]
    # The candidate budget stops the scan early.
    assert rs[3]["candidates_per_query"] < rs[2]["candidates_per_query"]


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_route_visits_leaves_in_descending_path_probability(restored):
    method, data, params, aux, index = restored
    q = data.queries[:50]
    leaves = index.route(q, 16)
    # Path probabilities by hand: product of each node's softmax along the path.
    l0 = _softmax(np.asarray(method.models[0].apply({"params": params["level0"]}, q)[1]))[:, 0]  # [b, 4]
    l1 = _softmax(np.asarray(method.models[1].apply({"params": params["level1"]}, q)[1]))  # [b, 4 nodes, 4]
    path = (l0[:, :, None] * l1).reshape(len(q), 16)
    path[:, index.sizes() == 0] = -1.0  # empty leaves are skipped
    got = np.take_along_axis(path, np.maximum(leaves, 0), 1)
    assert (np.diff(np.where(leaves >= 0, got, -2.0), axis=1) <= 1e-6).all()
    np.testing.assert_array_equal(leaves[:, 0], np.argmax(path, 1))


def test_layout_is_contiguous_and_results_are_original_ids(restored):
    method, data, params, aux, index = restored
    np.testing.assert_array_equal(index.arrays["vectors"], data.base[index.arrays["ids"]])
    np.testing.assert_array_equal(np.sort(index.arrays["ids"]), np.arange(data.n_items))
    assert index.leaf_stats()["n_empty"] == 0 and index.leaf_stats()["mean"] == data.n_items / 16
    # Probing every leaf is exact search.
    res = index.query(data.queries, {"n_probe": 16}, 10)
    np.testing.assert_array_equal(res.ids[:, :5], data.gt_ids[:, :5])
    assert (res.n_candidates == data.n_items).all()


def test_empty_leaves_are_skipped(restored):
    method, data, params, aux, _ = restored
    leaf = aux["leaf"].copy()
    gone = np.bincount(leaf).argmax()
    leaf[leaf == gone] = (gone + 1) % 16  # empty the biggest leaf
    index = LMIIndex.from_training(method.config, params, dict(aux, leaf=leaf), data.base, {"metric": data.metric})
    assert index.leaf_stats()["n_empty"] == 1
    res = index.query(data.queries, {"n_probe": 1}, 10)
    assert (res.n_candidates > 0).all() and (res.ids >= 0).all()  # never a wasted probe
    leaves = index.route(data.queries, 16)
    assert (leaves[:, -1] == -1).all() and not (leaves == gone).any()


def test_eval_from_checkpoint_matches(tree_run):
    wd, config, out = tree_run
    again = evaluate_checkpoint(wd, filename="eval2.json")
    for a, b in zip(out["results"], again["results"]):
        assert a["recall@10"] == b["recall@10"] and a["candidates_per_query"] == b["candidates_per_query"]


def test_starter_end_to_end(tmp_path):
    config = load_config("configs/lmi.py:tiny", **{
        "model.levels": (16,), "model.hidden": ((64, 48),), "kmeans.kind": "l2", "kmeans.max_points_per_centroid": 0,
        "index.repair_empty": False, "train.target_temperature": 0.0, "train.epochs": 3,
        "search.settings": [{"n_probe": 1}, {"n_probe": 3}]})
    out = train_and_evaluate(config, str(tmp_path), progress=False)
    r1, r3 = out["results"]
    assert r1["recall@10"] > 0.6 and r1["candidates_per_query"] < 0.2 * 3000
    assert r3["recall@10"] > 0.9


def test_resume_gives_the_same_index(tmp_path):
    config = load_config("configs/lmi.py:tiny", **{"data": _SMALL, "train.epochs": 1, "train.checkpoint_every_steps": 10,
                                                  "train.keep_checkpoints": 50})
    method, data, mesh = build(config)
    full, resumed = crash_and_resume(method, config, data, mesh, tmp_path)
    assert resumed.step == full.step
    np.testing.assert_array_equal(resumed.aux["leaf"], full.aux["leaf"])
    assert_same_params(full.params, resumed.params)
    a = method.index(full.params, full.aux).query(data.queries, {"n_probe": 2}, 10)
    b = method.index(resumed.params, resumed.aux).query(data.queries, {"n_probe": 2}, 10)
    np.testing.assert_array_equal(a.ids, b.ids)


_SMALL = "synthetic-ann:n=1000,q=50,d=16,clusters=10,seed=0"


def devices_summary(workdir: str) -> dict:
    """Train one epoch of the tiny tree on small data; what the 1- vs 8-device test compares."""
    config = load_config("configs/lmi.py:tiny", **{"data": _SMALL, "train.epochs": 1})
    method, data, mesh = build(config)
    res = fit(method, config, workdir, mesh, data_fingerprint=data.fingerprint(), progress=False)
    return {"devices": jax.device_count(), "labels": res.aux["labels"].ravel().tolist(),
            "centroids": res.aux["centroids1"].ravel().tolist(),
            "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(res.params)]}


def test_one_vs_eight_devices_same_training(tmp_path):
    code = ("import json, sys; sys.path.insert(0, 'tests'); from test_lmi import devices_summary; "
            "print(json.dumps(devices_summary({!r})))")
    if jax.device_count() == 1:
        one = devices_summary(str(tmp_path / "one"))
    else:
        one = run_python(code.format(str(tmp_path / "one")), {"JAX_NUM_CPU_DEVICES": "1"})
    eight = run_python(code.format(str(tmp_path / "eight")), {"JAX_NUM_CPU_DEVICES": "8"})
    assert (one["devices"], eight["devices"]) == (1, 8)
    np.testing.assert_array_equal(one["labels"], eight["labels"])  # k-means: same clusters on 1 or 8 devices
    np.testing.assert_allclose(one["centroids"], eight["centroids"], rtol=1e-4, atol=1e-5)
    for a, b in zip(one["params"], eight["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)


def test_load_and_resume_run_no_kmeans_and_load_reads_no_data(tree_run, monkeypatch):
    import jaxidx.api
    import jaxidx.methods.lmi as lmi

    def forbidden(*a, **k):
        raise AssertionError("must not run")
    monkeypatch.setattr(lmi, "kmeans_tree", forbidden)
    monkeypatch.setattr(jaxidx.api, "load_data", forbidden)
    wd, config, out = tree_run
    index = jaxidx.load(wd)  # no data set, no k-means tree
    assert len(index) == 3000
    method, data, mesh = build(config)
    res = fit(method, config, wd, mesh, data_fingerprint=data.fingerprint(), progress=False)  # finished: resumes
    assert res.step == out["step"] and res.phases["init_s"] == 0.0


def test_balanced_leaves_hold_the_capacity_and_centroid_routing(tmp_path):
    """kmeans.balance bounds every leaf (k-means labels and the networks' placement) on skewed data
    (Zipf cluster sizes); route="centroids" probes the leaves by their means, nearest first."""
    data = load("synthetic-ann:n=3000,q=100,d=16,clusters=30,seed=2,zipf=1.5")
    free = jaxidx.fit("lmi:tiny", data, progress=False)
    index = jaxidx.fit("lmi:tiny", data, progress=False, kmeans__balance=1.5)
    cap = int(np.ceil(1.5 * len(data.base) / index.n_leaves))
    assert free.sizes().max() > cap >= index.sizes().max()
    means = np.asarray(index.leaf_means())
    q = data.queries[:20]
    d2 = ((q[:, None] - means[None]) ** 2).sum(-1)
    d2[:, index.sizes() == 0] = np.inf
    np.testing.assert_array_equal(index.route(q, 3, "centroids"), np.argsort(d2, 1, kind="stable")[:, :3])
    ids, _ = index.search(q, 10, n_probe=4, route="centroids")
    assert (ids >= 0).all()
    with pytest.raises(ValueError, match="route"):
        index.search(q, 10, n_probe=4, route="kmeans")
    index.add(data.base[:10])  # the means follow the layout
    assert np.asarray(index.leaf_means()).shape == means.shape
