"""Config fields every method shares; method presets in `configs/` build on `base_config()`.

Configs are data (ml-collections), locked once built so a typo in an override
fails instead of silently adding a field.
"""
from __future__ import annotations

import math

import ml_collections


def base_config(method: str, data: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = method
    c.data = data
    c.seed = 0

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 10
    c.train.batch_size = 256
    c.train.learning_rate = 1e-3
    c.train.log_every = 50
    c.train.checkpoint_every_steps = 0  # 0: at the end of each epoch only
    c.train.keep_checkpoints = 3

    c.mesh = ml_collections.ConfigDict()
    c.mesh.model_parallel = 1  # devices on the 'model' axis; the rest form 'data'

    c.search = ml_collections.ConfigDict()
    c.search.k = 10
    c.search.query_batch = 1024
    c.search.n_threads = 0  # host kernel threads; 0 = all cores
    c.search.settings = [{"m": 1}]
    return c


def preset(presets: dict, arg: str | None, default: str):
    """The preset builder named by `arg` (e.g. `configs/irli.py:glove`), with a clear error for a bad name."""
    name = arg or default
    if name not in presets:
        raise ValueError(f"config preset {name!r} unknown; valid: {', '.join(sorted(presets))}")
    config = presets[name]()
    config.lock()
    return config


def pow2_near(x: float) -> int:
    """The power of two nearest to x in log scale (at least 2): bucket and cluster counts of scaling presets."""
    return max(2, 1 << round(math.log2(x)))


def budget_epochs(n_rows: int, batch_size: int, steps: int, multiple: int = 1) -> int:
    """Whole epochs covering at least `steps` batches of `batch_size` over `n_rows` rows, rounded up to a
    multiple of `multiple` (a fixed step budget for presets whose data grows with a scaling study)."""
    per_epoch = -(-n_rows // batch_size)
    return multiple * -(-steps // (multiple * per_epoch))
