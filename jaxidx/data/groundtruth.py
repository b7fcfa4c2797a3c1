"""Exact k-nearest-neighbour ground truth in JAX, chunked so memory stays bounded.

Queries are processed in chunks of `qc` rows (a Python loop, results go back to
the host), the base in chunks of `bc` rows (a `lax.scan` inside one jitted
step) with a running top-k merge, so the largest temporary is one `[qc, bc]`
score block whatever the data size.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax import lax

from jaxidx.data.types import ANN_METRICS

# Default bound on the per-step working set ([qc, bc] float32 scores and their temporaries).
DEFAULT_MEMORY_BUDGET = 256 << 20
_MAX_QUERY_CHUNK = 256
_MAX_BASE_CHUNK = 65536
# Scores are reduced to group maxima over runs of this many base rows before the top-k;
# see `_block_top_k`.
_GROUP = 32


def knn_chunk_sizes(n_queries: int, n_base: int, k: int,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Tuple[int, int]:
    """(query chunk, base chunk) rows for `exact_knn` within `memory_budget` bytes.

    The base chunk is as long as allowed (long rows make the top-k cheap per
    element; room is left for at least 8 query rows), rounded to the grouping
    width; the query chunk fills the rest, counting about three float32 copies
    of the `[qc, bc]` score block.
    """
    bc = _round_up(max(k, min(_MAX_BASE_CHUNK, n_base, memory_budget // (3 * 4 * 8))), _GROUP)
    qc = max(1, min(_MAX_QUERY_CHUNK, n_queries, memory_budget // (3 * 4 * bc)))
    return int(qc), int(bc)


def exact_knn(queries, base, k: int, metric: str,
              chunk_size: Union[None, int, Sequence[int]] = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k neighbours of each query among `base`.

    metric: `angular` (inputs assumed L2-normalised; dist = 1 - cos),
    `euclidean` (dist = L2) or `dot` (dist = -dot). Returns `(ids int32 [Q, k],
    dist float32 [Q, k])`, ascending distance, ties broken by the smaller id.
    Computed in float32; euclidean uses |q|^2 + |b|^2 - 2 q.b, so near-ties
    closer than float32 rounding may be ordered differently from float64.
    chunk_size: `(query_rows, base_rows)` or one int for both; default from
    `memory_budget` (bytes) via `knn_chunk_sizes`.
    """
    if metric not in ANN_METRICS:
        raise ValueError(f"metric: unknown {metric!r}; valid: {ANN_METRICS}")
    queries = _as_matrix(queries, "queries")
    base = _as_matrix(base, "base")
    if queries.shape[1] != base.shape[1]:
        raise ValueError(f"dimension mismatch: queries have {queries.shape[1]}, base has {base.shape[1]}")
    n_q, n_b = queries.shape[0], base.shape[0]
    if not 1 <= k <= n_b:
        raise ValueError(f"k must be in [1, n_base={n_b}], got {k}")
    if n_q == 0:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)

    if chunk_size is None:
        qc, bc = knn_chunk_sizes(n_q, n_b, k, memory_budget)
    else:
        qc, bc = (chunk_size, chunk_size) if np.isscalar(chunk_size) else chunk_size
        qc, bc = int(qc), int(bc)
        if qc < 1 or bc < k:
            raise ValueError(f"chunk_size: need query chunk >= 1 and base chunk >= k={k}, got {(qc, bc)}")
    n_chunks = -(-n_b // bc)
    base_chunks = np.zeros((n_chunks * bc, base.shape[1]), np.float32)
    base_chunks[:n_b] = base
    base_chunks = jnp.asarray(base_chunks.reshape(n_chunks, bc, -1))
    group = _GROUP if bc % _GROUP == 0 and bc // _GROUP >= 4 * k else 1

    ids = np.empty((n_q, k), np.int32)
    dist = np.empty((n_q, k), np.float32)
    for start in range(0, n_q, qc):
        q = queries[start:start + qc]
        n = q.shape[0]
        if n < qc:  # pad the last chunk so every step has one compiled shape
            q = np.concatenate([q, np.zeros((qc - n, q.shape[1]), np.float32)])
        i, d = _knn_step(jnp.asarray(q), base_chunks, n_b, k=k, metric=metric, group=group)
        ids[start:start + n] = np.asarray(i)[:n]
        dist[start:start + n] = np.asarray(d)[:n]
    return ids, dist


def knn_labels(points, base, k: int, metric: str,
               exclude_ids: Optional[np.ndarray] = None) -> sp.csr_matrix:
    """Binary CSR `[n, N]`: row i marks the k exact nearest base items of points[i].

    This is how IRLI/BLISS cast ANN as classification: each base item is a
    label whose positives are the points it is a true neighbour of.
    `exclude_ids[i]` (e.g. the point's own id when points are base rows; a
    negative value excludes nothing) is never one of row i's neighbours.
    Built from `exact_knn` output, never as a dense n x N matrix.
    """
    n_b = np.shape(base)[0]
    if exclude_ids is None:
        ids, _ = exact_knn(points, base, k, metric)
    else:
        exclude_ids = np.asarray(exclude_ids).reshape(-1)
        if exclude_ids.shape[0] != np.shape(points)[0]:
            raise ValueError(f"exclude_ids has {exclude_ids.shape[0]} entries for {np.shape(points)[0]} points")
        if k + 1 > n_b:
            raise ValueError(f"k={k} neighbours plus one excluded id need n_base > k, got {n_b}")
        ids, _ = exact_knn(points, base, k + 1, metric)
        drop = ids == exclude_ids[:, None]
        drop[~drop.any(axis=1), -1] = True  # excluded id absent: drop the (k+1)-th instead
        ids = ids[~drop].reshape(-1, k)
    n = ids.shape[0]
    labels = sp.csr_matrix((np.ones(n * k, np.float32), ids.reshape(-1), np.arange(0, n * k + 1, k)),
                           shape=(n, n_b))
    labels.sort_indices()
    return labels


def _as_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block_dist(q, b, metric: str):
    """Distances of a query block to a base block, in the final ann-benchmarks form
    (squared for euclidean: the square root is taken on the k survivors only)."""
    s = q @ b.T
    if metric == "angular":
        return 1.0 - s
    if metric == "dot":
        return -s
    d2 = jnp.sum(q * q, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * s
    return jnp.maximum(d2, 0.0)


def _block_top_k(key, k: int, group: int):
    """Exact top-k (largest key, ties to the lower column) of each row of `key`.

    With group > 1 the row is cut into runs of `group` columns: the k runs with
    the largest maxima (ties to the lower run) contain the whole top-k, because
    any other run is preceded by k runs each holding an element that ranks
    before all of its elements. So only k * group candidates are fully ranked.
    """
    if group == 1:
        return lax.top_k(key, k)
    rows, cols = key.shape
    runs = key.reshape(rows, cols // group, group)
    _, run_ids = lax.top_k(runs.max(axis=2), k)
    run_ids = jnp.sort(run_ids, axis=1)  # ascending columns, so top_k's tie rule keeps meaning lower id
    cand = jnp.take_along_axis(runs, run_ids[:, :, None], axis=1).reshape(rows, k * group)
    vals, pos = lax.top_k(cand, k)
    return vals, jnp.take_along_axis(run_ids, pos // group, axis=1) * group + pos % group


@functools.partial(jax.jit, static_argnames=("k", "metric", "group"))
def _knn_step(q, base_chunks, n_valid, *, k: int, metric: str, group: int):
    """Top-k over all base chunks for one query chunk, merging chunk by chunk."""
    bc = base_chunks.shape[1]

    def merge(carry, xs):
        best_key, best_ids = carry
        chunk, offset = xs
        key = -_block_dist(q, chunk, metric)
        col_ids = offset + jnp.arange(bc, dtype=jnp.int32)
        key = jnp.where(col_ids[None, :] < n_valid, key, -jnp.inf)
        vals, pos = _block_top_k(key, k, group)
        # Earlier chunks hold smaller ids and come first, so ties still go to the smaller id.
        all_key = jnp.concatenate([best_key, vals], axis=1)
        all_ids = jnp.concatenate([best_ids, offset + pos.astype(jnp.int32)], axis=1)
        top_key, sel = lax.top_k(all_key, k)
        return (top_key, jnp.take_along_axis(all_ids, sel, axis=1)), None

    init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32), jnp.zeros((q.shape[0], k), jnp.int32))
    offsets = jnp.arange(base_chunks.shape[0], dtype=jnp.int32) * bc
    (key, ids), _ = lax.scan(merge, init, (base_chunks, offsets))
    dist = -key
    if metric == "euclidean":
        dist = jnp.sqrt(dist)
        # sqrt can merge distinct squared distances: restore (distance, id) order.
        dist, ids = lax.sort((dist, ids), dimension=1, num_keys=2)
    return ids, dist
