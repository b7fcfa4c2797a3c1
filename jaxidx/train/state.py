"""Train state and the one jitted data-parallel train step every method uses."""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxidx.train import mesh as mesh_lib
from jaxidx.train import sparse_rows


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def create(params, tx: optax.GradientTransformation | sparse_rows.RowSparse) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(state: TrainState, mesh: Mesh, leaf_spec: Callable[[Any], P] | None = None):
    """NamedSharding per leaf: replicated unless `leaf_spec(leaf)` says otherwise (e.g. R over 'model')."""
    spec = leaf_spec or (lambda leaf: P())
    return jax.tree.map(lambda leaf: NamedSharding(mesh, spec(leaf)), state)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation | sparse_rows.RowSparse, mesh: Mesh,
                    shardings, seed: int):
    """Jitted `(state, batch, aux) -> (state, metrics)`.

    `loss_fn(params, batch, aux, rng) -> (loss, metrics)` is pure. The batch is
    split over 'data' and the parameters replicated, so XLA inserts the gradient
    all-reduce: this is data parallelism without pmap. The PRNG key is the run
    seed folded with the step, so a resumed run draws the same randomness. With a
    `sparse_rows.RowSparse` optimizer the loss also returns the rows it gathered,
    `(loss, (metrics, ids))`, and only those rows of its tables are updated.
    """
    base_key = jax.random.key(seed)

    def dense_step(state: TrainState, batch: dict, aux: Any, rng: jax.Array):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, aux, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state, loss, metrics, grads

    def lazy_step(state: TrainState, batch: dict, aux: Any, rng: jax.Array):
        dense, tables = tx.split(state.params)
        (loss, metrics), g_dense, ids, g_deltas = sparse_rows.lazy_value_and_grad(
            loss_fn, dense, tables, batch, aux, rng)
        updates, dense_opt = tx.dense.update(g_dense, state.opt_state["dense"], dense)
        tables, moments, g_rows = tx.update_rows(state.step, tables, state.opt_state["rows"], ids, g_deltas)
        params = dict(optax.apply_updates(dense, updates), **tables)
        return params, {"dense": dense_opt, "rows": moments}, loss, metrics, (g_dense, g_rows)

    def step(state: TrainState, batch: dict, aux: Any):
        rng = jax.random.fold_in(base_key, state.step)
        params, opt_state, loss, metrics, grads = (lazy_step if isinstance(tx, sparse_rows.RowSparse)
                                                   else dense_step)(state, batch, aux, rng)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree_utils.tree_norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step,
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)),
                   donate_argnums=(0,))
