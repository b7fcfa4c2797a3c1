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

Score-aware (anisotropic) codes, for inner products (ScaNN's loss; Guo et al., "Accelerating
large-scale inference with anisotropic vector quantization", 2020): a row x's quantization error e
costs ||e||^2 + (eta - 1) (e . x / ||x||)^2, eta = `anisotropic_eta(d, T)` > 1, so the error parallel
to x, which moves <q, x> for the queries that rank x high, is paid eta times over. Codes are chosen
by coordinate descent over the sub-spaces from the nearest ones (`encode` with `directions`), and
each centroid is the minimiser of that loss over its rows, a dsub x dsub solve (`train_codebooks`).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

N_CENTROIDS = 16  # 4-bit codes
BLOCK_ROWS = 32   # rows per fast-scan block (one AVX2 register of codes per sub-space pair)


# Bytes of per-row working arrays (every sub-space's distances to its 16 centroids, the rows split into
# sub-spaces) that training and encoding hold at once: a 65536-row pass of 768-d rows at dsub 1 took 3.2 GB
# of distances alone, so the rows per pass follow M and dsub (GloVe 50-d keeps the full 65536-row sample).
PASS_BYTES = 1 << 28


def n_subspaces(d: int, dsub: int) -> int:
    return -(-d // dsub)


def rows_per_pass(d: int, dsub: int, limit: int) -> int:
    """At most `limit` rows, and no more than keep [M, rows, 16 + 4 dsub] float32 within PASS_BYTES (in
    multiples of 1024, few compiled shapes; 1024 at least)."""
    per_row = 4 * n_subspaces(d, dsub) * (N_CENTROIDS + 4 * dsub)
    return min(limit, max(1024, PASS_BYTES // per_row // 1024 * 1024))


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


def anisotropic_eta(d: int, threshold: float) -> float:
    """ScaNN's weight of the parallel error, (d - 1) T^2 / (1 - T^2), for a threshold T relative to the
    row's norm (the inner products that matter are those above T ||q|| ||x||); 1 = plain PQ (T = 0)."""
    if not 0 <= threshold < 1:
        raise ValueError(f"pq4: anisotropic threshold must be in [0, 1), got {threshold}")
    return 1.0 if threshold == 0 else max(1.0, (d - 1) * threshold ** 2 / (1 - threshold ** 2))


def eta_of(metric: str, d: int, threshold: float) -> float:
    """`anisotropic_eta` for an index's kernel metric: the loss is for inner products ('ip': angular, dot)."""
    if threshold and metric != "ip":
        raise ValueError(f"quantize: anisotropic={threshold} weighs the error along x, which ranks inner products; "
                         "this index's metric is euclidean (use 0)")
    return anisotropic_eta(d, threshold)


def codes_of(arrays: dict, r: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Packed codes of rows r (x: the vectors they stand for) with an index's stored codebooks and, when it
    has one, its anisotropic weight `pq4_eta`: how `add` encodes new rows as `fit_codes` encoded the rest."""
    eta = float(arrays["pq4_eta"][0]) if "pq4_eta" in arrays else 1.0
    return pack_rows(encode(r, arrays["pq4_codebooks"], directions=x, eta=eta))


def store_codes(arrays: dict, codebooks: np.ndarray, codes: np.ndarray, eta: float) -> None:
    """An index's PQ arrays: codebooks, codes and (anisotropic codes only) the weight `pq4_eta` [1]."""
    arrays.update(pq4_codebooks=codebooks, pq4_codes=codes)
    arrays.pop("pq4_eta", None)
    if eta != 1.0:
        arrays["pq4_eta"] = np.array([eta], np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


@partial(jax.jit, static_argnums=(4,))
def _anisotropic_codes(xs, us, codebooks, eta, n_sweeps):
    """Codes [M, n] minimising sum_m ||e_m||^2 + (eta - 1) (sum_m e_m . u_m)^2, e_m = xs_m - codebook_m[code_m]
    (xs, us [M, n, dsub]: rows and unit directions per sub-space): nearest codes, then `n_sweeps` passes of
    coordinate descent over the sub-spaces, each the best of 16 with the others fixed."""
    hi = jax.lax.Precision.HIGHEST
    codes = _nearest(xs, codebooks)
    err = xs - jnp.take_along_axis(codebooks, codes[..., None], axis=1)            # [M, n, dsub]
    s = jnp.einsum("mnd,mnd->n", err, us, precision=hi)

    def step(carry, m):
        codes, s = carry
        cand = xs[m][:, None, :] - codebooks[m][None]                               # [n, 16, dsub]
        proj = jnp.einsum("nkd,nd->nk", cand, us[m], precision=hi)
        rest = s - jnp.take_along_axis(proj, codes[m][:, None], axis=1)[:, 0]
        loss = jnp.sum(cand * cand, -1) + (eta - 1.0) * (rest[:, None] + proj) ** 2
        best = jnp.argmin(loss, axis=-1).astype(jnp.int32)
        return (codes.at[m].set(best), rest + jnp.take_along_axis(proj, best[:, None], axis=1)[:, 0]), None

    for _ in range(n_sweeps):
        (codes, s), _ = jax.lax.scan(step, (codes, s), jnp.arange(xs.shape[0]))
    return codes


@partial(jax.jit, static_argnums=(4, 5))
def _anisotropic_lloyd(x, u, init, eta, dsub, n_iter):
    """Lloyd's loop under the anisotropic loss: codes by `_anisotropic_codes`, then each centroid c of
    sub-space m the minimiser over its rows i of ||x_im - c||^2 + (eta - 1) (a_i - c . u_im)^2, a_i the
    row's parallel error without sub-space m plus x_im . u_im: (n I + (eta - 1) sum u u^T) c = sum x +
    (eta - 1) sum a u."""
    hi = jax.lax.Precision.HIGHEST
    xs, us = _split(x, dsub), _split(u, dsub)
    w = eta - 1.0

    def step(_, cb):
        codes = _anisotropic_codes(xs, us, cb, eta, 1)
        onehot = jax.nn.one_hot(codes, N_CENTROIDS, dtype=xs.dtype)                 # [M, n, 16]
        err = xs - jnp.take_along_axis(cb, codes[..., None], axis=1)
        par = jnp.einsum("mnd,mnd->mn", err, us, precision=hi)
        a = par.sum(0)[None] - par + jnp.einsum("mnd,mnd->mn", xs, us, precision=hi)  # [M, n]
        counts = onehot.sum(1)                                                       # [M, 16]
        # sum of u u^T over each centroid's rows, one centroid at a time: [M, n, dsub] at once, not the
        # [M, n, 16, dsub] of a single einsum
        uu = jax.lax.map(lambda k: jnp.einsum("mnd,mne->mde", us * (codes == k)[..., None], us, precision=hi),
                         jnp.arange(N_CENTROIDS))                                      # [16, M, dsub, dsub]
        lhs = counts[..., None, None] * jnp.eye(dsub, dtype=xs.dtype) + w * uu.transpose(1, 0, 2, 3)
        rhs = (jnp.einsum("mnk,mnd->mkd", onehot, xs, precision=hi)
               + w * jnp.einsum("mnk,mn,mnd->mkd", onehot, a, us, precision=hi))
        safe = jnp.where(counts[..., None, None] > 0, lhs, jnp.eye(dsub, dtype=xs.dtype))
        new = jnp.linalg.solve(safe, rhs[..., None])[..., 0]
        return jnp.where(counts[..., None] > 0, new, cb)                              # an empty centroid stays

    return jax.lax.fori_loop(0, n_iter, step, _split(init, dsub))


def train_codebooks(x: np.ndarray, dsub: int = 2, *, n_iter: int = 20, sample: int = 65536,
                    seed: int = 0, directions: np.ndarray | None = None, eta: float = 1.0) -> np.ndarray:
    """Codebooks [M, 16, dsub] float32: k-means with 16 centroids in every sub-space of the rows of x
    (a seeded sample of `sample` rows, 0 = all, capped by `rows_per_pass`: a few thousand rows still give
    each centroid hundreds), all sub-spaces in one jitted Lloyd loop, started from 16 distinct sample rows.
    With `directions` [n, d] (the rows whose inner products the codes serve: x itself, or the vectors
    whose residuals x holds) and eta > 1: under the anisotropic loss."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) < N_CENTROIDS:
        raise ValueError(f"pq4: need at least {N_CENTROIDS} training rows [n, d], got shape {x.shape}")
    if dsub < 1:
        raise ValueError(f"pq4: dsub (dimensions per sub-space) must be >= 1, got {dsub}")
    rng = np.random.default_rng(seed)
    sample = rows_per_pass(x.shape[1], dsub, sample if sample > 0 else len(x))
    rows = np.sort(rng.choice(len(x), sample, replace=False)) if sample < len(x) else np.arange(len(x))
    x = x[rows]
    init = x[rng.choice(len(x), N_CENTROIDS, replace=False)]
    if directions is None or eta == 1.0:
        return np.asarray(_lloyd(jnp.asarray(x), jnp.asarray(init), dsub, n_iter), np.float32)
    u = _unit(np.asarray(directions, np.float32)[rows])
    return np.asarray(_anisotropic_lloyd(jnp.asarray(x), jnp.asarray(u), jnp.asarray(init), float(eta), dsub, n_iter),
                      np.float32)


def fit_codes(x: np.ndarray, dims: int, *, sample: int = 65536, seed: int = 0,
              directions: np.ndarray | None = None, eta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(codebooks [M, 16, dims], packed codes [n, ceil(M / 2)]) of the rows of x: `train_codebooks` on a
    seeded sample, then every row encoded and packed (`pack_rows`); anisotropic with `directions` and
    eta > 1. What an index stores to quantize."""
    if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or dims < 1:
        raise ValueError(f"quantize: dims={dims!r} must be an integer >= 1 (dimensions per sub-space), or 'auto'")
    codebooks = train_codebooks(x, int(dims), sample=sample, seed=seed, directions=directions, eta=eta)
    return codebooks, pack_rows(encode(x, codebooks, directions=directions, eta=eta))


def check_config(config) -> None:
    """`index.pq4_dims` (0 none, -1 chosen from the data, else dims per sub-space) and the search
    settings' `reorder` (which scans the codes, so needs them)."""
    index = config.get("index", {})
    pq4_dims = index.get("pq4_dims", 0)  # absent from configs saved before PQ codes existed
    if pq4_dims < -1:
        raise ValueError(f"index.pq4_dims: must be >= -1 (0 = no PQ codes, -1 = chosen from the data), got {pq4_dims}")
    threshold = index.get("pq4_anisotropic", 0.0)
    if not 0 <= threshold < 1:
        raise ValueError(f"index.pq4_anisotropic: the threshold T must be in [0, 1) (0 = plain PQ), got {threshold}")
    for s in config.search.settings:
        reorder = s.get("reorder", 0)
        if reorder < 0:
            raise ValueError(f"search.settings: reorder={reorder} must be >= 0 (0 = scan the float rows)")
        if reorder and s.get("codes", "pq4") == "pq4" and not pq4_dims:
            raise ValueError(f"search.settings: reorder={reorder} scans PQ codes; set index.pq4_dims > 0 (or -1)")


def check_reorder(setting: dict, quantized: bool, how: str = "call index.quantize() (or train with "
                  "--config.index.pq4_dims=-1)") -> int:
    """A search setting's `reorder` (0 = float rows; > 0 = codes, the best `reorder` re-ranked exactly),
    checked against what the index holds (`quantized`: the codes of the setting's kind; `how` to add them);
    returns it."""
    reorder = setting.get("reorder", 0)
    if isinstance(reorder, bool) or not isinstance(reorder, (int, np.integer)) or reorder < 0:
        raise ValueError(f"search: reorder={reorder!r} must be an integer >= 0 (0 = scan the float rows)")
    kind = "8-bit" if setting.get("codes", "pq4") == "sq8" else "PQ"
    if reorder and not quantized:
        raise ValueError(f"search: reorder > 0 scores candidates from {kind} codes, which this index does not "
                         f"hold: {how}")
    if reorder and setting.get("backend", "host") != "host":
        raise ValueError(f"search: reorder > 0 ({kind} codes) runs on backend='host' only; the device backend "
                         "scans float rows (reorder=0)")
    return int(reorder)


@partial(jax.jit, static_argnums=(2,))
def _encode_block(x, codebooks, dsub):
    return _nearest(_split(x, dsub), codebooks).T


@partial(jax.jit, static_argnums=(4,))
def _encode_anisotropic_block(x, u, codebooks, eta, dsub):
    return _anisotropic_codes(_split(x, dsub), _split(u, dsub), codebooks, eta, ANISOTROPIC_SWEEPS).T


ANISOTROPIC_SWEEPS = 3  # coordinate-descent passes when encoding (the loss barely moves after 2)


def encode(x: np.ndarray, codebooks: np.ndarray, block: int = 65536, *, directions: np.ndarray | None = None,
           eta: float = 1.0) -> np.ndarray:
    """Codes [n, M] uint8 (0..15): each sub-space's nearest centroid (squared L2); with `directions` [n, d]
    and eta > 1, the codes of least anisotropic loss (module docstring). Rows go `block` at a time, fewer
    where `rows_per_pass` says so."""
    x = np.asarray(x, np.float32)
    m, _, dsub = codebooks.shape
    if x.ndim != 2 or n_subspaces(x.shape[1], dsub) != m:
        raise ValueError(f"pq4: rows of shape {x.shape} do not match codebooks {codebooks.shape}")
    block = rows_per_pass(x.shape[1], dsub, block)
    aniso = directions is not None and eta != 1.0
    cb = jnp.asarray(codebooks)
    out = np.empty((len(x), m), np.uint8)
    for s in range(0, len(x), block):
        chunk = x[s:s + block]
        pad = -len(chunk) % 1024  # few compiled shapes
        padded = jnp.asarray(np.pad(chunk, ((0, pad), (0, 0))))
        if aniso:
            u = jnp.asarray(np.pad(_unit(np.asarray(directions[s:s + block], np.float32)), ((0, pad), (0, 0))))
            codes = _encode_anisotropic_block(padded, u, cb, float(eta), dsub)
        else:
            codes = _encode_block(padded, cb, dsub)
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


def row_terms(row_codes: np.ndarray, codebooks: np.ndarray, centres: np.ndarray, row_offsets: np.ndarray,
              block: int = 65536) -> np.ndarray:
    """e_i = 2 c_b . r_i + ||r_i||^2 [n] float32 for rows with packed residual codes [n, M2] in leaf layout
    (leaf b: rows row_offsets[b]:row_offsets[b+1], centre c_b) and r_i the decoded residual: what l2
    search adds to -2 q . r_i + ||q - c_b||^2 to get ||q - c_b - r_i||^2, so that one table per query
    serves every leaf (`reference.pq4_search`'s row_terms)."""
    m, _, dsub = codebooks.shape
    d = centres.shape[1]
    leaf = np.repeat(np.arange(len(row_offsets) - 1), np.diff(np.asarray(row_offsets, np.int64)))
    out = np.empty(len(row_codes), np.float32)
    for s in range(0, len(row_codes), block):
        codes = unpack_rows(row_codes[s:s + block], m).astype(np.int64)
        r = codebooks[np.arange(m), codes].reshape(len(codes), m * dsub)[:, :d].astype(np.float64)  # [n, d]
        c = centres[leaf[s:s + block]].astype(np.float64)
        out[s:s + len(codes)] = 2.0 * np.einsum("nd,nd->n", c, r) + np.einsum("nd,nd->n", r, r)
    return out


# Per-query cost terms of the quantized search on one core, in ns (GloVe, BENCHMARKS.md "where a query's time
# goes"): scanning one candidate's code costs SCAN_NS per sub-space; re-ranking a row RERANK_ROW_NS plus
# RERANK_DIM_NS per dimension (a random row read, then a vectorised distance); each table entry TABLE_NS.
SCAN_NS, RERANK_ROW_NS, RERANK_DIM_NS, TABLE_NS = 0.031, 100.0, 0.25, 1.0


def _distances(q: np.ndarray, y: np.ndarray, metric: str) -> np.ndarray:
    """Kernel-metric distances [len(q), len(y)] by one matrix product (l2 expanded: ||q||^2 - 2 q.y + ||y||^2)."""
    dot = q @ y.T
    return (q * q).sum(1)[:, None] - 2 * dot + (y * y).sum(1)[None] if metric == "l2" else -dot


def _nearest_rows(x: np.ndarray, queries: np.ndarray, metric: str, k: int, block: int = 65536) -> np.ndarray:
    """Kernel-metric distance of the k-th nearest base row to each query row (itself left out) [Q]."""
    best = np.full((len(queries), 0), np.inf, np.float32)
    q = x[queries]
    for s in range(0, len(x), block):
        y = x[s:s + block]
        dist = _distances(q, y, metric)
        mine = (queries >= s) & (queries < s + len(y))
        dist[np.flatnonzero(mine), queries[mine] - s] = np.inf
        best = np.sort(np.concatenate([best, np.sort(dist, 1)[:, :k]], 1), 1)[:, :k]
    return best[:, -1]


def choose_dims(vectors: np.ndarray, row_offsets: np.ndarray, metric: str, *, residual: bool = True,
                eta: float = 1.0, options=(1, 2, 4, 8, 16), n_queries: int = 128, recall: float = 0.9,
                keep: float = 0.98, sample: int = 2048, seed: int = 0) -> int:
    """Dimensions per sub-space for residual codes of `vectors` (leaf layout, kernel metric 'l2' or 'ip';
    residual=False: codes of the vectors themselves; eta > 1: anisotropic codes),
    chosen by simulating the search on the data. `n_queries` seeded base rows are the queries (each left out
    of its own answers); each probes the leaves nearest it by centre until `recall` of its 10 right answers
    (rows as near as the exact 10th: binary rows tie often) are among the candidates. For every option,
    codes from codebooks trained on a sample of residuals order each query's candidates; R is the rank
    within which `keep` of the right answers fall (the reorder the codes need); the estimated time per
    query is the scan (candidates x sub-spaces), the re-rank of R rows and the table (the *_NS costs).
    The cheapest wins (ties: fewer dims). Few dims where distances concentrate (isotropic high-d rows),
    many where rows are sparse or low-rank (bag-of-words rows) and the scan is most of the query."""
    x = np.asarray(vectors, np.float32)
    n, d = x.shape
    row_offsets = np.asarray(row_offsets, np.int64)
    sizes = np.diff(row_offsets)
    centres = leaf_means(x, row_offsets)
    leaf = np.repeat(np.arange(len(sizes)), sizes)
    r = x - centres[leaf] if residual else x
    rng = np.random.default_rng(seed)
    queries = rng.choice(n, min(n_queries, n), replace=False)
    tenth = _nearest_rows(x, queries, metric, min(10, n - 1))

    def score(q, rows, decoded=None):
        """Kernel-metric distances of base row q to `rows` (exact, or from decoded residuals [rows, d])."""
        if decoded is not None:
            decoded = centres[leaf[rows]] + decoded if residual else decoded
        return _distances(x[q][None], x[rows] if decoded is None else decoded, metric)[0]

    centre_order = np.argsort(_distances(x[queries], centres, metric), axis=1, kind="stable")
    cands, good = [], []
    for i, q in enumerate(queries):  # leaves in centre order until `recall` of the right answers are in
        order = centre_order[i][sizes[centre_order[i]] > 0]
        rows = np.concatenate([np.arange(row_offsets[b], row_offsets[b + 1]) for b in order])
        right = (score(q, rows) <= tenth[i] + 1e-5 * abs(tenth[i])) & (rows != q)  # rounding: products differ
        found = np.cumsum(right)[np.cumsum(sizes[order]) - 1]
        last = int(np.searchsorted(found, np.ceil(recall * min(10, right.sum()))))
        n_rows = int(np.sum(sizes[order][:last + 1]))
        keep_rows = rows[:n_rows] != q
        cands.append(rows[:n_rows][keep_rows])
        good.append(right[:n_rows][keep_rows])
    union = np.unique(np.concatenate(cands))
    position = np.full(n, -1, np.int64)
    position[union] = np.arange(len(union))
    train_rows = rng.choice(n, min(sample, n), replace=False)
    mean_candidates = np.mean([len(c) for c in cands])
    best, best_cost = options[0], np.inf
    for dims in options:
        if dims > max(1, d // 4) and dims != options[0]:
            break
        codebooks = train_codebooks(r[train_rows], dims, n_iter=10, sample=0, seed=seed, directions=x[train_rows],
                                    eta=eta)
        m = codebooks.shape[0]
        codes = encode(r[union], codebooks, directions=x[union], eta=eta)
        decoded = codebooks[np.arange(m), codes].reshape(len(union), m * dims)[:, :d]
        ranks = []  # per query, where the codes' order puts the first 10 right answers
        for q, rows, ok in zip(queries, cands, good):
            order = np.argsort(score(q, rows, decoded[position[rows]]), kind="stable")
            ranks.append(np.flatnonzero(ok[order])[:10])
        need = max(10.0, float(np.quantile(np.concatenate(ranks), keep)) + 1)
        cost = (mean_candidates * m * SCAN_NS + need * (RERANK_ROW_NS + RERANK_DIM_NS * d)
                + N_CENTROIDS * m * TABLE_NS)
        if cost < best_cost:
            best, best_cost = dims, cost
    return best
