"""The learned indexes. Each is a `Trainable` for `jaxidx.train.loop.fit` plus an index builder."""
from __future__ import annotations


def get_method(name: str):
    """Method class by config name (imported lazily so one method's deps don't load the others)."""
    if name == "irli":
        from jaxidx.methods.irli import IRLI
        return IRLI
    if name == "lmi":
        from jaxidx.methods.lmi import LMI
        return LMI
    if name == "elias":
        from jaxidx.methods.elias import ELIAS
        return ELIAS
    raise ValueError(f"method: unknown {name!r}; valid: irli, lmi, elias")
