"""Exact search of a bucket-contiguous index on devices: static shapes, items sharded over a mesh.

`ShardedLayout` splits an index's rows over every device of a mesh: layout row i goes to shard
i mod D, so each shard holds about 1/D of every bucket and a query's work is even across devices
(later adds go to the least filled shard, see `_ShardedItems`). Each shard keeps its own
bucket-contiguous layout (offsets [B+1], vectors [n_rows, d] with padded rows never read, and the
item id of each row), and is placed on its device only (a process places only its own devices'
shards, so the same code serves several hosts under `jax.distributed`).

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


class _ShardedItems:
    """Items split over the devices of a mesh, each shard's arrays on its own device.

    The shard of every item is kept by id: the first placement deals the host's rows round robin
    (row i to shard i mod D); after add / remove (`update` with the host's new arrays) items keep their
    shard, new ones all go to the least filled shard, and only the shards whose items changed are
    rebuilt and sent to their device, so an add moves one shard's bytes, not the index's. Each shard is
    allocated 1/HEADROOM more rows than it holds to take adds in place; a shard that outgrows that
    re-allocates every shard (with the same headroom again). A process builds only the shards of its
    own devices, so the same code serves several hosts under `jax.distributed`."""

    HEADROOM = 8

    def __init__(self, mesh: Mesh | None):
        self.mesh = default_mesh() if mesh is None else mesh
        self.axes = tuple(self.mesh.axis_names)
        self.n_shards = self.mesh.devices.size
        self.n_rows = 0  # rows allocated per shard
        self.arrays: dict | None = None
        self.rebuilt: set[int] = set()  # the shards the last placement sent to their devices
        self._keys = self._shard_of_key = None  # item ids, sorted, and the shard of each

    def replicate(self, tree):
        return replicate(self.mesh, tree)

    def device_bytes(self) -> int:
        return device_bytes(self.arrays)

    def _assign(self, ids: np.ndarray) -> tuple[np.ndarray, set]:
        """The shard of every host row (by its id) and the shards whose items changed since the last call."""
        ids = np.asarray(ids, np.int64)
        if len(ids) and int(ids.max()) >= 2**31:
            raise ValueError(f"shard: item ids must be below 2^31 on devices, the largest is {int(ids.max())}")
        if self._keys is None:
            shard, changed = (np.arange(len(ids)) % self.n_shards).astype(np.int32), set(range(self.n_shards))
        else:
            pos = np.minimum(np.searchsorted(self._keys, ids), max(len(self._keys) - 1, 0))
            known = self._keys[pos] == ids if len(self._keys) else np.zeros(len(ids), bool)
            shard = np.where(known, self._shard_of_key[pos] if len(self._keys) else 0, -1).astype(np.int32)
            gone = np.ones(len(self._keys), bool)
            gone[pos[known]] = False
            changed = set(np.unique(self._shard_of_key[gone]).tolist())
            if not known.all():
                target = int(np.argmin(np.bincount(shard[known], minlength=self.n_shards)))
                shard[~known] = target
                changed.add(target)
        order = np.argsort(ids, kind="stable")
        self._keys, self._shard_of_key = ids[order], shard[order]
        return shard, changed

    def _place(self, ids: np.ndarray, block) -> np.ndarray:
        """Assign the host rows (item `ids`) to shards and send the changed shards' blocks to their devices;
        block(rows, n_rows) -> {name: host array [n_rows, ...]} builds one shard from its host rows.
        Returns the shard of every host row."""
        shard, changed = self._assign(ids)
        held = int(np.bincount(shard, minlength=self.n_shards).max(initial=0))
        if self.arrays is None or held > self.n_rows:
            self.n_rows, changed = max(1, held + -(-held // self.HEADROOM)), set(range(self.n_shards))
        split = NamedSharding(self.mesh, P(self.axes))
        devices = {idx[0].start or 0: dev for dev, idx in split.addressable_devices_indices_map((self.n_shards,)).items()}
        blocks = {s: block(np.flatnonzero(shard == s), self.n_rows) for s in devices if s in changed}
        self.rebuilt = set(blocks)
        if blocks:
            old = {name: {sh.index[0].start or 0: sh.data for sh in a.addressable_shards}
                   for name, a in (self.arrays or {}).items()}
            self.arrays = {name: jax.make_array_from_single_device_arrays(
                (self.n_shards,) + a.shape, split,
                [jax.device_put(blocks[s][name][None], dev) if s in blocks else old[name][s]
                 for s, dev in devices.items()]) for name, a in next(iter(blocks.values())).items()}
        return shard


def _padded(a: np.ndarray, n_rows: int, fill=0) -> np.ndarray:
    """a [n, ...] followed by `fill` rows up to n_rows."""
    out = np.full((n_rows,) + a.shape[1:], fill, a.dtype)
    out[:len(a)] = a
    return out


class ShardedLayout(_ShardedItems):
    """An index's bucket-contiguous rows split over a mesh (see the module docstring).

    offsets [B+1] (bucket b's rows are offsets[b]:offsets[b+1]), vectors [N, d] float32 in that order,
    ids [N] the item id of each row (below 2^31: device ids are int32). Each shard keeps its rows in the
    host's order, so its own layout is bucket-contiguous too."""

    def __init__(self, offsets: np.ndarray, vectors: np.ndarray, ids: np.ndarray, mesh: Mesh | None = None):
        super().__init__(mesh)
        self.update(offsets, vectors, ids)

    def update(self, offsets: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Follow the host layout after add / remove: only the shards whose items changed are rebuilt."""
        sizes = np.diff(np.asarray(offsets, np.int64))
        n_buckets = len(sizes)
        bucket = np.repeat(np.arange(n_buckets), sizes)

        def block(rows, n_rows):
            return {"offsets": np.concatenate([[0], np.cumsum(np.bincount(bucket[rows], minlength=n_buckets))]
                                              ).astype(np.int32),
                    "vectors": _padded(np.asarray(vectors[rows], np.float32), n_rows),
                    "ids": _padded(np.asarray(ids[rows], np.int32), n_rows, -1)}

        shard = self._place(ids, block)
        # [D, B] rows of every bucket on every shard, for the static capacity of a setting
        self.local_sizes = np.bincount(shard.astype(np.int64) * n_buckets + bucket,
                                       minlength=self.n_shards * n_buckets).reshape(self.n_shards, n_buckets)
        self.global_sizes = sizes
        self.n_items, self.dim = vectors.shape
        self.sizes = self.replicate(sizes.astype(np.int32))

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


class ShardedPartition(_ShardedItems):
    """An R-repetition partition (IRLI) split over a mesh: each shard holds its items' ids, vectors (ANN)
    and, per repetition, the CSR of its own rows (offsets [R, B+1], members [R, n_rows] local rows). A
    search block routes the same queries on every device, counts each local item's hits over the R
    repetitions' top-m buckets (`device._accumulate`), applies the host's count threshold (min_count,
    relaxed until k items qualify, from the counts summed over the shards with one psum), and keeps its
    k best: by exact distance (ANN) or summed bucket probability (XMC); one all_gather + top-k merges
    the shards."""

    def __init__(self, row_buckets: np.ndarray, n_buckets: int, ids: np.ndarray, vectors: np.ndarray | None,
                 mesh: Mesh | None = None):
        super().__init__(mesh)
        self.n_reps, self.n_buckets = row_buckets.shape[0], n_buckets
        self.update(row_buckets, ids, vectors)

    def update(self, row_buckets: np.ndarray, ids: np.ndarray, vectors: np.ndarray | None) -> None:
        """Follow the host partition (row_buckets [R, N]: the bucket of every row in every repetition)
        after add / remove: only the shards whose items changed are rebuilt."""
        R, B = self.n_reps, self.n_buckets

        def block(rows, n_rows):
            out = {"offsets": np.zeros((R, B + 1), np.int32), "members": np.zeros((R, n_rows), np.int32),
                   "ids": _padded(np.asarray(ids[rows], np.int32), n_rows, -1)}
            for r in range(R):  # local rows bucket by bucket, in row order within a bucket (as on the host)
                b = row_buckets[r, rows]
                out["offsets"][r, 1:] = np.cumsum(np.bincount(b, minlength=B))
                out["members"][r, :len(rows)] = np.argsort(b, kind="stable")
            if vectors is not None:
                out["vectors"] = _padded(np.asarray(vectors[rows], np.float32), n_rows)
            return out

        shard = self._place(ids, block)
        self.max_bucket = max([1] + [int(np.bincount(shard.astype(np.int64) * B + row_buckets[r]).max(initial=0))
                                     for r in range(R)])

    def block_size(self, m: int, reps: int, width: int, largest: int) -> int:
        """Queries per block: a power of two keeping the hits [block, reps m S] x `width` floats under
        `slab_floats()`, at most `largest`."""
        fit = max(1, slab_floats() // (reps * m * self.max_bucket * max(width, 1)))
        return max(1, min(largest, 1 << int(math.log2(fit))))

    def search(self, route_fn, params, x_route, x, *, m: int, reps: int, min_count: int, k: int,
               metric: str | None):
        """One block of queries: (ids [Q, k] int32 (-1 = none), scores [Q, k], n_candidates [Q]). ANN
        (`metric` given): scores are distances of the re-ranked candidates, ascending; XMC (metric None):
        summed bucket probabilities, descending. route_fn(params, x_route, m=m) -> (bucket ids, probs)
        [Q, reps, m] of the first `reps` repetitions, whose partitions are searched."""
        fn = _partition_fn(self.mesh, self.axes, route_fn, m, reps, min_count, k, metric, self.max_bucket)
        x_route = self.replicate(x_route)
        if metric is None:
            return fn(params, x_route, self.arrays["offsets"], self.arrays["members"], self.arrays["ids"])
        return fn(params, x_route, self.arrays["offsets"], self.arrays["members"], self.arrays["ids"],
                  self.arrays["vectors"], self.replicate(np.asarray(x, np.float32)))


@functools.lru_cache(maxsize=64)
def _partition_fn(mesh, axes, route_fn, m, reps, min_count, k, metric, max_bucket):
    from jaxidx.search.device import _accumulate, _zero_to_plus

    def local(params, x_route, offsets, members, ids, vectors=None, x=None):
        offsets, members, ids = offsets[0, :reps], members[0, :reps], ids[0]
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
