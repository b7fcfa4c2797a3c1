"""The searchable ELIAS index: encoder -> top-b clusters -> `merge_topk(agg="max")` over the adjacency
as a soft partition with R = 1 (the K best paths) -> label classifiers on that shortlist -> top k.
The host (C++) and device (JAX) merge give identical results."""
from __future__ import annotations

from functools import partial

import jax
import numpy as np

from jaxidx import search as kernels
from jaxidx.index import Index, is_int, query_blocks, sparse_rows
from jaxidx.methods.common import SearchResult, check_tokens
from jaxidx.methods.elias.graph import soft_partition
from jaxidx.methods.elias.maths import encoder_input, log_edge_weights, make_encoder, rank_shortlist, route_clusters

class ELIASIndex(Index):
    """A trained ELIAS model and its adjacency as a soft one-repetition partition.

    arrays: `offsets` [1, C+1], `members` [1, M] (label ids) and `weights` [1, M] (edge weights a_cl).
    info: n_features, n_items (labels), n_clusters, and for text input vocab_size and token_len.
    """

    method, task = "elias", "xmc"
    setting_keys = ("beam", "shortlist")

    def __init__(self, config, params, arrays, info):
        super().__init__(config, params, arrays, info)
        self.encoder = make_encoder(self.config, int(self.info["n_features"]), int(self.info.get("vocab_size", 0)),
                                    int(self.info.get("token_len", 0)))
        self.n_clusters = int(self.info["n_clusters"])
        self._route = jax.jit(partial(route_clusters, self.encoder, self.config.model.alpha), static_argnames="beam")
        self._rank = jax.jit(rank_shortlist, static_argnames="k")
        self._max_bucket = kernels.device.max_bucket_size_of(self.arrays["offsets"])
        self.params = jax.device_put(self.params)

    @classmethod
    def from_training(cls, config, params, aux, info: dict) -> "ELIASIndex":
        """The index of a stage's params and aux (`members` [C, width]): edge weights from the edge logits."""
        members = np.asarray(aux["members"])
        weights = np.exp(np.asarray(log_edge_weights(params.get("edges"), members, config.model.beta), np.float32))
        part = soft_partition(members, weights)
        arrays = {"offsets": part.offsets, "members": part.members, "weights": part.weights}
        return cls(config, params, arrays, dict(info, n_clusters=members.shape[0]))

    def default_setting(self) -> dict:
        m = self.config.model
        return {"beam": m.beam, "shortlist": m.shortlist, **super().default_setting()}

    def _check_setting(self, setting: dict) -> None:
        for key in ("beam", "shortlist"):
            v = setting.get(key, 1)
            if not is_int(v) or v < 1:
                raise ValueError(f"search: {key}={v!r} must be an integer >= 1")

    def _prepare(self, queries):
        """CSR / dense features, or padded sparse rows (with 'tokens' for a text encoder), checked."""
        x = sparse_rows(queries, self.dim)
        if self.config.model.input == "text":
            check_tokens(x.get("tokens"), int(self.info["vocab_size"]), int(self.info["token_len"]))
        return x

    def _query_device(self, queries, setting: dict, k: int) -> SearchResult:
        """The host path with the merge on the device too (`search.device.merge_topk`): encoder, beam,
        merge and label ranking all run as jitted JAX, one device."""
        return self._query(queries, setting, k, device=True)

    def _query(self, queries, setting: dict, k: int, device: bool = False) -> SearchResult:
        cfg = self.config
        beam = min(setting.get("beam", cfg.model.beam), self.n_clusters)
        K = setting.get("shortlist", cfg.model.shortlist)
        offsets, members, weights = self.arrays["offsets"], self.arrays["members"], self.arrays["weights"]
        out_ids, out_scores, out_cand = [], [], []
        for batch, n in query_blocks(queries, cfg.search.query_batch):
            x = encoder_input(cfg.model.input, batch, self.dim)
            phi, cids, cscores = self._route(self.params, x, beam=beam)
            if device:
                ids, paths, _, n_cand = kernels.device.merge_topk(
                    cids[:, None, :], cscores[:, None, :], offsets, members, weights, K, 1, "max",
                    max_bucket_size=self._max_bucket)
            else:
                ids, paths, _, n_cand = kernels.host.merge_topk(
                    np.asarray(cids)[:, None, :], np.asarray(cscores)[:, None, :], offsets, members, weights, K, 1,
                    "max", len(self), cfg.search.n_threads)
            top, score = self._rank(self.params, phi, ids, paths, k=min(k, K))
            top, score = np.asarray(top)[:n], np.asarray(score)[:n]
            if k > K:
                pad = ((0, 0), (0, k - K))
                top, score = np.pad(top, pad, constant_values=-1), np.pad(score, pad, constant_values=-np.inf)
            out_ids.append(top)
            out_scores.append(score)
            out_cand.append(np.asarray(n_cand)[:n])
        return SearchResult(ids=np.concatenate(out_ids).astype(np.int32), scores=np.concatenate(out_scores),
                            n_candidates=np.concatenate(out_cand))
