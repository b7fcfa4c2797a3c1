"""jaxidx: learned indexes (IRLI, LMI, ELIAS) in JAX.

One architecture serves all three methods: a router (x -> bucket logits
[batch, R, B]), a partition (items per bucket, CSR per repetition) and a
scorer. Search is always route -> top-m buckets -> gather -> score -> top-k.

    index = jaxidx.fit("lmi", vectors, metric="angular")   # or "irli:bibtex", (X, Y), a data spec
    ids, dist = index.search(queries, k=10, n_probe=16)
    index.save("my.index"); index = jaxidx.load("my.index")  # or a training run directory
    new_ids = index.add(more_vectors); index.remove(new_ids[:5])
"""
__version__ = "0.2.0"

__all__ = ["fit", "load", "Index", "__version__"]


def __getattr__(name):
    """`fit`, `load` and `Index` are imported on first use, so `import jaxidx.bench` (which pins threads
    before JAX and BLAS start) stays light."""
    if name in ("fit", "load"):
        from jaxidx import api
        return getattr(api, name)
    if name == "Index":
        from jaxidx.index import Index
        return Index
    raise AttributeError(f"module 'jaxidx' has no attribute {name!r}")
