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


METHODS = ("irli", "lmi", "elias")


def preset(presets: dict, arg: str | None, default: str, auto=None):
    """The preset builder named by `arg` (e.g. `configs/irli.py:glove`), with a clear error for a bad name.

    `auto:SPEC` (where the module has an `auto(data)` rule set) sizes the preset from the data set SPEC."""
    name = arg or default
    if auto is not None and (name == "auto" or name.startswith("auto:")):
        spec = name.partition(":")[2]
        if not spec:
            raise ValueError("config preset 'auto' sizes itself from the data: use jaxidx.fit(method, data) or "
                             "--config=configs/METHOD.py:auto:DATA_SPEC")
        from jaxidx.data import load
        from jaxidx.data.specs import absolute_spec
        config = auto(load(spec))
        config.data = absolute_spec(spec)  # the spec itself: a file's data set is named by its stem only
        return config
    if name not in presets:
        valid = sorted(presets) + (["auto:DATA_SPEC"] if auto is not None else [])
        raise ValueError(f"config preset {name!r} unknown; valid: {', '.join(valid)}")
    config = presets[name]()
    config.lock()
    return config


def preset_module(method: str):
    """The presets module of a method: `jaxidx.configs.<method>`, installed from the top-level `configs/`
    folder (setup.py's package_dir); from a source checkout that is not installed, `configs/<method>.py`."""
    if method not in METHODS:
        raise ValueError(f"preset: unknown method {method!r}; valid: {', '.join(METHODS)}")
    import importlib
    try:
        return importlib.import_module(f"jaxidx.configs.{method}")
    except ModuleNotFoundError as e:
        if e.name not in ("jaxidx.configs", f"jaxidx.configs.{method}"):
            raise
    import importlib.util
    import sys
    from jaxidx.data.specs import repo_root
    path = repo_root() / "configs" / f"{method}.py"
    name = f"jaxidx.configs.{method}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def get_config(name: str, data=None, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The locked config of `name` = "method" or "method:preset" (e.g. "irli:bibtex", "lmi:auto"), with
    dotted `overrides` applied. A bare method name means its `auto` preset, sized from `data` (an
    ANNData / XMCData) by the rules in `configs/<method>.py:auto`."""
    method, _, arg = name.partition(":")
    module = preset_module(method)
    if arg in ("", "auto"):
        if data is None:
            raise ValueError(f"preset {name!r}: the auto preset sizes itself from the data; pass data or name a "
                             f"preset ({method}:PRESET)")
        config = module.auto(data)
    else:
        config = module.get_config(arg)
    apply_overrides(config, overrides or {})
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
    """config['a.b.c'] = value for each dotted key (or 'a__b__c'); an unknown field is a ValueError
    naming it and the valid fields at that level (the config is locked)."""
    for dotted, value in overrides.items():
        dotted = dotted.replace("__", ".")
        *path, last = dotted.split(".")
        node = config
        for i, key in enumerate(path + [last]):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(path[:i]) or "the config"
                valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
                raise ValueError(f"config field {dotted!r}: {where} has no field {key!r}"
                                 + (f"; valid: {valid}" if valid else ""))
            if i < len(path):
                node = node[key]
        try:
            node[last] = value
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"config field {dotted!r}: {e}") from None


def pow2_near(x: float) -> int:
    """The power of two nearest to x in log scale (at least 2): bucket and cluster counts of scaling presets."""
    return max(2, 1 << round(math.log2(x)))


def probe_sweep(n_buckets: int) -> list[int]:
    """Buckets to probe for a recall sweep: 1, 2, 3, 4, 6, 8, 12, ... (each power of two and 1.5x it) up to
    all n_buckets, so the setting that first reaches a recall is within 1.5x of the least that would."""
    out = sorted({p for e in range(0, 31) for p in (1 << e, 3 << e >> 1) if 1 <= p <= n_buckets})
    return out if out[-1] == n_buckets else out + [n_buckets]


def budget_epochs(n_rows: int, batch_size: int, steps: int, multiple: int = 1) -> int:
    """Whole epochs covering at least `steps` batches of `batch_size` over `n_rows` rows, rounded up to a
    multiple of `multiple` (a fixed step budget for presets whose data grows with a scaling study)."""
    per_epoch = -(-n_rows // batch_size)
    return multiple * -(-steps // (multiple * per_epoch))
