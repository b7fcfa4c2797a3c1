"""Row tables trained lazily: a step reads and updates only the rows its loss gathered.

A model with a huge per-item table (ELIAS's per-label classifiers, L x H) touches only
a batch's shortlisted rows in a step, yet a dense optimizer updates all L x H weights and
both Adam moments every step: at L = 1M that is most of the step. Here such tables are
named in a `RowSparse` optimizer. The loss gathers their rows with `take_rows`; the train
step differentiates with respect to a zero delta added to the gathered rows (not the
table), sums the deltas' gradients per distinct row, and applies AdamW to those rows of
the table and of its moments only: O(rows gathered x H) per step, whatever L.

Where a step touches every row this equals `optax.adamw` (tested). Otherwise it is lazy
Adam, as TensorFlow's LazyAdam and PyTorch's SparseAdam: a row's moments and weight decay
advance only in steps that gather it; bias correction and the learning rate follow the
global step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class RowTable:
    """A table's leaves ({name: [rows, ...]}) and the zero deltas ({name: [*ids.shape, ...]}) the
    gathered rows are offset by; the gradient flows to the deltas, not to the table."""
    leaves: dict
    deltas: dict


def take_rows(table, ids: jax.Array) -> dict:
    """{name: leaf[ids]} of a table: a dict of arrays (plain gather) or a `RowTable` in a lazy step
    (gathered rows + delta). `ids` must match, entry for entry, the ids the loss reports for the table
    (see `RowSparse`), except where it reports -1 (masked: any row may be gathered there)."""
    if isinstance(table, RowTable):
        return {k: jnp.take(jax.lax.stop_gradient(v), ids, axis=0) + table.deltas[k] for k, v in table.leaves.items()}
    return {k: jnp.take(v, ids, axis=0) for k, v in table.items()}


@dataclasses.dataclass(frozen=True)
class RowSparse:
    """Optimizer of a params dict whose top-level entries `tables` are row tables updated lazily by
    AdamW (`learning_rate` schedule, decoupled `weight_decay` on leaves of 2 or more dimensions, as
    the dense optimizer's mask); the other entries go to `dense`, an optax transformation.

    A loss trained with it returns `(loss, (metrics, ids))`, `ids` {table: int array} the rows it
    gathered with `take_rows` (-1: gathered but masked out; skipped).
    """
    dense: optax.GradientTransformation
    tables: tuple[str, ...]
    learning_rate: Callable[[jax.Array], jax.Array]
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def split(self, params: dict) -> tuple[dict, dict]:
        """(the densely trained entries, the row tables)."""
        missing = [t for t in self.tables if t not in params]
        if missing:
            raise KeyError(f"RowSparse: tables {missing} are not top-level params ({sorted(params)})")
        return ({k: v for k, v in params.items() if k not in self.tables},
                {k: v for k, v in params.items() if k in self.tables})

    def init(self, params: dict) -> dict:
        dense, tables = self.split(params)
        return {"dense": self.dense.init(dense),
                "rows": jax.tree.map(lambda v: {"mu": jnp.zeros_like(v), "nu": jnp.zeros_like(v)}, tables)}

    def update_rows(self, step: jax.Array, tables: dict, moments: dict, ids: dict, deltas_grad: dict):
        """AdamW on the rows `ids` of each table; returns (tables, moments, the gradient summed per distinct
        row, zero in the padding slots: what the dense gradient holds in those rows, for its norm)."""
        t = (step + 1).astype(jnp.float32)
        lr = self.learning_rate(step)
        new_tables, new_moments, row_grads = {}, {}, {}
        for name, table in tables.items():
            n_rows = next(iter(table.values())).shape[0]
            rows, inverse = _distinct_rows(ids[name], n_rows)
            new_tables[name], new_moments[name], row_grads[name] = {}, {}, {}
            for leaf, p in table.items():
                g = deltas_grad[name][leaf]
                g = jnp.zeros((rows.shape[0],) + g.shape[ids[name].ndim:], g.dtype).at[inverse].add(
                    g.reshape((-1,) + g.shape[ids[name].ndim:]))
                m = moments[name][leaf]
                mu = self.b1 * m["mu"].at[rows].get(mode="fill", fill_value=0) + (1 - self.b1) * g
                nu = self.b2 * m["nu"].at[rows].get(mode="fill", fill_value=0) + (1 - self.b2) * g * g
                u = (mu / (1 - self.b1 ** t)) / (jnp.sqrt(nu / (1 - self.b2 ** t)) + self.eps)
                w = p.at[rows].get(mode="fill", fill_value=0)
                if p.ndim >= 2 and self.weight_decay:
                    u = u + self.weight_decay * w
                new_tables[name][leaf] = p.at[rows].set(w - lr * u, mode="drop")
                new_moments[name][leaf] = {"mu": m["mu"].at[rows].set(mu, mode="drop"),
                                           "nu": m["nu"].at[rows].set(nu, mode="drop")}
                row_grads[name][leaf] = jnp.where((rows < n_rows).reshape((-1,) + (1,) * (g.ndim - 1)), g, 0)
        return new_tables, new_moments, row_grads


def _distinct_rows(ids: jax.Array, n_rows: int) -> tuple[jax.Array, jax.Array]:
    """(distinct row ids, ascending, padded with n_rows, which scatters drop and gathers fill; for each
    entry of `ids` flattened, its slot in them). Negative or out-of-range ids map to the padding. One
    integer sort and a `searchsorted` (XLA's CPU sort of one array is fast, its argsort is not)."""
    flat = ids.reshape(-1)
    flat = jnp.where((flat >= 0) & (flat < n_rows), flat, n_rows)
    ordered = jnp.sort(flat)
    first = jnp.concatenate([jnp.ones(1, bool), ordered[1:] != ordered[:-1]])
    slot = jnp.cumsum(first) - 1
    rows = jnp.full(flat.shape, n_rows, flat.dtype).at[jnp.where(first, slot, flat.shape[0])].set(ordered, mode="drop")
    return rows, slot[jnp.searchsorted(ordered, flat)]


def lazy_value_and_grad(loss_fn: Callable, dense: dict, tables: dict, *args) -> tuple[Any, Any, dict, dict]:
    """`loss_fn(params, *args) -> (loss, (metrics, ids))` differentiated with the row `tables` behind
    `RowTable`s (params = `dense` and `tables`, as `RowSparse.split` gives them): returns
    ((loss, metrics), dense grads, ids, deltas' grads). The deltas' shapes come from the ids the loss
    reports (traced once abstractly)."""
    _, (_, id_shapes) = jax.eval_shape(loss_fn, dict(dense, **tables), *args)
    deltas = {name: {k: jnp.zeros(id_shapes[name].shape + v.shape[1:], v.dtype) for k, v in table.items()}
              for name, table in tables.items()}

    def f(dense, deltas):
        return loss_fn(dict(dense, **{name: RowTable(tables[name], deltas[name]) for name in tables}), *args)

    (loss, (metrics, ids)), (g_dense, g_deltas) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(dense, deltas)
    return (loss, metrics), g_dense, ids, g_deltas
