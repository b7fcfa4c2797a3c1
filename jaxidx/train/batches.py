"""Fixed-shape training batches from in-memory arrays.

Every batch has the same shapes (one compile); the last partial batch of an
epoch is filled with weight-0 rows so every example is used exactly once per
epoch. The order of epoch e is a permutation seeded by (seed, e), the same in every process;
with several processes each builds only its own block of each batch's rows.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp


def pad_sparse_rows(X: sp.csr_matrix, pow2: bool = False) -> dict:
    """CSR [n, D] -> {'idx': int32 [n, F], 'val': float32 [n, F]}, F = max nnz per row (>= 1), or with
    `pow2` the next power of two (searches: a jitted encoder then compiles once per power of two, not
    once per row length). Padding entries are feature 0 with value 0."""
    X = sp.csr_matrix(X)
    n = X.shape[0]
    lens = np.diff(X.indptr)
    width = max(int(lens.max(initial=0)), 1)
    if pow2:
        width = 1 << (width - 1).bit_length()
    idx = np.zeros((n, width), np.int32)
    val = np.zeros((n, width), np.float32)
    rows = np.repeat(np.arange(n), lens)
    cols = np.arange(X.nnz) - np.repeat(X.indptr[:-1], lens)
    idx[rows, cols] = X.indices
    val[rows, cols] = X.data
    return {"idx": idx, "val": val}


def xmc_inputs(X: sp.csr_matrix, tokens=None) -> dict:
    """XMC rows as every encoder may read them: padded sparse rows, plus 'tokens' where the data has text."""
    x = pad_sparse_rows(X)
    if tokens is not None:
        x["tokens"] = np.asarray(tokens, np.int32)
    return x


def densify_rows(x: dict, n_features: int) -> np.ndarray:
    """Padded sparse rows {'idx', 'val'} -> dense float32 [n, n_features] (for dense-input models)."""
    n = x["idx"].shape[0]
    out = np.zeros((n, n_features), np.float32)
    np.add.at(out, (np.arange(n)[:, None], x["idx"]), x["val"])
    return out


def pad_label_lists(Y: sp.csr_matrix, width: int | None = None) -> np.ndarray:
    """CSR labels [n, L] -> int32 [n, width] label ids padded with -1 (width = max labels per row)."""
    Y = sp.csr_matrix(Y)
    lens = np.diff(Y.indptr)
    width = max(int(lens.max(initial=0)), 1) if width is None else width
    out = np.full((Y.shape[0], width), -1, np.int32)
    rows = np.repeat(np.arange(Y.shape[0]), lens)
    cols = np.arange(Y.nnz) - np.repeat(Y.indptr[:-1], lens)
    keep = cols < width
    out[rows[keep], cols[keep]] = Y.indices[keep]
    return out


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def batch_rows(order: np.ndarray, index: int, batch_size: int,
               shard: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Rows of batch `index` in `order`, and their weights (0 for the filler rows of a partial batch).

    `shard=(k, n)` keeps block k of n of them: a process's own rows (`mesh.process_shard`).
    """
    rows = order[index * batch_size:(index + 1) * batch_size]
    weight = np.ones(batch_size, np.float32)
    if len(rows) < batch_size:
        weight[len(rows):] = 0.0
        rows = np.concatenate([rows, np.full(batch_size - len(rows), order[0], rows.dtype)])
    return shard_block(rows, shard), shard_block(weight, shard)


def shard_block(a: np.ndarray, shard: tuple[int, int]) -> np.ndarray:
    """Block k of n equal, contiguous blocks of `a`'s rows, for `shard=(k, n)`."""
    k, n = shard
    size = a.shape[0] // n
    return a[k * size:(k + 1) * size]


def take(tree, rows: np.ndarray):
    """Rows of every array in a (possibly nested) dict of arrays."""
    if isinstance(tree, dict):
        return {k: take(v, rows) for k, v in tree.items()}
    return tree[rows]
