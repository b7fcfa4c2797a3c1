"""ELIAS++'s sparse ranker (`jaxidx.methods.elias.ranker`, stage 3): the sparse support and lookups against a
dense computation, pruning, the score mix, and the stage trained, resumed, searched on both backends and
saved."""
import os
import sys

import jax
import numpy as np
import pytest
import scipy.sparse as sp

import jaxidx
from helpers import train_stages as _train
from jaxidx.data import synthetic_xmc
from jaxidx.metrics import precision_at_k
from jaxidx.methods.elias import ranker
from jaxidx.runner import build
from jaxidx.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dense_logits(X, offsets, feats, w, b, rows, labels):
    """r_l(x) with the weights as a dense [L, F] matrix and rows L2-normalised."""
    W = np.zeros((len(offsets) - 1, X.shape[1]))
    for l in range(len(offsets) - 1):
        W[l, feats[offsets[l]:offsets[l + 1]]] = w[offsets[l]:offsets[l + 1]]
    Xd = X.toarray()
    Xd /= np.maximum(np.linalg.norm(Xd, axis=1, keepdims=True), 1e-12)
    return np.einsum("nf,nf->n", Xd[rows], W[labels]) + b[labels]


def test_support_and_logits_match_a_dense_computation():
    rng = np.random.default_rng(0)
    L, F, n = 9, 40, 25
    X = sp.random(n, F, density=0.15, random_state=1, format="csr", dtype=np.float32) * 7.0
    rows, labels = rng.integers(0, n, 60), rng.integers(0, L, 60)
    x = {"idx": np.zeros((n, 12), np.int32), "val": np.zeros((n, 12), np.float32)}
    for i in range(n):
        row = X[i]
        x["idx"][i, :row.nnz], x["val"][i, :row.nnz] = row.indices, row.data
    offsets, feats = ranker.support(labels, x["idx"][rows], x["val"][rows], L, F)
    want = sorted({(l, f) for r, l in zip(rows, labels) for f in X[r].indices})
    got = [(l, f) for l in range(L) for f in feats[offsets[l]:offsets[l + 1]]]
    assert got == want
    w = rng.normal(size=len(feats)).astype(np.float32)
    b = rng.normal(size=L).astype(np.float32)
    steps = ranker.search_steps(offsets)
    # Training shape: one label per row.
    got = ranker.logits(offsets, feats, w, b, labels[:, None], x["idx"][rows], x["val"][rows], steps)[:, 0]
    np.testing.assert_allclose(got, _dense_logits(X, offsets, feats, w, b, rows, labels), rtol=1e-5, atol=1e-5)
    # The training twin over flat entries gives the same logits.
    flat = ranker.entries(offsets, feats, labels, x["idx"][rows], x["val"][rows], F)
    np.testing.assert_allclose(ranker.pair_logits(w, b, flat, labels, len(rows)), got, rtol=1e-5, atol=1e-5)
    # Search shape: [Q, R] labels per query, any label (features outside the support weigh nothing).
    every = np.tile(np.arange(L), (n, 1))
    got = np.asarray(ranker.logits(offsets, feats, w, b, every, x["idx"], x["val"], steps))
    want = np.stack([_dense_logits(X, offsets, feats, w, b, np.arange(n), np.full(n, l)) for l in range(L)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Scale does not matter: the rows are normalised.
    np.testing.assert_allclose(ranker.logits(offsets, feats, w, b, every, x["idx"], 100 * x["val"], steps), got,
                               rtol=1e-5, atol=1e-5)


def test_prune_keeps_the_weights_above_the_threshold_per_label():
    offsets, feats = np.array([0, 3, 3, 5], np.int32), np.array([1, 4, 7, 0, 2], np.int32)
    w = np.array([0.5, -0.01, -0.3, 0.001, 2.0], np.float32)
    o, f, v = ranker.prune(offsets, feats, w, 0.05)
    np.testing.assert_array_equal(o, [0, 2, 2, 3])
    np.testing.assert_array_equal(f, [1, 7, 2])
    np.testing.assert_array_equal(v, w[[0, 2, 4]])


def test_mix_weights_the_two_scores_in_log_space():
    offsets, feats = np.array([0, 1, 2, 3], np.int32), np.array([0, 0, 0], np.int32)
    w, b = np.array([0.0, 3.0, -3.0], np.float32), np.zeros(3, np.float32)
    idx, val = np.zeros((1, 2), np.int32), np.array([[1.0, 0.0]], np.float32)
    ids = np.array([[2, 0, 1, -1]], np.int32)
    scores = np.array([[0.9, 0.5, 0.2, -np.inf]], np.float32)
    kw = dict(steps=1)
    top, s = ranker.mix(offsets, feats, w, b, idx, val, ids, scores, 0.0, 3, **kw)
    np.testing.assert_array_equal(top, [[2, 0, 1]])  # weight 0: ELIAS's order and scores
    np.testing.assert_allclose(s, [[0.9, 0.5, 0.2]], rtol=1e-6)
    top, s = ranker.mix(offsets, feats, w, b, idx, val, ids, scores, 1.0, 4, **kw)
    np.testing.assert_array_equal(top, [[1, 0, 2, -1]])  # weight 1: the ranker's (sigmoid 3 > 0 > -3)
    r = np.array([3.0, 0.0, -3.0])
    np.testing.assert_allclose(s[0, :3], 1 / (1 + np.exp(-r)), rtol=1e-5)
    top, s = ranker.mix(offsets, feats, w, b, idx, val, ids, scores, 0.5, 1, **kw)
    np.testing.assert_allclose(s[0, 0], max(np.sqrt(sc / (1 + np.exp(-rr)))
                                            for sc, rr in ((0.9, -3.0), (0.5, 0.0), (0.2, 3.0))), rtol=1e-5)


# --- the stage --------------------------------------------------------------------------------------

def _config():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import elias as presets  # noqa: E402
    c = presets.tiny()
    c.train.update(epochs=2, stage2_epochs=2, batch_size=64, log_every=5)
    c.ranker.update(steps=60, rerank=16)
    return c


@pytest.fixture(scope="module")
def data():
    return synthetic_xmc(n_train=384, n_test=64, n_features=120, n_labels=60, seed=1)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, data):
    workdir = tmp_path_factory.mktemp("ranked")
    task, result = _train(workdir, _config(), data)
    return workdir, task, result


def test_ranker_stage_trains_searches_resumes_and_saves(tmp_path, data, ranked):
    config = _config()
    workdir, task, ref = ranked
    assert task.stage == 3 and not ref.interrupted and ref.step == config.ranker.steps
    # The stage-2 model rides along unchanged.
    stage2 = Checkpointer(str(workdir / "stage2"), read_only=True)
    _, before, _, _ = stage2.restore_params()
    stage2.close()
    after = jax.device_get(ref.params)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves({k: v for k, v in after.items() if k != "ranker"})):
        np.testing.assert_array_equal(a, b)
    index = task.index(after, ref.aux)
    assert index.has_ranker and 0 < len(index.arrays["ranker_w"]) <= len(ref.aux["ranker_feats"])
    plain, _ = index.search(data.X_test, k=5, ranker_weight=0.0)
    mixed, scores = index.search(data.X_test, k=5)  # the config's weight, 0.5
    assert precision_at_k(mixed, data.Y_test, 1) > precision_at_k(plain, data.Y_test, 1) + 0.05
    assert (np.diff(scores, axis=1) <= 0).all()
    device, _ = index.search(data.X_test, k=5, backend="device")
    np.testing.assert_array_equal(device, mixed)
    # A run stopped in stage 3 resumes to the same parameters.
    _, stopped = _train(tmp_path / "resumed", config, data, stop_at=("stage3", 25))
    assert stopped.interrupted
    _, resumed = _train(tmp_path / "resumed", config, data)
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    # Saved and opened (run directory, saved index): the same results.
    for opened in (jaxidx.load(str(workdir)), jaxidx.load(index.save(str(tmp_path / "saved")))):
        np.testing.assert_array_equal(opened.search(data.X_test, k=5)[0], mixed)


def test_ranker_settings_are_checked(tmp_path, data, ranked):
    config = _config()
    config.ranker.steps = 0
    task, result = _train(tmp_path, config, data)
    assert task.stage == 2 and not os.path.exists(tmp_path / "stage3")
    index = task.index(jax.device_get(result.params), result.aux)
    with pytest.raises(ValueError, match="sparse ranker"):
        index.search(data.X_test, k=5, ranker_weight=0.5)
    config = _config()
    config.ranker.weight = 1.5
    with pytest.raises(ValueError, match="ranker.weight"):
        build(config, data=data)
    _, trained, ref = ranked
    with pytest.raises(ValueError, match="ranker_weight"):
        trained.index(jax.device_get(ref.params), ref.aux).search(data.X_test, k=5, ranker_weight=2)
