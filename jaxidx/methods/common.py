"""Pieces every method's search and config share."""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class SearchResult:
    """Ranked item ids [Q, k] (-1 = none), their scores [Q, k] (ANN: kernel distances, ascending -
    squared L2 or -dot; XMC: label scores, descending) and the candidates scored per query [Q]."""

    ids: np.ndarray
    scores: np.ndarray
    n_candidates: np.ndarray


def route_topm(apply: Callable, params, x, *, m: int, kind: str):
    """Router logits [b, R, B] -> top-m bucket ids and probabilities per repetition, [b, R, m] each.

    Probabilities are sigmoids for a BCE-trained router and softmaxes over B for
    a softmax-trained one, so scores are comparable across repetitions.
    """
    _, logits = apply(params, x)
    probs = jax.nn.sigmoid(logits) if kind == "bce" else jax.nn.softmax(logits, axis=-1)
    scores, ids = jax.lax.top_k(probs, m)
    return ids.astype(jnp.int32), scores


def input_standardizer(x: np.ndarray, metric: str, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """(center [d], scale []) float32 of the router's inputs: the mean of the base and the RMS size of its
    centred coordinates, so (x - center) / scale has the same values whatever the data's scale and offset
    (a preset's init, learning rate and soft-target temperature then mean the same on features near 1 and
    near 255). Identity for angular data (already unit rows) or when not `enabled`; a constant base keeps
    scale 1."""
    d = x.shape[1]
    if not enabled or metric == "angular" or len(x) == 0:
        return np.zeros(d, np.float32), np.ones((), np.float32)
    center = x.mean(axis=0, dtype=np.float64)
    var = sum(float(np.square(x[s:s + 65536] - center).sum()) for s in range(0, len(x), 65536)) / (len(x) * d)
    scale = np.sqrt(var) if var > 0 else 1.0
    return center.astype(np.float32), np.asarray(scale, np.float32)


def standardize(x, center, scale):
    """(x - center) / scale for the router (NumPy in, float32 out)."""
    return ((np.asarray(x, np.float32) - center) / scale).astype(np.float32)


def check_queries(queries, dim: int) -> None:
    """Refuse queries that do not fit the index before any work, naming expected vs got: dense
    queries must be [Q, dim]; padded sparse rows {'idx', 'val'} must hold feature ids in
    [0, dim). (Left alone, a matmul fails with a JAX shape error, and an embedding gather
    clamps out-of-range ids silently.)"""
    if isinstance(queries, dict):
        idx, val = queries.get("idx"), queries.get("val")
        if idx is None or val is None or np.ndim(idx) != 2 or np.shape(idx) != np.shape(val):
            raise ValueError(f"queries: padded sparse rows need 'idx' and 'val' of one shape [Q, F], got "
                             f"{ {k: np.shape(v) for k, v in queries.items()} }")
        idx = np.asarray(idx)
        bad = idx[(idx < 0) | (idx >= dim)]
        if bad.size:
            raise ValueError(f"queries: feature id {bad[0]} outside the index's {dim} features [0, {dim})")
    elif np.ndim(queries) != 2 or np.shape(queries)[1] != dim:
        raise ValueError(f"queries: expected shape [Q, {dim}] (the index's dimension), got {np.shape(queries)}")


def check_tokens(tokens, vocab_size: int, length: int) -> None:
    """Refuse token-id queries for a text encoder unless they are [Q, length] ids in [0, vocab_size)."""
    if tokens is None:
        raise ValueError("queries: a text encoder needs 'tokens' (the rows' token ids; see jaxidx.data.text)")
    if np.ndim(tokens) != 2 or np.shape(tokens)[1] != length:
        raise ValueError(f"queries: tokens must be [Q, {length}] (the training rows' length), got {np.shape(tokens)}")
    tokens = np.asarray(tokens)
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if bad.size:
        raise ValueError(f"queries: token id {bad[0]} outside the vocabulary [0, {vocab_size})")


BACKENDS = ("host", "device")  # where a search runs: the C++ kernels, or jitted JAX on the devices


def validate_common(config) -> None:
    """Checks every method's config shares; each error names the field and the reason."""
    t, s, m = config.train, config.search, config.model
    for field, value, least in (("train.epochs", t.epochs, 0), ("train.batch_size", t.batch_size, 1),
                                ("train.log_every", t.log_every, 1),
                                ("train.checkpoint_every_steps", t.checkpoint_every_steps, 0),
                                ("train.keep_checkpoints", t.keep_checkpoints, 1), ("search.k", s.k, 1),
                                ("search.query_batch", s.query_batch, 1), ("search.n_threads", s.n_threads, 0)):
        if value < least:
            raise ValueError(f"{field}: must be >= {least}, got {value}")
    if not t.learning_rate > 0:
        raise ValueError(f"train.learning_rate: must be > 0, got {t.learning_rate}")
    if not s.settings:
        raise ValueError("search.settings: at least one search setting is needed")
    for setting in s.settings:
        if setting.get("backend", "host") not in BACKENDS:
            raise ValueError(f"search.settings: backend must be one of {', '.join(BACKENDS)}, got "
                             f"{setting['backend']!r}")
    if "standardize" in m and not isinstance(m.standardize, bool):
        raise ValueError(f"model.standardize: must be True or False, got {m.standardize!r}")
    if not m.init_std >= 0:
        raise ValueError(f"model.init_std: must be >= 0 (0 = lecun normal), got {m.init_std}")
    widths = [w for h in m.hidden for w in (h if isinstance(h, (tuple, list)) else (h,))]  # LMI: one tuple per level
    if any(w < 1 for w in widths):
        raise ValueError(f"model.hidden: every layer width must be >= 1, got {m.hidden}")
