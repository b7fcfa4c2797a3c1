"""Router inputs that do not depend on the data's scale: the same data times 100 (plus an offset) gives the
same partition and results; IRLI trains on large-magnitude vectors; the auto presets' rules."""
from types import SimpleNamespace

import numpy as np
import pytest

import jaxidx
from jaxidx.config import get_config
from jaxidx.data import synthetic_ann, synthetic_xmc
from jaxidx.methods.common import input_standardizer, standardize
from jaxidx.metrics import knn_recall


def test_standardizer():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((500, 4)) * [1, 2, 3, 4] + 7).astype(np.float32)
    c, s = input_standardizer(x, "euclidean", True)
    np.testing.assert_allclose(c, x.mean(0), rtol=1e-5)
    z = standardize(x, c, s)
    np.testing.assert_allclose(np.mean(np.sum(z * z, 1)) / 4, 1.0, rtol=1e-4)  # unit RMS coordinate
    for metric, enabled in (("angular", True), ("euclidean", False)):
        c, s = input_standardizer(x, metric, enabled)
        assert not c.any() and s == 1
    c, s = input_standardizer(np.full((10, 3), 5.0, np.float32), "euclidean", True)  # constant: scale 1
    assert s == 1 and (c == 5).all()


@pytest.mark.parametrize("method", ["lmi", "irli"])
def test_data_times_100_gives_the_same_partition_and_results(method):
    d = synthetic_ann(n_base=2000, n_queries=100, dim=16, n_clusters=20, metric="euclidean", seed=4)
    runs = [jaxidx.fit(method, d.base * a + b, progress=False, train__epochs=3) for a, b in ((1, 0), (100, 50))]
    # The same partition up to float rounding: a last-bit difference can flip a k-means++ draw or a near-tie
    # of the argmax, and training follows it (here at most 2% of the items).
    assert np.mean(_buckets_of_items(runs[0]) == _buckets_of_items(runs[1])) > 0.97
    (ids1, dist1), (ids2, dist2) = runs[0].search(d.queries, k=10), runs[1].search(d.queries * 100 + 50, k=10)
    assert np.mean(ids1 == ids2) > 0.97
    same = ids1 == ids2
    np.testing.assert_allclose(dist2[same], 100 * dist1[same], rtol=1e-3)
    # Without standardised inputs the same preset learns another, worse partition at this scale.
    raw = jaxidx.fit(method, d.base * 100 + 50, progress=False, train__epochs=3, model__standardize=False)
    assert np.mean(_buckets_of_items(raw) == _buckets_of_items(runs[1])) < 0.9


def _buckets_of_items(index) -> np.ndarray:
    """The bucket of every item id in every repetition [R, N], from the index's CSR layout."""
    offsets = index.arrays["offsets"]
    members = index.arrays["members"] if "members" in index.arrays else np.arange(len(index))[None]
    ids = index.arrays["ids"]
    out = np.empty(members.shape, np.int64)
    for r in range(members.shape[0]):
        out[r, ids[members[r]]] = np.repeat(np.arange(offsets.shape[1] - 1), np.diff(offsets[r]))
    return out


def test_irli_trains_on_large_magnitude_vectors():
    """Features in the hundreds (overlapping clusters): without standardised inputs the routers' logits
    saturate and recall at a fixed budget falls towards what a random bucket gives."""
    d = synthetic_ann(n_base=10000, n_queries=300, dim=64, n_clusters=2000, metric="euclidean", seed=3)
    base = np.clip(d.base * 100 + 128, 0, 400).astype(np.float32)
    q = np.clip(d.queries * 100 + 128, 0, 400).astype(np.float32)
    gt = np.argsort(((q[:, None, :] - base[None]) ** 2).sum(-1), 1)[:, :10]
    out = {}
    for std in (True, False):
        index = jaxidx.fit("irli:glove-small", base, progress=False, model__standardize=std, train__epochs=8,
                           model__n_buckets=128)
        res = index.query(q, {"m": 2, "min_count": 1}, 10)
        out[std] = knn_recall(res.ids, gt, 10), res.n_candidates.mean() / len(base)
    recall, scanned = out[True]
    assert recall > 0.6 and recall > 8 * scanned  # a random 6% of the base would give recall ~0.06
    assert recall > out[False][0] + 0.2  # standardising is what fixes it


def test_auto_rules_follow_the_data():
    small = synthetic_ann(n_base=3000, n_queries=10, dim=16, n_clusters=10, seed=0)
    c = get_config("lmi", small)
    assert c.model.levels == (64,) and c.model.hidden == ((64,),) and c.train.epochs == 20
    probes = [s["n_probe"] for s in c.search.settings if "max_candidates" not in s and "reorder" not in s]
    assert c.train.batch_size == 64 and probes[:5] == [1, 2, 3, 4, 6] and probes[-1] == 64  # up to every leaf
    assert c.kmeans.balance == 2.0 and c.index.pq4_dims == -1  # PQ codes, dims chosen from the data
    assert small.metric == "angular" and c.index.pq4_anisotropic == 0.2  # score-aware codes for inner products
    l2 = get_config("lmi", SimpleNamespace(task="ann", n_items=5000, dim=8, metric="euclidean",
                                           name="synthetic-ann:n=100,d=8,metric=euclidean"))
    assert l2.index.pq4_anisotropic == 0.0
    assert c.index.sq8  # 8-bit codes too
    assert [(s.get("reorder", 0), s.get("codes", "pq4")) for s in c.search.settings[:5]] == [
        (0, "pq4"), (30, "pq4"), (100, "pq4"), (10, "sq8"), (20, "sq8")]  # each n_probe: floats and both codes
    c = get_config("irli", small)
    assert (c.model.n_buckets, c.model.n_reps, c.train.max_train_points) == (64, 4, 0)
    assert c.index.pq4_dims == -1 and {s.get("reorder", 0) for s in c.search.settings} == {0, 30, 100, 300}
    assert all(s.get("min_count", 1) == 1 for s in c.search.settings if s.get("reorder"))  # codes rank, no hit count
    assert (c.partition.init, c.partition.top_k) == ("kmeans", 1)  # k-means starts, each item its first choice
    assert {s.get("reps", 4) for s in c.search.settings} == {1, 2, 4} and "reps" not in c.search.settings[0]
    assert all(s.get("min_count", 1) <= s.get("reps", 4) for s in c.search.settings)
    big = synthetic_ann(n_base=200000, n_queries=10, dim=96, n_clusters=10, seed=0)
    c = get_config("lmi", big)
    assert c.model.levels == (512,) and c.model.hidden == ((512,),) and c.train.epochs == 10
    assert c.train.batch_size == 1024
    c = get_config("irli", big)
    assert c.model.n_buckets == 512 and c.train.max_train_points == 50000 and c.model.hidden == (256,)
    assert c.partition.center_sample == 65536 and c.partition.repartition_every == 2
    for n, points in ((10**6, 25000), (4 * 10**6, 20000)):  # neighbour labels bounded: sample x N <= 2.5e10
        c = get_config("irli", SimpleNamespace(task="ann", n_items=n, dim=64, name="synthetic-ann:n=100,d=64"))
        assert c.train.max_train_points == points and c.partition.repartition_every == 4  # fewer passes over N
    x = synthetic_xmc(n_train=500, n_test=10, n_features=300, n_labels=1000, seed=0)
    c = get_config("elias", x)
    assert c.model.max_leaf == 32 and c.model.input == "dense" and c.model.beam == 16 and c.model.layout == "dense"
    assert c.ranker.steps == 0  # few features: no sparse ranker
    assert c.model.cluster_groups == 0  # 32 clusters: one flat classifier
    c = get_config("elias", SimpleNamespace(task="xmc", n_labels=200000, n_features=10000, X_train=np.zeros((50000, 1)),
                                            name="synthetic-xmc:n=100,labels=200000"))
    assert c.model.layout == "sparse" and c.train.label_optimizer == "auto"  # [batch, K] arrays, lazy label rows
    assert c.ranker.steps > 0  # an embedding bag over many features: the sparse ranker as stage 3
    assert c.model.cluster_groups == 0  # 2048 clusters: still flat
    c = get_config("elias", SimpleNamespace(task="xmc", n_labels=10**6, n_features=10000, X_train=np.zeros((50000, 1)),
                                            name="synthetic-xmc:n=100,labels=1000000"))
    assert c.model.max_leaf == 100 and c.model.cluster_groups == 128  # 16384 clusters: a tree of 128 x 128
    c = get_config("irli", x)
    assert c.model.n_buckets == 64 and c.model.n_reps == 16 and c.partition.top_k == 4
    assert c.partition.init == "hash" and not any("reps" in s for s in c.search.settings)  # labels: hashed start
    assert c.index.pq4_dims == 0 and not any(s.get("reorder") for s in c.search.settings)  # labels: no codes
    with pytest.raises(ValueError, match="auto preset sizes itself from the data"):
        get_config("lmi")
