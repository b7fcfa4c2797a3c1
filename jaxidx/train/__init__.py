"""Shared training pieces: mesh and sharding, train state and step, checkpoints, logging, the loop."""
