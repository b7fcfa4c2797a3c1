"""Exact search of a bucket-contiguous index on devices: static shapes, items sharded over a mesh.

`ShardedLayout` splits an index's rows over every device of a mesh: layout row i goes to shard
i mod D, so each shard holds about 1/D of every bucket and a query's work is even across devices.
Each shard keeps its own bucket-contiguous layout (offsets [B+1], vectors [n_max, d] with padded
rows never read, and the item id of each row), and is placed on its device only (a process places
only its own devices' shards, so the same code serves several hosts under `jax.distributed`).

One search block is one jitted `shard_map`: every device routes the same queries to the same
ranked buckets and decides which it visits from the global bucket sizes (so the visited set is the
host kernel's, budget included), gathers its rows of those buckets into a static [Q, capacity] slab
(capacity: the most rows one shard can visit for one query, rounded up so few shapes compile),
computes exact distances in the canonical reduction order (`device.distances`: on CPU the C++
kernel's bits), keeps its k best, and one all_gather + top-k merges the shards; the candidate count
is a psum. Results equal the host backend's on tie-free data.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxidx.search.device import _rank_key, _take_top, distances

SHARD = "shard"


def slab_floats() -> int:
    """Floats one query block may gather (its candidates' vectors): 2^24 (64 MiB) on CPU, where a block
    should stay near the caches, 2^28 (1 GiB) on an accelerator, where large blocks keep it busy."""
    return 1 << (24 if jax.default_backend() == "cpu" else 28)


def default_mesh(devices=None) -> Mesh:
    """Every device (of every process), or the given ones, as a 1-D mesh with axis 'shard'."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (SHARD,))


def replicate(mesh: Mesh, tree):
    """Host or device arrays (router parameters, queries, bucket masks) copied to every device of the mesh
    (each process places its own devices' copies)."""
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), rep, lambda i, a=np.asarray(a): a[i]), tree)


def split_rows(mesh: Mesh, tree):
    """Host arrays [D, ...] (one block per shard) placed block s on the mesh's device s."""
    split = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    return jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, split, lambda i, a=a: a[i]), tree)


def device_bytes(tree) -> int:
    """Bytes one device holds of sharded arrays (its first addressable shard of each)."""
    return sum(int(a.addressable_shards[0].data.nbytes) for a in jax.tree.leaves(tree))


def gather_by_id(axes, ids: jax.Array, *values: jax.Array) -> list[jax.Array]:
    """Inside a shard_map: every shard's ids [Q, n] and values side by side [Q, D n], columns in ascending
    id (-1, none, last), so a top-k over them puts equal values in id order whatever the shard count."""
    ids, *values = (jax.lax.all_gather(a, axes, axis=1, tiled=True) for a in (ids, *values))
    order = jnp.argsort(jnp.where(ids >= 0, ids, jnp.iinfo(jnp.int32).max), axis=1, stable=True)
    return [jnp.take_along_axis(a, order, 1) for a in (ids, *values)]


def runs_to_rows(starts: jax.Array, lens: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """The rows of each query's runs (starts, lens [Q, P]) in run order, padded to `capacity`:
    (rows [Q, capacity], valid [Q, capacity]). Rows beyond a query's total are 0 and not valid."""
    ends = jnp.cumsum(lens, axis=1)
    slot = jnp.arange(capacity, dtype=ends.dtype)
    run = jax.vmap(lambda e: jnp.searchsorted(e, slot, side="right"))(ends)
    run = jnp.minimum(run, lens.shape[1] - 1)
    valid = slot[None] < ends[:, -1:]
    row = jnp.take_along_axis(starts, run, 1) + slot[None] - jnp.take_along_axis(ends - lens, run, 1)
    return jnp.where(valid, row, 0), valid


class ShardedLayout:
    """An index's bucket-contiguous rows split over a mesh (see the module docstring).

    offsets [B+1] (bucket b's rows are offsets[b]:offsets[b+1]), vectors [N, d] float32 in that order,
    ids [N] the item id of each row (below 2^31: device ids are int32)."""

    def __init__(self, offsets: np.ndarray, vectors: np.ndarray, ids: np.ndarray, mesh: Mesh | None = None):
        self.mesh = default_mesh() if mesh is None else mesh
        self.axes = tuple(self.mesh.axis_names)
        n_shards = self.mesh.devices.size
        offsets = np.asarray(offsets, np.int64)
        sizes = np.diff(offsets)
        n, d = vectors.shape
        if len(ids) and int(np.max(ids)) >= 2**31:
            raise ValueError(f"shard: item ids must be below 2^31 on devices, the largest is {int(np.max(ids))}")
        bucket = np.repeat(np.arange(len(sizes)), sizes)
        shard_of_row = np.arange(n) % n_shards
        local_sizes = np.stack([np.bincount(bucket[shard_of_row == s], minlength=len(sizes))
                                for s in range(n_shards)])
        n_max = max(1, int(local_sizes.sum(1).max()))
        self.local_sizes = local_sizes  # [D, B], for the static capacity of a setting
        self.global_sizes = sizes
        self.n_items, self.dim = n, d
        host = {"offsets": np.zeros((n_shards, len(sizes) + 1), np.int32),
                "vectors": np.zeros((n_shards, n_max, d), np.float32),
                "ids": np.full((n_shards, n_max), -1, np.int32)}
        for s in range(n_shards):
            rows = np.flatnonzero(shard_of_row == s)
            host["offsets"][s, 1:] = np.cumsum(local_sizes[s])
            host["vectors"][s, :len(rows)] = vectors[rows]
            host["ids"][s, :len(rows)] = ids[rows]
        self.arrays = split_rows(self.mesh, host)
        self.sizes = self.replicate(sizes.astype(np.int32))

    def replicate(self, tree):
        return replicate(self.mesh, tree)

    def device_bytes(self) -> int:
        return device_bytes(self.arrays)

    def capacity(self, n_probe: int, budget: int = 0) -> int:
        """Static slab width for a setting: the most rows a shard can visit for one query (its n_probe
        largest buckets; with a budget, at most budget + the largest bucket - 1), rounded up to 256."""
        top = np.sort(self.local_sizes, axis=1)[:, ::-1][:, :n_probe].sum(1).max(initial=0)
        if budget:
            top = min(top, budget + int(self.global_sizes.max(initial=1)) - 1)
        return max(256, -(-int(top) // 256) * 256)

    def block_size(self, capacity: int, largest: int) -> int:
        """Queries per block: a power of two keeping the gathered slab under `slab_floats()`, at most `largest`."""
        fit = max(1, slab_floats() // (capacity * max(self.dim, 8)))
        return max(1, min(largest, 1 << int(math.log2(fit))))

    def search(self, route_fn, route_params, nonempty, x_route, x, *, n_probe: int, budget: int, k: int,
               metric: str, capacity: int):
        """One block of queries (host arrays, the same rows on every device): (ids [Q, k] int32, -1 = none;
        dist [Q, k]; n_candidates [Q]). route_fn(route_params, x_route) -> bucket scores [Q, B]."""
        fn = _search_fn(self.mesh, self.axes, route_fn, n_probe, budget, k, metric, capacity)
        x_route, x = self.replicate((np.asarray(x_route, np.float32), np.asarray(x, np.float32)))
        return fn(route_params, nonempty, self.sizes, self.arrays["offsets"], self.arrays["vectors"],
                  self.arrays["ids"], x_route, x)


@functools.lru_cache(maxsize=64)
def _search_fn(mesh, axes, route_fn, n_probe, budget, k, metric, capacity):
    def local(route_params, nonempty, gsizes, offsets, vectors, ids, x_route, x):
        offsets, vectors, ids = offsets[0], vectors[0], ids[0]
        score, leaves = jax.lax.top_k(jnp.where(nonempty, route_fn(route_params, x_route), -jnp.inf), n_probe)
        visit = jnp.isfinite(score)
        leaves = jnp.where(visit, leaves, 0)
        if budget:  # buckets best first while fewer than `budget` rows are gathered (globally), the first always
            glens = jnp.where(visit, gsizes[leaves], 0)
            before = jnp.cumsum(glens, axis=1) - glens
            visit &= (jnp.arange(n_probe) == 0)[None] | (before < budget)
        starts = offsets[leaves]
        lens = jnp.where(visit, offsets[leaves + 1] - starts, 0)
        rows, valid = runs_to_rows(starts, lens, capacity)
        dist = distances(x[:, None, :], vectors[rows], metric)
        top_ids, top_dist = _take_top(_rank_key(-dist, valid), k, [(ids[rows], -1), (dist, jnp.inf)])
        all_ids, all_dist = gather_by_id(axes, top_ids, top_dist)  # [Q, D * k]
        out_ids, out_dist = _take_top(_rank_key(-all_dist, all_ids >= 0), k, [(all_ids, -1), (all_dist, jnp.inf)])
        return out_ids, out_dist, jax.lax.psum(lens.sum(1), axes)

    split = P(axes)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), split, split, split, P(), P()),
                                 out_specs=(P(), P(), P()), check_vma=False))


class ShardedPartition:
    """An R-repetition partition (IRLI) split over a mesh: item row i goes to shard i mod D, at local
    row i // D, with its vector (ANN) and id; each shard keeps, per repetition, the CSR of its own rows
    (offsets [R, B+1], members [R, n_max] local rows). A search block routes the same queries on every
    device, counts each local item's hits over the R repetitions' top-m buckets (`device._accumulate`),
    applies the host's count threshold (min_count, relaxed until k items qualify, from the counts
    summed over the shards with one psum), and keeps its k best: by exact distance (ANN) or summed
    bucket probability (XMC); one all_gather + top-k merges the shards."""

    def __init__(self, offsets: np.ndarray, members: np.ndarray, ids: np.ndarray, vectors: np.ndarray | None,
                 mesh: Mesh | None = None):
        self.mesh = default_mesh() if mesh is None else mesh
        self.axes = tuple(self.mesh.axis_names)
        n_shards = self.mesh.devices.size
        offsets, members = np.asarray(offsets, np.int64), np.asarray(members)
        n_reps, n_buckets = offsets.shape[0], offsets.shape[1] - 1
        n = len(ids)
        if n and int(np.max(ids)) >= 2**31:
            raise ValueError(f"shard: item ids must be below 2^31 on devices, the largest is {int(np.max(ids))}")
        n_max = max(1, -(-n // n_shards))
        host = {"offsets": np.zeros((n_shards, n_reps, n_buckets + 1), np.int32),
                "members": np.zeros((n_shards, n_reps, n_max), np.int32),
                "ids": np.full((n_shards, n_max), -1, np.int32)}
        rows = np.arange(n)
        for s in range(n_shards):
            host["ids"][s, :len(rows[s::n_shards])] = ids[s::n_shards]
        self.max_bucket = 1
        for r in range(n_reps):
            bucket = np.repeat(np.arange(n_buckets), np.diff(offsets[r]))
            mem = members[r, :offsets[r, -1]]
            for s in range(n_shards):
                mine = mem % n_shards == s  # CSR order kept: bucket-sorted
                sizes = np.bincount(bucket[mine], minlength=n_buckets)
                host["offsets"][s, r, 1:] = np.cumsum(sizes)
                host["members"][s, r, :mine.sum()] = mem[mine] // n_shards
                self.max_bucket = max(self.max_bucket, int(sizes.max(initial=0)))
        if vectors is not None:
            host["vectors"] = np.zeros((n_shards, n_max, vectors.shape[1]), np.float32)
            for s in range(n_shards):
                host["vectors"][s, :len(rows[s::n_shards])] = vectors[s::n_shards]
        self.arrays = split_rows(self.mesh, host)
        self.n_reps = n_reps

    def replicate(self, tree):
        return replicate(self.mesh, tree)

    def device_bytes(self) -> int:
        return device_bytes(self.arrays)

    def block_size(self, m: int, width: int, largest: int) -> int:
        """Queries per block: a power of two keeping the hits [block, R m S] x `width` floats under
        `slab_floats()`, at most `largest`."""
        fit = max(1, slab_floats() // (self.n_reps * m * self.max_bucket * max(width, 1)))
        return max(1, min(largest, 1 << int(math.log2(fit))))

    def search(self, route_fn, params, x_route, x, *, m: int, min_count: int, k: int, metric: str | None):
        """One block of queries: (ids [Q, k] int32 (-1 = none), scores [Q, k], n_candidates [Q]). ANN
        (`metric` given): scores are distances of the re-ranked candidates, ascending; XMC (metric None):
        summed bucket probabilities, descending. route_fn(params, x_route, m=m) -> (bucket ids, probs) [Q, R, m]."""
        fn = _partition_fn(self.mesh, self.axes, route_fn, m, min_count, k, metric, self.max_bucket)
        x_route = self.replicate(x_route)
        if metric is None:
            return fn(params, x_route, self.arrays["offsets"], self.arrays["members"], self.arrays["ids"])
        return fn(params, x_route, self.arrays["offsets"], self.arrays["members"], self.arrays["ids"],
                  self.arrays["vectors"], self.replicate(np.asarray(x, np.float32)))


@functools.lru_cache(maxsize=64)
def _partition_fn(mesh, axes, route_fn, m, min_count, k, metric, max_bucket):
    from jaxidx.search.device import _accumulate, _zero_to_plus

    def local(params, x_route, offsets, members, ids, vectors=None, x=None):
        offsets, members, ids = offsets[0], members[0], ids[0]
        vectors = None if vectors is None else vectors[0]
        bucket_ids, probs = route_fn(params, x_route, m=m)
        item, count, score = _accumulate(bucket_ids, probs, offsets, members, None, "sum", max_bucket)
        threshold = 1
        if min_count > 1:  # the largest t <= min_count that k items reach over all shards, else 1
            reach = jax.lax.psum(jnp.stack([(count >= t).sum(1) for t in range(1, min_count + 1)], 1), axes)
            threshold = jnp.maximum(1, (reach >= k).sum(1))[:, None]
        cand = count >= threshold
        if vectors is None:  # XMC: summed probabilities, larger first
            key, value, pad = _rank_key(_zero_to_plus(score), cand), _zero_to_plus(score), -jnp.inf
        else:  # ANN: exact distances, smaller first
            value = distances(x[:, None, :], vectors[jnp.where(cand, item, 0)], metric)
            key, pad = _rank_key(-value, cand), jnp.inf
        top_ids, top_val = _take_top(key, k, [(ids[jnp.where(cand, item, 0)], -1), (value, pad)])
        all_ids, all_val = gather_by_id(axes, top_ids, top_val)
        all_key = _rank_key(all_val if vectors is None else -all_val, all_ids >= 0)  # equal values: smaller id first
        out_ids, out_val = _take_top(all_key, k, [(all_ids, -1), (all_val, pad)])
        return out_ids, out_val, jax.lax.psum(cand.sum(1, dtype=jnp.int32), axes)

    split = P(axes)
    n_split = 3 if metric is None else 4
    in_specs = (P(), P()) + (split,) * n_split + (() if metric is None else (P(),))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(P(), P(), P()), check_vma=False))
