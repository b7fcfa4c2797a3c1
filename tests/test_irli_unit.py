"""IRLI maths: bucket targets, both losses, the router and its affine head."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxidx.methods.irli import bucket_loss, bucket_targets
from jaxidx.models.router import RepeatedMLP, affine_head


def test_bucket_targets_hand_case():
    assign = jnp.array([[0, 1, 1, 3], [2, 2, 0, 1]], jnp.int32)  # R=2, N=4, B=4
    labels = jnp.array([[0, 2, -1], [-1, -1, -1], [3, 3, 1]], jnp.int32)
    t = np.asarray(bucket_targets(assign, labels, 4))
    assert t.shape == (3, 2, 4)
    np.testing.assert_array_equal(t[0], [[1, 1, 0, 0], [1, 0, 1, 0]])
    np.testing.assert_array_equal(t[1], 0)  # no labels: no positive bucket
    np.testing.assert_array_equal(t[2], [[0, 1, 0, 1], [0, 1, 1, 0]])


def test_bce_loss_hand_case():
    logits = jnp.array([[[0.0, 2.0]], [[1.0, -1.0]]])  # b=2, R=1, B=2
    targets = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    w = jnp.array([1.0, 0.0])  # second example is a filler row
    sp = lambda x: np.log1p(np.exp(x))  # noqa: E731 - softplus
    want = (sp(-0.0) + sp(2.0)) / 2  # BCE(0, y=1) = softplus(-0); BCE(2, y=0) = softplus(2)
    np.testing.assert_allclose(float(bucket_loss(logits, targets, w, "bce")), want, rtol=1e-6)


def test_softmax_loss_uses_normalised_targets():
    logits = jnp.array([[[0.0, 1.0, 2.0]]])
    targets = jnp.array([[[1.0, 1.0, 0.0]]])
    logp = np.log(np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum())
    want = -(0.5 * logp[0] + 0.5 * logp[1])
    np.testing.assert_allclose(float(bucket_loss(logits, targets, jnp.ones(1), "softmax")), want, rtol=1e-6)
    with pytest.raises(ValueError, match="model.loss"):
        bucket_loss(logits, targets, jnp.ones(1), "hinge")


def test_repeated_mlp_nets_are_independent_and_sparse_equals_dense():
    R, D, H, B = 3, 12, 8, 5
    sparse = RepeatedMLP(R, (H,), B, n_features=D)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, D, (4, 3)).astype(np.int32)
    val = rng.random((4, 3)).astype(np.float32)
    x = {"idx": jnp.asarray(idx), "val": jnp.asarray(val)}
    params = sparse.init(jax.random.key(0), x)
    h, logits = sparse.apply(params, x)
    assert h.shape == (4, R, H) and logits.shape == (4, R, B)
    # The embedding bag equals X @ W for the densified X, per network.
    W = np.asarray(params["params"]["nets"]["layer0"]["kernel"])
    dense = np.zeros((4, D), np.float32)
    np.add.at(dense, (np.repeat(np.arange(4), 3), idx.ravel()), val.ravel())
    for r in range(R):
        pre = dense @ W[r] + np.asarray(params["params"]["nets"]["layer0"]["bias"])[r]
        np.testing.assert_allclose(np.asarray(h[:, r]), np.maximum(pre, 0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(W[0], W[1])  # independently initialised


def test_affine_head_equals_sum_of_logits():
    model = RepeatedMLP(2, (6,), 4)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    params = model.init(jax.random.key(1), x)
    h, logits = model.apply(params, x)
    got = affine_head(params, jnp.moveaxis(h, 1, 0).sum(1, keepdims=True), jnp.array([5.0]))
    np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(logits.sum(0)), rtol=1e-5, atol=1e-5)


def test_bce_gradient_matches_optax_reference():
    logits = jax.random.normal(jax.random.key(2), (4, 2, 6))
    targets = (jax.random.uniform(jax.random.key(3), (4, 2, 6)) > 0.7).astype(jnp.float32)
    ref = optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1).sum(-1).mean()
    np.testing.assert_allclose(float(bucket_loss(logits, targets, jnp.ones(4), "bce")), float(ref), rtol=1e-6)

