"""Hard partitions of items into buckets, per repetition, and their CSR layout.

A partition is `assign [R, N]` (bucket of each item in each repetition); search
reads its CSR form: `offsets [R, B+1]`, `members [R, N]` int32 (items of bucket
b in repetition r are `members[r, offsets[r, b]:offsets[r, b+1]]`, ascending id).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

_C1, _C2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def murmurhash3_32(keys, seed: int) -> np.ndarray:
    """MurmurHash3_x86_32 of each int32 key (4 bytes, little endian), as signed int32.

    Bit-exact with `sklearn.utils.murmurhash3_32(int(key), seed)`; vectorised.
    """
    with np.errstate(over="ignore"):
        k = np.asarray(keys, dtype=np.int64).astype(np.int32).view(np.uint32)
        k = _rotl(k * _C1, 15) * _C2
        h = np.uint32(seed & 0xFFFFFFFF) ^ k
        h = _rotl(h, 13) * np.uint32(5) + np.uint32(0xE6546B64)
        h = h ^ np.uint32(4)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h.view(np.int32)


def hash_assignment(n_items: int, n_reps: int, n_buckets: int) -> np.ndarray:
    """IRLI's initial partition: bucket of item l in repetition r = murmur3(l, seed=r) mod B."""
    ids = np.arange(n_items, dtype=np.int64)
    return np.stack([np.mod(murmurhash3_32(ids, r).astype(np.int64), n_buckets) for r in range(n_reps)]
                    ).astype(np.int32)


@dataclasses.dataclass
class Partition:
    """CSR per repetition; `weights` only for soft (weighted-edge) partitions."""

    offsets: np.ndarray  # int32 [R, B+1]
    members: np.ndarray  # int32 [R, M]
    weights: Optional[np.ndarray] = None  # float32 [R, M]

    @property
    def n_reps(self) -> int:
        return self.offsets.shape[0]

    @property
    def n_buckets(self) -> int:
        return self.offsets.shape[1] - 1

    def sizes(self) -> np.ndarray:
        """Items per bucket [R, B]."""
        return np.diff(self.offsets, axis=1)

    def max_bucket_size(self) -> int:
        return int(self.sizes().max(initial=0))

    @classmethod
    def from_assignment(cls, assign: np.ndarray, n_buckets: int) -> "Partition":
        """CSR of a hard assignment [R, N]; members of a bucket in ascending item id."""
        assign = np.asarray(assign)
        if assign.ndim != 2:
            raise ValueError(f"assign: expected [R, N], got shape {assign.shape}")
        if assign.size and (assign.min() < 0 or assign.max() >= n_buckets):
            raise ValueError(f"assign: bucket ids must lie in [0, {n_buckets})")
        R, _ = assign.shape
        offsets = np.zeros((R, n_buckets + 1), np.int32)
        members = np.empty(assign.shape, np.int32)
        for r in range(R):
            offsets[r, 1:] = np.cumsum(np.bincount(assign[r], minlength=n_buckets))
            members[r] = np.argsort(assign[r], kind="stable")
        return cls(offsets=offsets, members=members)


def bucket_stats(sizes: np.ndarray) -> dict:
    """Load statistics of bucket sizes [R, B] (logged after each re-partition)."""
    sizes = np.asarray(sizes, np.float64)
    mean = sizes.mean()
    return {"max": float(sizes.max()), "mean": float(mean), "std": float(sizes.std()),
            "max_over_mean": float(sizes.max() / max(mean, 1e-12)),
            "empty_fraction": float((sizes == 0).mean())}
