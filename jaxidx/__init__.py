"""jaxidx: learned indexes (IRLI, LMI, ELIAS) in JAX.

One architecture serves all three methods: a router (x -> bucket logits
[batch, R, B]), a partition (items per bucket, CSR per repetition) and a
scorer. Search is always route -> top-m buckets -> gather -> score -> top-k.
"""
__version__ = "0.1.0"
