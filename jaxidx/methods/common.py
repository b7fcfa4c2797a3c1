"""Pieces every method's search and config share."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class SearchResult:
    """Ranked item ids [Q, k] (-1 = none), candidates scored per query [Q], distances for ANN."""

    ids: np.ndarray
    n_candidates: np.ndarray
    dist: Optional[np.ndarray] = None


def route_topm(apply: Callable, params, x, *, m: int, kind: str):
    """Router logits [b, R, B] -> top-m bucket ids and probabilities per repetition, [b, R, m] each.

    Probabilities are sigmoids for a BCE-trained router and softmaxes over B for
    a softmax-trained one, so scores are comparable across repetitions.
    """
    _, logits = apply(params, x)
    probs = jax.nn.sigmoid(logits) if kind == "bce" else jax.nn.softmax(logits, axis=-1)
    scores, ids = jax.lax.top_k(probs, m)
    return ids.astype(jnp.int32), scores


def validate_common(config) -> None:
    """Checks every method's config shares; each error names the field and the reason."""
    t = config.train
    if t.epochs < 0:
        raise ValueError(f"train.epochs: must be >= 0, got {t.epochs}")
    if t.batch_size <= 0:
        raise ValueError(f"train.batch_size: must be > 0, got {t.batch_size}")
    if not t.learning_rate > 0:
        raise ValueError(f"train.learning_rate: must be > 0, got {t.learning_rate}")
    if config.search.k <= 0:
        raise ValueError(f"search.k: must be > 0, got {config.search.k}")
    if config.search.query_batch <= 0:
        raise ValueError(f"search.query_batch: must be > 0, got {config.search.query_batch}")
    if not config.search.settings:
        raise ValueError("search.settings: at least one search setting is needed")
