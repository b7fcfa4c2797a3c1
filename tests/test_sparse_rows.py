"""Lazy row-table AdamW (`jaxidx.train.sparse_rows`) against optax's dense AdamW, through the shared train step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxidx.train import mesh as mesh_lib
from jaxidx.train import sparse_rows
from jaxidx.train import state as state_lib

L, D, B, K = 12, 5, 8, 6
LR = optax.linear_schedule(1e-2, 1e-3, 10)


def _params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w": jax.random.normal(k1, (D, D)),
            "table": {"kernel": jax.random.normal(k2, (L, D)), "bias": jax.random.normal(k3, (L,))}}


def _loss(params, batch, aux, rng):
    """A shortlist loss: each example scores K rows (ids, -1 = masked) of the table through w."""
    del aux, rng
    ids = batch["ids"]
    rows = sparse_rows.take_rows(params["table"], jnp.where(ids >= 0, ids, 0))
    h = jnp.tanh(batch["x"] @ params["w"])
    logits = jnp.einsum("bd,bkd->bk", h, rows["kernel"]) + rows["bias"]
    per = jnp.where(ids >= 0, optax.sigmoid_binary_cross_entropy(logits, batch["y"]), 0.0)
    return per.sum() / B, ({"n": jnp.sum(ids >= 0)}, {"table": ids})


def _dense_loss(params, batch, aux, rng):
    loss, (metrics, _) = _loss(params, batch, aux, rng)
    return loss, metrics


def _batches(n_steps, cover_all, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        ids = rng.integers(0, L, size=(B, K))
        if cover_all:  # every row at least once, some twice, some entries masked
            ids[:2] = np.arange(L).reshape(2, K)
            ids[5, :2] = -1
        else:  # only rows 0..L/2-1
            ids = ids % (L // 2)
        out.append({"x": rng.normal(size=(B, D)).astype(np.float32), "ids": ids.astype(np.int32),
                    "y": rng.integers(0, 2, size=(B, K)).astype(np.float32)})
    return out


def _adamw(wd):
    return optax.adamw(LR, weight_decay=wd, mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))


def _train(tx, loss, batches, mesh=None):
    mesh = mesh or mesh_lib.make_mesh(1)
    state = state_lib.create(_params(jax.random.key(0)), tx)
    shardings = state_lib.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step = state_lib.make_train_step(loss, tx, mesh, shardings, seed=0)
    metrics = []
    for b in batches:
        state, m = step(state, b, None)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_equals_dense_adamw_when_every_row_is_touched(wd):
    batches = _batches(6, cover_all=True)
    dense, md = _train(_adamw(wd), _dense_loss, batches)
    lazy, ml = _train(sparse_rows.RowSparse(dense=_adamw(wd), tables=("table",), learning_rate=LR, weight_decay=wd),
                      _loss, batches)
    for a, b in zip(jax.tree.leaves(dense.params), jax.tree.leaves(lazy.params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    for name in ("loss", "grad_norm"):  # the row gradients are summed per distinct row before the norm
        np.testing.assert_allclose([m[name] for m in md], [m[name] for m in ml], rtol=1e-5)
    np.testing.assert_allclose(dense.opt_state[0].mu["table"]["kernel"], lazy.opt_state["rows"]["table"]["kernel"]["mu"],
                               rtol=1e-5, atol=1e-7)


def test_untouched_rows_and_their_moments_stay():
    batches = _batches(4, cover_all=False)
    init = _params(jax.random.key(0))
    lazy, _ = _train(sparse_rows.RowSparse(dense=_adamw(0.1), tables=("table",), learning_rate=LR, weight_decay=0.1),
                     _loss, batches)
    dense, _ = _train(_adamw(0.1), _dense_loss, batches)
    half = L // 2
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(lazy.params["table"][leaf][half:], init["table"][leaf][half:])
        assert not np.any(lazy.opt_state["rows"]["table"][leaf]["mu"][half:])
        assert np.all(lazy.params["table"][leaf][:half] != init["table"][leaf][:half])
        np.testing.assert_allclose(lazy.params["table"][leaf][:half], dense.params["table"][leaf][:half],
                                   rtol=2e-5, atol=2e-6)  # touched every step: as dense
    # dense AdamW decays the untouched kernel rows; lazy leaves them
    assert np.all(dense.params["table"]["kernel"][half:] != init["table"]["kernel"][half:])


def test_out_of_range_ids_are_skipped():
    rows, inverse = sparse_rows._distinct_rows(jnp.array([[3, -1, 3], [L, 0, 7]]), L)
    assert sorted(set(np.asarray(rows).tolist()) - {L}) == [0, 3, 7]
    assert np.asarray(rows)[np.asarray(inverse)].tolist() == [3, L, 3, L, 0, 7]


def test_unknown_table_is_named():
    with pytest.raises(KeyError, match="missing"):
        sparse_rows.RowSparse(dense=optax.sgd(0.1), tables=("missing",), learning_rate=LR).init({"w": jnp.ones(2)})
