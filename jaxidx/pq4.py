"""4-bit product quantization (PQ4) for the fast-scan search path (kernels/fastscan.cpp).

A d-dimensional vector is cut into M = ceil(d / dsub) sub-spaces of `dsub` dimensions (the last one
zero-padded); each sub-space has 16 centroids, so a vector's code is M nibbles: M / 2 bytes against
4 d bytes for its float row (GloVe 50-d at dsub 2: 13 bytes against 200). A query scores a candidate
from 16-entry tables per sub-space, 32 candidates per SIMD shuffle, and only the best few hundred are
re-ranked on the float rows.

Residual codes quantize x - c_b, a vector minus the mean of its leaf (as faiss's IVF-PQ `by_residual`):
the residuals are smaller than the vectors, so 16 centroids per sub-space resolve them finer.

Rows are stored two sub-spaces per byte (`pack_rows`: sub-space 2p in the low nibble, 2p + 1 in the
high one), in the index's leaf layout; `block_layout` regroups them into the kernel's blocks of 32 rows.
Codebooks are trained in JAX (`train_codebooks`: Lloyd's k-means on every sub-space at once).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

N_CENTROIDS = 16  # 4-bit codes
BLOCK_ROWS = 32   # rows per fast-scan block (one AVX2 register of codes per sub-space pair)


def n_subspaces(d: int, dsub: int) -> int:
    return -(-d // dsub)


def _split(x: jax.Array, dsub: int) -> jax.Array:
    """[n, d] -> [M, n, dsub], the last sub-space zero-padded."""
    n, d = x.shape
    m = n_subspaces(d, dsub)
    x = jnp.pad(x, ((0, 0), (0, m * dsub - d)))
    return x.reshape(n, m, dsub).transpose(1, 0, 2)


def _nearest(xs: jax.Array, codebooks: jax.Array) -> jax.Array:
    """Nearest centroid per sub-space: xs [M, n, dsub], codebooks [M, 16, dsub] -> [M, n] int32."""
    dist = (jnp.sum(codebooks * codebooks, -1)[:, None, :]
            - 2.0 * jnp.einsum("mnd,mkd->mnk", xs, codebooks, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(2, 3))
def _lloyd(x: jax.Array, init: jax.Array, dsub: int, n_iter: int) -> jax.Array:
    xs = _split(x, dsub)

    def step(_, cb):
        lab = _nearest(xs, cb)
        onehot = jax.nn.one_hot(lab, N_CENTROIDS, dtype=xs.dtype)            # [M, n, 16]
        sums = jnp.einsum("mnk,mnd->mkd", onehot, xs, precision=jax.lax.Precision.HIGHEST)
        counts = onehot.sum(1)[..., None]
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), cb)    # an empty centroid stays

    return jax.lax.fori_loop(0, n_iter, step, _split(init, dsub))


def train_codebooks(x: np.ndarray, dsub: int = 2, *, n_iter: int = 20, sample: int = 65536,
                    seed: int = 0) -> np.ndarray:
    """Codebooks [M, 16, dsub] float32: k-means with 16 centroids in every sub-space of the rows of x
    (a seeded sample of `sample` rows; 0 = all), all sub-spaces in one jitted Lloyd loop, started
    from 16 distinct sample rows."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) < N_CENTROIDS:
        raise ValueError(f"pq4: need at least {N_CENTROIDS} training rows [n, d], got shape {x.shape}")
    if dsub < 1:
        raise ValueError(f"pq4: dsub (dimensions per sub-space) must be >= 1, got {dsub}")
    rng = np.random.default_rng(seed)
    if 0 < sample < len(x):
        x = x[np.sort(rng.choice(len(x), sample, replace=False))]
    init = x[rng.choice(len(x), N_CENTROIDS, replace=False)]
    return np.asarray(_lloyd(jnp.asarray(x), jnp.asarray(init), dsub, n_iter), np.float32)


@partial(jax.jit, static_argnums=(2,))
def _encode_block(x, codebooks, dsub):
    return _nearest(_split(x, dsub), codebooks).T


def encode(x: np.ndarray, codebooks: np.ndarray, block: int = 65536) -> np.ndarray:
    """Codes [n, M] uint8 (0..15): each sub-space's nearest centroid (squared L2)."""
    x = np.asarray(x, np.float32)
    m, _, dsub = codebooks.shape
    if x.ndim != 2 or n_subspaces(x.shape[1], dsub) != m:
        raise ValueError(f"pq4: rows of shape {x.shape} do not match codebooks {codebooks.shape}")
    cb = jnp.asarray(codebooks)
    out = np.empty((len(x), m), np.uint8)
    for s in range(0, len(x), block):
        chunk = x[s:s + block]
        pad = -len(chunk) % 1024  # few compiled shapes
        codes = _encode_block(jnp.asarray(np.pad(chunk, ((0, pad), (0, 0)))), cb, dsub)
        out[s:s + len(chunk)] = np.asarray(codes)[:len(chunk)]
    return out


def pack_rows(codes: np.ndarray) -> np.ndarray:
    """[n, M] codes -> [n, ceil(M / 2)] bytes: sub-space 2p in the low nibble, 2p + 1 in the high."""
    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack_rows(packed: np.ndarray, m: int) -> np.ndarray:
    """Inverse of `pack_rows`: [n, M] codes."""
    out = np.empty((len(packed), 2 * packed.shape[1]), np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 15, packed >> 4
    return out[:, :m]


def block_layout(row_codes: np.ndarray, row_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's layout of row-packed codes [n, M2] over leaves (rows row_offsets[b]:row_offsets[b+1]):
    (codes [n_blocks, M2, 32] uint8, block_offsets [L + 1] int32), each leaf in ceil(rows / 32) blocks,
    rows past its end zero."""
    row_offsets = np.asarray(row_offsets, np.int64)
    sizes = np.diff(row_offsets)
    per_leaf = -(-sizes // BLOCK_ROWS)
    block_offsets = np.concatenate([[0], np.cumsum(per_leaf)]).astype(np.int32)
    leaf = np.repeat(np.arange(len(sizes)), per_leaf)
    first = row_offsets[leaf] + BLOCK_ROWS * (np.arange(len(leaf)) - block_offsets[leaf])
    rows = first[:, None] + np.arange(BLOCK_ROWS)                         # [n_blocks, 32]
    valid = rows < row_offsets[leaf + 1][:, None]
    blocks = np.where(valid[..., None], row_codes[np.where(valid, rows, 0)], 0).astype(np.uint8)
    return np.ascontiguousarray(blocks.transpose(0, 2, 1)), block_offsets


def leaf_means(vectors: np.ndarray, row_offsets: np.ndarray) -> np.ndarray:
    """Mean of each leaf's rows [L, d] float32 (0 for an empty leaf): the centres of residual codes."""
    row_offsets = np.asarray(row_offsets, np.int64)
    sizes = np.diff(row_offsets)
    csum = np.concatenate([np.zeros((1, vectors.shape[1])), np.cumsum(np.asarray(vectors, np.float64), axis=0)])
    sums = csum[row_offsets[1:]] - csum[row_offsets[:-1]]
    return np.where(sizes[:, None] > 0, sums / np.maximum(sizes, 1)[:, None], 0.0).astype(np.float32)
