"""The searchable ELIAS index: encoder -> top-b clusters -> `merge_topk(agg="max")` over the adjacency
as a soft partition with R = 1 (the K best paths) -> label classifiers on that shortlist -> top k.
With a two-level cluster tree the top-b clusters come from a beam over the top groups (`tree_beam`).
backend="device" runs all of it as one jitted function over the label shards of `shard(mesh)`; it
gives the host's results."""
from __future__ import annotations

import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxidx import search as kernels
from jaxidx.index import Index, is_int, query_blocks, sparse_rows
from jaxidx.methods.common import SearchResult, check_tokens
from jaxidx.methods.elias import ranker
from jaxidx.methods.elias.graph import soft_partition
from jaxidx.methods.elias.maths import (encoder_input, label_logits, log_edge_weights, make_encoder, rank_shortlist,
                                       route_clusters, route_groups)
from jaxidx.search.sharded import default_mesh, device_bytes, gather_by_id, replicate, split_rows

class ELIASIndex(Index):
    """A trained ELIAS model and its adjacency as a soft one-repetition partition.

    arrays: `offsets` [1, C+1], `members` [1, M] (label ids) and `weights` [1, M] (edge weights a_cl); with
    the sparse ranker (ELIAS++, `ranker`) also `ranker_offsets` [L+1], `ranker_feats` [S], `ranker_w` [S]
    and `ranker_b` [L] (its pruned per-label weights over the input features).
    info: n_features, n_items (labels), n_clusters, and for text input vocab_size and token_len.
    Settings: beam, shortlist, with a cluster tree (params 'groups') `group_beam` (first-level groups
    opened per query, default min(beam, groups)), and with a ranker `rerank` (ELIAS's top labels
    re-scored) and `ranker_weight` (the ranker's share a of the mixed log score; 0: ELIAS alone).
    """

    method, task = "elias", "xmc"
    setting_keys = ("beam", "shortlist", "group_beam", "rerank", "ranker_weight")

    def __init__(self, config, params, arrays, info):
        super().__init__(config, params, arrays, info)
        self.encoder = make_encoder(self.config, int(self.info["n_features"]), int(self.info.get("vocab_size", 0)),
                                    int(self.info.get("token_len", 0)))
        self.n_clusters = int(self.info["n_clusters"])
        self.n_groups = int(self.params["groups"]["bias"].shape[0]) if "groups" in self.params else 0
        self._route = jax.jit(partial(route_clusters, self.encoder, self.config.model.alpha),
                              static_argnames=("beam", "group_beam"))
        if self.n_groups:  # the tree's second level runs in `tree_beam` on rows [C, d] of the cluster classifier
            self._route_groups = jax.jit(partial(route_groups, self.encoder), static_argnames="group_beam")
            clusters = self.params["clusters"]
            self._leaf_rows = np.ascontiguousarray(np.asarray(clusters["kernel"], np.float32).T)
            self._leaf_bias = np.ascontiguousarray(np.asarray(clusters["bias"], np.float32))
        self._rank = jax.jit(rank_shortlist, static_argnames="k")
        self.params = jax.device_put(self.params)
        self.has_ranker = "ranker_w" in self.arrays
        if self.has_ranker:
            self._ranker = jax.device_put(tuple(self.arrays[f"ranker_{k}"] for k in ("offsets", "feats", "w", "b")))
            self._mix = jax.jit(partial(ranker.mix, steps=ranker.search_steps(self.arrays["ranker_offsets"])),
                                static_argnames="k")

    @classmethod
    def from_training(cls, config, params, aux, info: dict) -> "ELIASIndex":
        """The index of a stage's params and aux (`members` [C, width]): edge weights from the edge logits."""
        members = np.asarray(aux["members"])
        weights = np.exp(np.asarray(log_edge_weights(params.get("edges"), members, config.model.beta), np.float32))
        part = soft_partition(members, weights)
        arrays = {"offsets": part.offsets, "members": part.members, "weights": part.weights}
        params = dict(params)
        if "ranker" in params:  # stage 3: the ranker's weights pruned into a CSR by label
            r = params.pop("ranker")
            arrays["ranker_offsets"], arrays["ranker_feats"], arrays["ranker_w"] = ranker.prune(
                np.asarray(aux["ranker_offsets"]), np.asarray(aux["ranker_feats"]), np.asarray(r["w"]),
                config.ranker.prune)
            arrays["ranker_b"] = np.asarray(r["b"], np.float32)
        return cls(config, params, arrays, dict(info, n_clusters=members.shape[0]))

    def default_setting(self) -> dict:
        m = self.config.model
        extra = ({"rerank": self.config.ranker.rerank, "ranker_weight": self.config.ranker.weight}
                 if self.has_ranker else {})
        return {"beam": m.beam, "shortlist": m.shortlist, **extra, **super().default_setting()}

    def _check_setting(self, setting: dict) -> None:
        for key in ("beam", "shortlist", "group_beam", "rerank"):
            v = setting.get(key, 1)
            if not is_int(v) or v < 1:
                raise ValueError(f"search: {key}={v!r} must be an integer >= 1")
        if "group_beam" in setting and not self.n_groups:
            raise ValueError("search: group_beam needs an index with a cluster tree (config model.cluster_groups > 0)")
        a = setting.get("ranker_weight", 0.0)
        if isinstance(a, bool) or not isinstance(a, (int, float, np.number)) or not 0 <= a <= 1:
            raise ValueError(f"search: ranker_weight={a!r} must be a number in [0, 1]")
        if not self.has_ranker and ("rerank" in setting or a):
            raise ValueError("search: rerank and ranker_weight need an index trained with the sparse ranker "
                             "(config ranker.steps > 0)")

    def _reranked(self, setting: dict, k: int, K: int) -> tuple[int, float]:
        """(labels to take from ELIAS's ranking, the ranker's weight in their final score; 0: not used)."""
        a = float(setting.get("ranker_weight", self.config.ranker.weight if self.has_ranker else 0.0))
        if a == 0:
            return min(k, K), 0.0
        return min(max(k, setting.get("rerank", self.config.ranker.rerank)), K), a

    def _beams(self, setting: dict) -> tuple[int, int]:
        """(clusters kept per query, tree groups opened per query; 0 without a tree). A tree's beam is at
        most the clusters below its opened groups."""
        beam = min(setting.get("beam", self.config.model.beam), self.n_clusters)
        if not self.n_groups:
            return beam, 0
        group_beam = min(setting.get("group_beam", beam), self.n_groups)
        return min(beam, group_beam * (self.n_clusters // self.n_groups)), group_beam

    def _finish(self, x, top, score, k: int, weight: float):
        """ELIAS's top labels, re-scored with the ranker at `weight` > 0: (ids, scores) [Q, <= k]."""
        if weight == 0:
            return np.asarray(top), np.asarray(score)
        # Host copies in: the shortlist of a sharded search lives on the mesh, the ranker on the default device.
        ids, scores = self._mix(*self._ranker, x["idx"], x["val"], np.asarray(top), np.asarray(score), weight,
                                k=min(k, top.shape[1]))
        return np.asarray(ids), np.asarray(scores)

    def _prepare(self, queries):
        """CSR / dense features, or padded sparse rows (with 'tokens' for a text encoder), checked."""
        x = sparse_rows(queries, self.dim)
        if self.config.model.input == "text":
            check_tokens(x.get("tokens"), int(self.info["vocab_size"]), int(self.info["token_len"]))
        return x

    def shard(self, mesh=None) -> "ELIASIndex":
        """Split the labels over the devices of `mesh` (label l on shard l mod D): each device holds its
        labels' edges of the adjacency and their classifier rows; encoder and cluster classifier are
        replicated. A search block encodes and beams on every device, merges its own labels' paths into
        a local shortlist, scores it with its classifier rows, and one all_gather picks the global
        shortlist (the K best paths) and the top k in it: the host's results on tie-free data."""
        self._sharded = ShardedLabels(self.arrays["offsets"][0], self.arrays["members"][0], self.arrays["weights"][0],
                                     self.params, self.n_clusters, mesh)
        return self

    def _query_device(self, queries, setting: dict, k: int) -> SearchResult:
        """Encoder, beam, merge and label ranking as one jitted function per query block over the label
        shards of `shard(mesh)` (default: the first device)."""
        if self._sharded is None:
            self.shard(default_mesh(jax.devices()[:1]))
        cfg, sh = self.config, self._sharded
        beam, group_beam = self._beams(setting)
        K = setting.get("shortlist", cfg.model.shortlist)
        R, weight = self._reranked(setting, k, K)
        out_ids, out_scores, out_cand = [], [], []
        for batch, n in query_blocks(queries, cfg.search.query_batch):
            x = encoder_input(cfg.model.input, batch, self.dim)
            top, score, n_cand = sh.search(self.encoder, cfg.model.alpha, x, beam=beam, group_beam=group_beam,
                                           shortlist=K, k=R)
            top, score = self._finish(batch, top, score, k, weight)
            out_ids.append(np.asarray(top)[:n])
            out_scores.append(np.asarray(score)[:n])
            out_cand.append(np.asarray(n_cand)[:n])
        return _padded(np.concatenate(out_ids), np.concatenate(out_scores), np.concatenate(out_cand), k)

    def _query(self, queries, setting: dict, k: int) -> SearchResult:
        cfg = self.config
        beam, group_beam = self._beams(setting)
        K = setting.get("shortlist", cfg.model.shortlist)
        offsets, members, weights = self.arrays["offsets"], self.arrays["members"], self.arrays["weights"]
        R, weight = self._reranked(setting, k, K)
        out_ids, out_scores, out_cand = [], [], []
        for batch, n in query_blocks(queries, cfg.search.query_batch):
            x = encoder_input(cfg.model.input, batch, self.dim)
            phi, cids, cscores = self._route_tree(x, beam, group_beam) if group_beam else self._route(
                self.params, x, beam=beam)
            ids, paths, _, n_cand = kernels.host.merge_topk(
                np.asarray(cids)[:, None, :], np.asarray(cscores)[:, None, :], offsets, members, weights, K, 1,
                "max", len(self), cfg.search.n_threads)
            top, score = self._rank(self.params, phi, ids, paths, k=R)
            top, score = self._finish(batch, top, score, k, weight)
            out_ids.append(np.asarray(top)[:n])
            out_scores.append(np.asarray(score)[:n])
            out_cand.append(np.asarray(n_cand)[:n])
        return _padded(np.concatenate(out_ids), np.concatenate(out_scores), np.concatenate(out_cand), k)

    def _route_tree(self, x, beam: int, group_beam: int):
        """A tree's host route: the top groups in JAX, then `tree_beam` over their clusters' rows (what
        `route_clusters` gives from every cluster's score, reading only the opened groups' rows)."""
        phi, gids, glogp = self._route_groups(self.params, x, group_beam=group_beam)
        cids, clogp = kernels.host.tree_beam(np.asarray(phi), np.asarray(gids), np.asarray(glogp), self._leaf_rows,
                                             self._leaf_bias, self.n_groups, beam, self.config.search.n_threads)
        return phi, cids, np.exp(np.minimum(0.0, np.float32(math.log(self.config.model.alpha)) + clogp))


def _padded(ids, scores, n_cand, k: int) -> SearchResult:
    """Results of a shortlist shorter than k padded with -1 / -inf to k columns."""
    if k > ids.shape[1]:
        pad = ((0, 0), (0, k - ids.shape[1]))
        ids, scores = np.pad(ids, pad, constant_values=-1), np.pad(scores, pad, constant_values=-np.inf)
    return SearchResult(ids=ids.astype(np.int32), scores=scores, n_candidates=n_cand)


class ShardedLabels:
    """ELIAS's labels split over a mesh (see `ELIASIndex.shard`): per shard the adjacency CSR of its labels
    (offsets [C+1], members = local label rows, weights) and the classifier rows of its labels."""

    def __init__(self, offsets, members, weights, params, n_clusters: int, mesh=None):
        self.mesh = default_mesh() if mesh is None else mesh
        self.axes = tuple(self.mesh.axis_names)
        D = self.mesh.devices.size
        cluster = np.repeat(np.arange(n_clusters), np.diff(offsets))
        members, weights = np.asarray(members[:offsets[-1]]), np.asarray(weights[:offsets[-1]])
        per_shard = [members % D == s for s in range(D)]
        m_max = max(1, max(int(p.sum()) for p in per_shard))
        host = {"offsets": np.zeros((D, 1, n_clusters + 1), np.int32), "members": np.zeros((D, 1, m_max), np.int32),
                "weights": np.zeros((D, 1, m_max), np.float32)}
        self.max_bucket = 1
        for s, mine in enumerate(per_shard):
            sizes = np.bincount(cluster[mine], minlength=n_clusters)
            host["offsets"][s, 0, 1:] = np.cumsum(sizes)
            host["members"][s, 0, :mine.sum()] = members[mine] // D
            host["weights"][s, 0, :mine.sum()] = weights[mine]
            self.max_bucket = max(self.max_bucket, int(sizes.max(initial=0)))

        def rows(a):  # classifier rows l = j * D + s of shard s, zero-padded
            a = np.asarray(a)
            per = -(-a.shape[0] // D)
            out = np.zeros((D, per) + a.shape[1:], a.dtype)
            for s in range(D):
                out[s, :len(a[s::D])] = a[s::D]
            return out

        self.arrays = split_rows(self.mesh, host)
        self.labels = split_rows(self.mesh, jax.tree.map(rows, params["labels"]))
        self.rest = replicate(self.mesh, {k: v for k, v in params.items() if k != "labels"})

    def device_bytes(self) -> int:
        """Bytes of the adjacency and the label classifier on each device."""
        return device_bytes((self.arrays, self.labels))

    def search(self, encoder, alpha: float, x, *, beam: int, group_beam: int, shortlist: int, k: int):
        """One block of queries: (label ids [Q, k] (-1 = none), scores [Q, k], labels hit [Q])."""
        fn = _labels_fn(self.mesh, self.axes, encoder, alpha, beam, group_beam, shortlist, k, self.max_bucket)
        return fn(self.rest, self.labels, self.arrays["offsets"], self.arrays["members"], self.arrays["weights"],
                  replicate(self.mesh, x))


@functools.lru_cache(maxsize=32)
def _labels_fn(mesh, axes, encoder, alpha, beam, group_beam, K, k, max_bucket):
    from jaxidx.search.device import _merge_topk, _rank_key, _take_top
    D = mesh.devices.size

    def local(rest, labels, offsets, members, weights, x):
        labels = jax.tree.map(lambda a: a[0], labels)
        phi, cids, cscores = route_clusters(encoder, alpha, rest, x, beam, group_beam)
        ids, paths, _, n_cand = _merge_topk(cids[:, None, :], cscores[:, None, :], offsets[0], members[0], weights[0],
                                            k=K, min_count=1, agg="max", max_bucket_size=max_bucket)
        final = jnp.where(ids >= 0, paths * jax.nn.sigmoid(label_logits(labels, phi, ids, dense=False)), -jnp.inf)
        gid = jnp.where(ids >= 0, ids * D + jax.lax.axis_index(axes), -1)
        gid, paths, final = gather_by_id(axes, gid, paths, final)
        # The global shortlist: the K best paths (equal paths: smaller id first), in path order as on the host.
        sid, sfinal = _take_top(_rank_key(paths, gid >= 0), K, [(gid, -1), (final, -jnp.inf)])
        top, pos = jax.lax.top_k(sfinal, k)
        return jnp.where(top > -jnp.inf, jnp.take_along_axis(sid, pos, 1), -1), top, jax.lax.psum(n_cand, axes)

    split = P(axes)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), split, split, split, split, P()),
                                 out_specs=(P(), P(), P()), check_vma=False))
