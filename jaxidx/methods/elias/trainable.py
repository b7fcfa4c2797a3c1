"""ELIAS training: the config checks, the method (data, encoder, clusters) and one `Trainable` per stage."""
from __future__ import annotations

import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxidx import clustering
from jaxidx.data.types import XMCData
from jaxidx.index import query_blocks
from jaxidx.methods.common import validate_common
from jaxidx.methods.elias import ranker
from jaxidx.methods.elias.graph import approximate_adjacency, home_clusters
from jaxidx.methods.elias.index import ELIASIndex
from jaxidx.methods.elias.maths import (
    NEG, best_paths, cluster_beam, cluster_log_probs, dense_best_paths, elias_loss, encode, encoder_input, expand_paths,
    is_positive, label_logits, log_cluster_scores, log_edge_weights, lookup, make_encoder, multi_hot, route_clusters,
    shortlist, top_k_mask)
from jaxidx.train import batches as B_
from jaxidx.train import mesh as mesh_lib
from jaxidx.train import sparse_rows

log = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "stage3")  # fixed clustering | learned edges | the sparse ranker (ranker.steps > 0)
INPUTS = ("sparse", "dense", "text")  # embedding bag over features | densified features | transformer over tokens
LABEL_OPTIMIZERS = ("auto", "dense", "lazy")  # AdamW over all label rows | over the step's shortlisted rows only


def warmup_linear(peak: float, total_steps: int, warmup: float):
    """0 -> peak over the first `warmup` fraction of steps, then linearly to 0 at total_steps."""
    n_warm = max(1, int(warmup * total_steps))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, n_warm),
                                 optax.linear_schedule(peak, 0.0, max(1, total_steps - n_warm))], [n_warm])


# --- config ------------------------------------------------------------------------------------------

def validate_config(config, n_labels: int) -> None:
    m, t = config.model, config.train
    validate_common(config)
    for name in ("max_leaf", "beam", "kappa", "shortlist", "label_multiple"):
        if m[name] < 1:
            raise ValueError(f"model.{name}: must be >= 1, got {m[name]}")
    if m.teacher_extra < 0:
        raise ValueError(f"model.teacher_extra: must be >= 0, got {m.teacher_extra}")
    for name, value in (("model.alpha", m.alpha), ("model.beta", m.beta), ("train.encoder_learning_rate",
                        t.encoder_learning_rate)):
        if not value > 0:
            raise ValueError(f"{name}: must be > 0, got {value}")
    for name, value in (("model.lam", m.lam), ("train.weight_decay", t.weight_decay),
                        ("train.stage2_epochs", t.stage2_epochs)):
        if not value >= 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")
    if not 0 <= m.dropout < 1:
        raise ValueError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.input not in INPUTS:
        raise ValueError(f"model.input: must be one of {', '.join(INPUTS)}, got {m.input!r}")
    if m.layout not in ("dense", "sparse"):
        raise ValueError(f"model.layout: must be 'dense' or 'sparse', got {m.layout!r}")
    choice = label_optimizer(config)
    if choice not in LABEL_OPTIMIZERS:
        raise ValueError(f"train.label_optimizer: must be one of {', '.join(LABEL_OPTIMIZERS)}, got {choice!r}")
    if choice == "lazy" and m.layout != "sparse":
        raise ValueError("train.label_optimizer: 'lazy' needs model.layout 'sparse' (the dense layout scores "
                         "every label in every step, so every label row has a gradient)")
    C = clustering.n_leaves_for(n_labels, m.max_leaf)
    if C > n_labels:
        raise ValueError(f"model.max_leaf: {m.max_leaf} gives more clusters than the {n_labels} labels")
    G = cluster_groups(config)
    if G and not (G >= 2 and G & (G - 1) == 0 and 2 * G <= C):
        raise ValueError(f"model.cluster_groups: must be 0 (one flat cluster classifier) or a power of two in "
                         f"[2, C / 2] with C = {C} clusters ({n_labels} labels, max_leaf {m.max_leaf}), got {G}")
    if not 0 <= t.warmup < 1:
        raise ValueError(f"train.warmup: must be in [0, 1), got {t.warmup}")
    for s in config.search.settings:
        if s.get("beam", 1) < 1 or s.get("shortlist", 1) < 1:
            raise ValueError(f"search.settings: beam and shortlist must be >= 1, got {s}")
    if "ranker" in config:
        r = config.ranker
        for name in ("rerank", "negatives"):
            if r[name] < 1:
                raise ValueError(f"ranker.{name}: must be >= 1, got {r[name]}")
        for name in ("steps", "prune"):
            if not r[name] >= 0:
                raise ValueError(f"ranker.{name}: must be >= 0, got {r[name]}")
        for name in ("c", "learning_rate"):
            if not r[name] > 0:
                raise ValueError(f"ranker.{name}: must be > 0, got {r[name]}")
        if not 0 <= r.weight <= 1:
            raise ValueError(f"ranker.weight: must be in [0, 1], got {r.weight}")


def ranker_steps(config) -> int:
    """Steps of the sparse ranker's stage (0 for runs saved before it existed)."""
    return int(config.ranker.steps) if "ranker" in config else 0


def cluster_groups(config) -> int:
    """`model.cluster_groups`: the first level of a two-level cluster tree (0: the flat classifier, also for
    runs saved before the field existed)."""
    return int(config.model.get("cluster_groups", 0))


def label_optimizer(config) -> str:
    """`train.label_optimizer` ('dense' for runs saved before the field existed, which trained densely)."""
    return config.train.get("label_optimizer", "dense")


def lazy_label_rows(config) -> bool:
    """Whether the label classifiers train lazily ('auto': with the sparse layout, where a step scores
    batch x K labels and the dense AdamW's pass over all L rows would dominate the step)."""
    choice = label_optimizer(config)
    return choice == "lazy" or (choice == "auto" and config.model.layout == "sparse")


# --- the method --------------------------------------------------------------------------------------

class ELIAS:
    """ELIAS on XMC data, trained in two stages (`stages`, `stage(name, previous)`), and a third that fits the
    sparse ranker (ELIAS++) where `ranker.steps` > 0.

    Stage s trains in `workdir/<s>` (see `jaxidx.train.loop.fit_stages`); the
    object returned by `stage` is the `Trainable` and builds the index.
    """

    name = "elias"
    index_type = ELIASIndex

    def __init__(self, config, data, mesh):
        if not isinstance(data, XMCData):
            raise TypeError(f"ELIAS: needs XMC data, got {type(data).__name__}")
        self.config, self.data, self.mesh = config, data, mesh
        self.n_labels, self.n_features = data.n_labels, data.n_features
        validate_config(config, self.n_labels)
        m = config.model
        self.n_clusters = clustering.n_leaves_for(self.n_labels, m.max_leaf)
        self.n_groups = cluster_groups(config)
        self.n_label_rows = -(-self.n_labels // m.label_multiple) * m.label_multiple
        self.inputs = B_.xmc_inputs(data.X_train, data.tokens_train)
        self.labels = B_.pad_label_lists(data.Y_train)
        if m.input == "text" and data.tokens_train is None:
            raise ValueError(f"model.input: 'text' needs a data set with raw text; {data.name} has none "
                             "(see jaxidx.data.text)")
        self.token_len = data.tokens_train.shape[1] if m.input == "text" else 0
        self.encoder = make_encoder(config, self.n_features, data.vocab_size, self.token_len)
        self.n_train = self.labels.shape[0]
        self.stages = STAGES if ranker_steps(config) > 0 else STAGES[:2]

    def stage(self, name: str, previous=None) -> "ELIASStage":
        """The Trainable of stage `name`; a stage starts from the one before's `FitResult` (None: for restoring)."""
        if name not in STAGES:
            raise ValueError(f"ELIAS stage: unknown {name!r}; valid: {', '.join(STAGES)}")
        if name == "stage3":
            return RankerStage(self, previous)
        return ELIASStage(self, STAGES.index(name) + 1, previous)

    def features(self, x):
        """Encoder input from `xmc_inputs` rows (see `encoder_input`)."""
        return encoder_input(self.config.model.input, x, self.n_features)


class ELIASStage:
    """One training stage of ELIAS as a `Trainable`; `index(params, aux)` gives the searchable index."""

    name, task = "elias", "xmc"

    def __init__(self, method: ELIAS, stage: int, previous=None):
        self.method, self.stage, self.previous = method, stage, previous
        self.config, self.mesh = method.config, method.mesh
        m, t = self.config.model, self.config.train
        self.epochs = t.epochs if stage == 1 else t.stage2_epochs
        self.batch_size = t.batch_size
        self.steps_per_epoch = B_.steps_per_epoch(method.n_train, self.batch_size)
        C, L = method.n_clusters, method.n_labels
        self.width = -(-L // C) if stage == 1 else min(m.kappa, L)
        self.train_beam = min(C, m.beam + m.teacher_extra)
        self.train_k = min(m.shortlist, self.train_beam * self.width)
        self._route = jax.jit(partial(route_clusters, method.encoder, self.config.model.alpha),
                              static_argnames=("beam", "group_beam"))
        self.lazy_labels = lazy_label_rows(self.config)

    # --- model -----------------------------------------------------------------------------------
    def encode(self, params, x, rng=None):
        return encode(self.method.encoder, params, x, rng)

    def log_edges(self, params, members):
        return log_edge_weights(params.get("edges"), members, self.config.model.beta)

    # --- Trainable -------------------------------------------------------------------------------
    def init(self, rng):
        m, method = self.config.model, self.method
        k_enc, k_cls, k_lab, k_edge = jax.random.split(rng, 4)
        d = m.hidden[-1]
        x0 = method.features(B_.take(method.inputs, np.arange(1)))
        params = {
            "encoder": method.encoder.init(k_enc, x0)["params"],
            "clusters": {"kernel": jax.nn.initializers.lecun_normal()(k_cls, (d, method.n_clusters)),
                         "bias": jnp.zeros(method.n_clusters)},
            "labels": {"kernel": jax.nn.initializers.lecun_normal()(k_lab, (method.n_label_rows, d)),
                       "bias": jnp.zeros(method.n_label_rows)},
        }
        if method.n_groups:  # the tree's first level (its leaves are the clusters' own classifier)
            params["groups"] = {"kernel": jax.nn.initializers.lecun_normal()(jax.random.fold_in(k_cls, 1),
                                                                             (d, method.n_groups)),
                                "bias": jnp.zeros(method.n_groups)}
        if self.stage == 1:
            leaf = self._initial_clustering()
            return params, {"members": clustering.leaf_members(leaf, method.n_clusters), "home": leaf}
        # Stage 2: edge logits uniform in [0, 1) as in the original; the rest from stage 1.
        params["edges"] = jax.random.uniform(k_edge, (method.n_clusters, self.width))
        if self.previous is None:  # restoring a checkpoint: only the shapes matter
            return params, {"members": np.full((method.n_clusters, self.width), -1, np.int32),
                            "home": np.full(method.n_labels, -1, np.int32)}
        prev = mesh_lib.to_host(self.previous.params)
        for name in ("encoder", "clusters", "groups"):
            if name in prev:
                params[name] = prev[name]
        if not self.config.train.stage2_reinit_labels:
            params["labels"] = prev["labels"]
        members, _ = self._approximate_adjacency(prev)
        return params, {"members": members, "home": self._home(params, members)}

    def optimizer(self, total_steps):
        """AdamW (no decay on biases) with warmup-then-linear-decay; encoder and classifiers at their own rates.
        With lazy label rows, the label classifiers' AdamW updates only the rows of the step's shortlists."""
        t = self.config.train

        def adamw(lr):
            return optax.adamw(warmup_linear(lr, total_steps, t.warmup), weight_decay=t.weight_decay,
                               mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))

        tx = optax.multi_transform(
            {"encoder": adamw(t.encoder_learning_rate), "classifiers": adamw(t.learning_rate)},
            lambda p: {k: jax.tree.map(lambda _: "encoder" if k == "encoder" else "classifiers", v)
                       for k, v in p.items()})
        if not self.lazy_labels:
            return tx
        return sparse_rows.RowSparse(dense=tx, tables=("labels",), weight_decay=t.weight_decay,
                                     learning_rate=warmup_linear(t.learning_rate, total_steps, t.warmup))

    def loss(self, params, batch, aux, rng):
        m = self.config.model
        labels = batch["labels"]
        phi = self.encode(params, batch["x"], rng)
        log_p = cluster_log_probs(params, phi)  # a tree: every cluster's exact log p (its training beam is exact)
        forced = jnp.where(labels >= 0, jnp.take(aux["home"], jnp.where(labels >= 0, labels, 0)), -1)
        beam_ids, beam_log_s = cluster_beam(log_p, log_cluster_scores(log_p, m.alpha), self.train_beam, forced)
        cand, cand_log_path = expand_paths(beam_ids, beam_log_s, aux["members"],
                                           self.log_edges(params, aux["members"]))
        if m.layout == "dense":  # [b, label rows]: scatter-max, threshold by bisection, one matmul
            log_path = dense_best_paths(cand, cand_log_path, self.method.n_label_rows)
            valid = log_path > NEG / 2
            if self.train_k < self.train_beam * self.width:
                valid &= top_k_mask(log_path, self.train_k)
            u = phi @ params["labels"]["kernel"].T + params["labels"]["bias"]
            target = multi_hot(labels, self.method.n_label_rows)
            pos_log_path = jnp.take_along_axis(log_path, jnp.where(labels >= 0, labels, 0), axis=1)
            pos_found = (labels >= 0) & (pos_log_path > NEG / 2)
        elif self.stage == 1:  # [b, K], hard partition: one path per label, so no merge (sort) is needed
            log_path, pos = jax.lax.top_k(cand_log_path, self.train_k)
            ids = jnp.where(log_path > NEG / 2, jnp.take_along_axis(cand, pos, axis=1), -1)
            valid = ids >= 0
            u = label_logits(params["labels"], phi, ids, dense=False)
            target = is_positive(ids, labels)
            on_beam = (beam_ids[:, None, :] == forced[:, :, None]) & (labels >= 0)[:, :, None]  # home in the beam
            pos_log_path = jnp.max(jnp.where(on_beam, beam_log_s[:, None, :], NEG), axis=-1)
            pos_found = on_beam.any(-1)
        else:  # [b, K]: sort-based best paths, top-K, gathered classifier rows (no [b, L] array)
            sorted_labels, best = best_paths(cand, cand_log_path)
            ids, log_path = shortlist(sorted_labels, best, self.train_k)
            valid = ids >= 0
            u = label_logits(params["labels"], phi, ids, dense=False)
            target = is_positive(ids, labels)
            pos_log_path, pos_found = lookup(sorted_labels, best, labels)
        loss, metrics = elias_loss(log_path, u, valid, target, pos_log_path, pos_found, batch["weight"], m.lam,
                                   self.train_k)
        w = batch["weight"][:, None]
        n_pos = jnp.maximum(jnp.sum((labels >= 0) * w), 1.0)
        metrics["shortlist_recall"] = jnp.sum((target & valid) * w) / n_pos
        metrics["path_recall"] = jnp.sum(pos_found * w) / n_pos
        if self.lazy_labels:  # the label rows scored (sparse layout: ids), for the lazy optimizer
            return loss, (metrics, {"labels": jnp.where(valid, ids, -1)})
        return loss, metrics

    def batch(self, epoch, index):
        method = self.method
        order = B_.epoch_order(method.n_train, self.config.seed, epoch)
        rows, weight = B_.batch_rows(order, index, self.batch_size, mesh_lib.process_shard(self.mesh))
        return {"x": method.features(B_.take(method.inputs, rows)), "labels": method.labels[rows],
                "weight": weight}

    def device_aux(self, aux):
        return {"members": aux["members"], "home": aux["home"]}

    def end_of_epoch(self, epoch, params, aux):
        """Stage 2: each label's teacher-forced cluster follows its currently heaviest edge."""
        if self.stage == 1:
            return aux, {}
        home = self._home(mesh_lib.to_host(params), aux["members"])
        moved = float((home != aux["home"]).mean())
        return dict(aux, home=home), {"home_moved": moved}

    def leaf_spec(self, leaf):
        """Label classifier rows, and edge-logit rows, split over 'model' (for millions of labels)."""
        mp = self.mesh.shape[mesh_lib.MODEL]
        shape = getattr(leaf, "shape", ())
        if mp > 1 and len(shape) >= 1 and shape[0] == self.method.n_label_rows and shape[0] % mp == 0:
            return P(mesh_lib.MODEL)
        if mp > 1 and tuple(shape) == (self.method.n_clusters, self.width) and shape[0] % mp == 0:
            return P(mesh_lib.MODEL)
        return P()

    def shapes(self):
        m, method = self.config.model, self.method
        return {"stage": self.stage, "n_labels": method.n_labels, "n_features": method.n_features,
                "n_clusters": method.n_clusters, "width": self.width, "hidden": list(m.hidden),
                "input": m.input, "label_rows": method.n_label_rows,
                **({"cluster_groups": method.n_groups} if method.n_groups else {}),
                "label_optimizer": "lazy" if self.lazy_labels else "dense",  # the optimizer state's structure
                **({"vocab_size": method.data.vocab_size, "token_len": method.token_len,
                    "transformer": dict(m.transformer)}
                   if m.input == "text" else {})}

    # --- clustering and adjacency ----------------------------------------------------------------
    def _initial_clustering(self) -> np.ndarray:
        data = self.method.data
        feats = clustering.pifa(data.X_train, data.Y_train)
        leaf = clustering.balanced_tree(feats, self.method.n_clusters, seed=self.config.seed)
        log.info("initial clustering: %d labels into %d balanced leaves of <= %d", self.method.n_labels,
                 self.method.n_clusters, self.width)
        return leaf

    def _approximate_adjacency(self, params):
        """Members [C, width] of A from stage 1's top-b clusters of every training point."""
        method, m = self.method, self.config.model
        beam = min(m.beam, method.n_clusters)
        group_beam = min(beam, method.n_groups)  # a tree: the groups a search opens by default (ELIASIndex._beams)
        bs = self.config.search.query_batch
        ids, scores = [], []
        for rows, n in query_blocks(method.inputs, bs):
            _, i, sc = self._route(params, method.features(rows), beam=beam, group_beam=group_beam)
            ids.append(np.asarray(i)[:n])
            scores.append(np.asarray(sc)[:n])
        members, values = approximate_adjacency(method.data.Y_train, np.concatenate(ids), np.concatenate(scores),
                                                method.n_clusters, self.width, m.keep_best_edge)
        seen = np.asarray(method.data.Y_train.getnnz(axis=0)) > 0
        covered = np.zeros(method.n_labels, bool)
        covered[members[members >= 0]] = True
        log.info("approximate adjacency: %d edges; %.4f of the labels seen in training have one",
                 int((members >= 0).sum()), covered[seen].mean())
        return members, values

    def _home(self, params, members):
        w = np.exp(np.asarray(self.log_edges(params, jnp.asarray(members))))
        return home_clusters(members, w, self.method.n_labels)

    # --- search ----------------------------------------------------------------------------------
    def index(self, params, aux):
        """The searchable `ELIASIndex` of this stage's params and aux."""
        method = self.method
        info = {"dim": method.n_features, "n_features": method.n_features, "n_items": method.n_labels,
                "data_fingerprint": method.data.fingerprint(), "stage": self.stage,
                **({"vocab_size": method.data.vocab_size, "token_len": method.token_len}
                   if self.config.model.input == "text" else {})}
        return ELIASIndex.from_training(self.config, mesh_lib.to_host(params), aux, info)


class RankerStage(ELIASStage):
    """Stage 3: the sparse ranker (`ranker`) on pairs (training row, label): each row's top `ranker.negatives`
    labels by the stage-2 model (its hard negatives and found positives) and all its positives. Per label
    it is an L2-regularised logistic regression (liblinear's objective, 1/2 |w_l|^2 + C x the log loss of
    the label's pairs), convex and small, so it is solved by full-batch Adam: one epoch of `ranker.steps`
    steps, each over all pairs (split over the data devices). The stage-2 model rides along unchanged (its
    optimizer is zero), so the stage's checkpoint holds the whole index."""

    def __init__(self, method: ELIAS, previous=None):
        super().__init__(method, 3, previous)
        self.epochs, self.steps_per_epoch = 1, max(1, self.config.ranker.steps)
        self.pairs = None
        if previous is not None:  # deterministic from stage 2, so a resumed run rebuilds the same pairs
            rows, labels, y = self._pairs(previous)
            x = B_.take(method.inputs, rows)
            self.support = ranker.support(labels, x["idx"], x["val"], method.n_labels, method.n_features)
            self.pairs = {"entries": ranker.entries(*self.support, labels, x["idx"], x["val"], method.n_features),
                          "labels": labels, "y": y}
            n_data = mesh_lib.data_size(self.mesh)
            self.batch_size = -(-len(rows) // n_data) * n_data  # all pairs, padded to split over the devices
            log.info("ranker: %d pairs (%.3f positive) of %d rows; %d weights", len(rows), y.mean(),
                     method.n_train, len(self.support[1]))

    def _pairs(self, previous):
        """(rows, labels, y): every training row's top `negatives` labels by the stage-2 index (at the widest
        search setting of the config) and its positives."""
        method = self.method
        index = super().index(previous.params, previous.aux)
        widest = max(self.config.search.settings, key=lambda s: (s.get("beam", 1), s.get("shortlist", 1)))
        ids, _ = index.search(method.data.X_train, k=min(self.config.ranker.negatives, method.n_labels),
                              **{k: v for k, v in widest.items() if k in ("beam", "shortlist")})
        Y = method.data.Y_train.tocsr()
        L = method.n_labels
        pos = np.repeat(np.arange(Y.shape[0], dtype=np.int64), np.diff(Y.indptr)) * L + Y.indices
        found = np.repeat(np.arange(ids.shape[0], dtype=np.int64), ids.shape[1]) * L + ids.ravel()
        keys = np.unique(np.concatenate([pos, found[ids.ravel() >= 0]]))
        return (keys // L).astype(np.int64), (keys % L).astype(np.int32), np.isin(keys, pos).astype(np.float32)

    def init(self, rng):
        if self.pairs is None:
            raise ValueError("ELIAS stage 3: needs stage 2's result")
        params = dict(mesh_lib.to_host(self.previous.params))
        params["ranker"] = {"w": np.zeros(len(self.support[1]), np.float32),
                            "b": np.zeros(self.method.n_labels, np.float32)}
        aux = {"members": self.previous.aux["members"], "home": self.previous.aux["home"],
               "ranker_offsets": self.support[0], "ranker_feats": self.support[1]}
        return params, aux

    def optimizer(self, total_steps):
        """Adam on the ranker (warmup, then linear decay to 0; the L2 term is in the loss); the stage-2 model
        frozen."""
        r = self.config.ranker
        tx = optax.adam(warmup_linear(r.learning_rate, total_steps, self.config.train.warmup))
        return optax.multi_transform({"ranker": tx, "frozen": optax.set_to_zero()},
                                     lambda p: {k: jax.tree.map(lambda _: "ranker" if k == "ranker" else "frozen", v)
                                                for k, v in p.items()})

    def loss(self, params, batch, aux, rng):
        """(sum over pairs of C x log loss + 1/2 |w|^2) / pairs: liblinear's objective, summed over labels."""
        r, pairs = params["ranker"], aux
        sel = batch["pair"]  # this device's pairs (the logits of all are one segment sum over the entries)
        logit = ranker.pair_logits(r["w"], r["b"], pairs["entries"], pairs["labels"], len(self.pairs["y"]))[sel]
        y, w = pairs["y"][sel], batch["weight"]
        n = jnp.maximum(jnp.sum(w), 1.0)
        c = self.config.ranker.c
        loss = (c * jnp.sum(optax.sigmoid_binary_cross_entropy(logit, y) * w) + 0.5 * jnp.sum(r["w"] ** 2)) / n
        right = (logit > 0) == (y > 0.5)
        return loss, {"pair_accuracy": jnp.sum(right * w) / n}

    def batch(self, epoch, index):
        """Every pair in every step (padding: weight 0)."""
        pair, weight = B_.batch_rows(np.arange(len(self.pairs["y"])), 0, self.batch_size,
                                     mesh_lib.process_shard(self.mesh))
        return {"pair": pair, "weight": weight}

    def device_aux(self, aux):
        return self.pairs

    def end_of_epoch(self, epoch, params, aux):
        return aux, {}
