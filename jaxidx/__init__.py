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

from jaxidx.api import fit, load  # noqa: E402
from jaxidx.index import Index  # noqa: E402

__all__ = ["fit", "load", "Index", "__version__"]
