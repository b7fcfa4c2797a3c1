"""ELIAS's two-level cluster tree (`model.cluster_groups`): its probabilities and beam against brute force,
the host route (`tree_beam`) against the JAX route the device search runs, and a tree trained end to end
(host == device, save / load, checks of the config and of the search setting)."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxidx
from helpers import train_stages
from jaxidx.data import synthetic_xmc
from jaxidx.metrics import precision_at_k
from jaxidx.methods.elias.maths import cluster_log_probs, group_log_probs, route_clusters
from jaxidx.runner import build
from jaxidx.search import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(seed, H=8, G=4, S=8):
    rng = np.random.default_rng(seed)
    return {"clusters": {"kernel": jnp.asarray(rng.standard_normal((H, G * S)), jnp.float32),
                         "bias": jnp.asarray(rng.standard_normal(G * S), jnp.float32)},
            "groups": {"kernel": jnp.asarray(rng.standard_normal((H, G)), jnp.float32),
                       "bias": jnp.asarray(rng.standard_normal(G), jnp.float32)}}


class _Identity:
    """An encoder whose phi is its input (the route's maths without a network)."""

    def apply(self, variables, x, deterministic=True, rngs=None):
        return x


def test_tree_probabilities_and_beam_match_brute_force():
    params, G, S = _params(0), 4, 8
    phi = jnp.asarray(np.random.default_rng(1).standard_normal((10, 8)), jnp.float32)
    log_p = np.asarray(cluster_log_probs(params, phi), np.float64)
    np.testing.assert_allclose(np.exp(log_p).sum(1), 1.0, rtol=1e-5)  # one distribution over the C clusters
    z = np.asarray(phi, np.float64) @ np.asarray(params["clusters"]["kernel"], np.float64) + np.asarray(
        params["clusters"]["bias"])
    g = np.asarray(phi, np.float64) @ np.asarray(params["groups"]["kernel"], np.float64) + np.asarray(
        params["groups"]["bias"])
    pg = np.exp(g) / np.exp(g).sum(1, keepdims=True)
    pc = np.exp(z).reshape(10, G, S)
    pc /= pc.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(log_p), (pg[:, :, None] * pc).reshape(10, -1), rtol=1e-5)
    for group_beam, beam in ((G, 5), (2, 5), (1, 8)):
        _, ids, scores = route_clusters(_Identity(), 10.0, {"encoder": {}, **params}, phi, beam, group_beam)
        for q in range(10):
            opened = np.argsort(-g[q], kind="stable")[:group_beam]
            allowed = np.isin(np.arange(G * S) // S, opened)
            want = np.argsort(np.where(allowed, -log_p[q], np.inf), kind="stable")[:beam]
            np.testing.assert_array_equal(ids[q], want)  # brute force over the opened groups' clusters
            np.testing.assert_allclose(scores[q], np.minimum(1.0, 10.0 * np.exp(log_p[q, want])), rtol=1e-5)


def test_host_tree_beam_is_the_device_route():
    params, G = _params(2, H=16, G=8, S=16), 8
    phi = jnp.asarray(np.random.default_rng(3).standard_normal((32, 16)), jnp.float32)
    for group_beam, beam in ((3, 6), (8, 20)):
        _, ids, _ = route_clusters(_Identity(), 1.0, {"encoder": {}, **params}, phi, beam, group_beam)
        log_g, top = jax.lax.top_k(group_log_probs(params, phi), group_beam)
        got, logp = host.tree_beam(np.asarray(phi), np.asarray(top, np.int32), np.asarray(log_g),
                                   np.ascontiguousarray(np.asarray(params["clusters"]["kernel"]).T),
                                   np.asarray(params["clusters"]["bias"]), G, beam)
        np.testing.assert_array_equal(got, ids)
        want = np.asarray(cluster_log_probs(params, phi, group_beam))
        np.testing.assert_allclose(logp, np.take_along_axis(want, got, 1), rtol=1e-5, atol=1e-5)


# --- trained ----------------------------------------------------------------------------------------

def _config(groups):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import elias as presets  # noqa: E402
    c = presets.tiny()
    c.model.update(cluster_groups=groups, beam=6)
    c.train.update(epochs=3, stage2_epochs=3, batch_size=64, log_every=5)
    return c


@pytest.fixture(scope="module")
def data():
    return synthetic_xmc(n_train=512, n_test=100, n_features=150, n_labels=150, seed=2)


def test_tree_trains_and_searches_like_the_flat_classifier(tmp_path, data):
    results = {}
    for groups in (0, 4):
        task, res = train_stages(tmp_path / str(groups), _config(groups), data)
        results[groups] = (task, task.index(jax.device_get(res.params), res.aux))
    task, tree = results[4]
    assert task.method.n_clusters == 16 and tree.n_groups == 4 and "groups" in tree.params
    flat_ids, _ = results[0][1].search(data.X_test, k=5)
    ids, scores = tree.search(data.X_test, k=5)
    assert precision_at_k(ids, data.Y_test, 1) >= precision_at_k(flat_ids, data.Y_test, 1) - 0.05
    assert precision_at_k(ids, data.Y_test, 1) > 0.3
    for setting in ({}, {"group_beam": 2}, {"group_beam": 1, "beam": 10}):
        got, s = tree.search(data.X_test, k=5, **setting)
        dev, ds = tree.search(data.X_test, k=5, backend="device", **setting)
        np.testing.assert_array_equal(dev, got)
        np.testing.assert_allclose(ds, s, rtol=1e-5, atol=1e-6)
    narrow, _ = tree.search(data.X_test, k=5, group_beam=1)
    assert (narrow != ids).any()  # one group opened: a narrower route
    tree.save(str(tmp_path / "saved"))
    loaded = jaxidx.load(str(tmp_path / "saved"))
    np.testing.assert_array_equal(loaded.search(data.X_test, k=5)[0], ids)
    np.testing.assert_array_equal(jaxidx.load(str(tmp_path / "4")).search(data.X_test, k=5)[0], ids)
    with pytest.raises(ValueError, match="group_beam"):
        results[0][1].search(data.X_test, k=5, group_beam=2)
    with pytest.raises(ValueError, match="group_beam"):
        tree.search(data.X_test, k=5, group_beam=0)


@pytest.mark.parametrize("groups", [1, 3, 16])
def test_bad_cluster_groups_name_the_field(data, groups):
    with pytest.raises(ValueError, match="model.cluster_groups"):
        build(_config(groups), data=data)
