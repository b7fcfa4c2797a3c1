"""Seeded synthetic data sets with planted structure, for tests and scaling studies."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from jaxidx.data.ann import (GLOVE_QUERIES, GLOVE_ROWS, GROUND_TRUTH_K, cached_exact_knn, glove_split,
                             normalize_rows)
from jaxidx.data.groundtruth import exact_knn
from jaxidx.data.types import ANN_METRICS, ANNData, XMCData

CLUSTER_SPREAD = 0.3  # within-cluster std relative to the unit std of cluster centres
PROTOTYPE_KEEP = 0.6  # chance that an example keeps each prototype feature of each of its labels


def synthetic_ann(n_base: int = 10000, n_queries: int = 100, dim: int = 32, n_clusters: int = 16,
                  metric: str = "angular", seed: int = 0, scale: float = 1.0, offset: float = 0.0,
                  zipf: float = 0.0) -> ANNData:
    """Gaussian clusters (centres ~ N(0, I), spread CLUSTER_SPREAD); queries are
    held-out draws from the same mixture; exact top-min(100, n_base) ground truth.
    `scale` and `offset` map every coordinate to x * scale + offset (features in the hundreds, as
    raw image or count features have), before the angular normalisation. `zipf` > 0 draws cluster c with
    probability proportional to (c + 1)^-zipf (strongly unequal cluster sizes); 0: uniform."""
    if metric not in ANN_METRICS:
        raise ValueError(f"metric: unknown {metric!r}; valid: {ANN_METRICS}")
    if min(n_base, n_queries, dim, n_clusters) < 1:
        raise ValueError("synthetic_ann: n_base, n_queries, dim and n_clusters must be >= 1")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    n = n_base + n_queries
    if zipf > 0:
        p = np.arange(1, n_clusters + 1, dtype=np.float64) ** -zipf
        which = rng.choice(n_clusters, size=n, p=p / p.sum())
    else:
        which = rng.integers(n_clusters, size=n)
    x = centres[which] + CLUSTER_SPREAD * rng.standard_normal((n, dim)).astype(np.float32)
    if (scale, offset) != (1.0, 0.0):
        x = (x * np.float32(scale) + np.float32(offset)).astype(np.float32)
    if metric == "angular":
        x = normalize_rows(x, "synthetic_ann points")
    base, queries = x[:n_base], x[n_base:]
    gt_ids, gt_dist = exact_knn(queries, base, min(GROUND_TRUTH_K, n_base), metric)
    name = f"synthetic-ann:n={n_base},q={n_queries},d={dim},clusters={n_clusters},metric={metric},seed={seed}"
    if (scale, offset) != (1.0, 0.0):
        name += f",scale={scale:g},offset={offset:g}"
    if zipf:
        name += f",zipf={zipf:g}"
    return ANNData(name=name, base=base, queries=queries, metric=metric, gt_ids=gt_ids, gt_dist=gt_dist)


def synthetic_xmc(n_train: int = 2000, n_test: int = 500, n_features: int = 1000, n_labels: int = 200,
                  labels_per_example: float = 3.0, features_per_label: int = 10, seed: int = 0,
                  zipf: float = 1.0) -> XMCData:
    """Multi-label data whose labels are recoverable from the features.

    Label popularity follows a Zipf law with exponent `zipf` (over a random
    permutation of label ids); an example has 1 + Poisson(labels_per_example - 1)
    label draws (repeats collapse, so the mean is a little lower). Each label owns
    a prototype of `features_per_label` random feature ids; an example's terms
    are each prototype feature of its labels kept with chance PROTOTYPE_KEEP,
    plus 1 + Poisson(features_per_label / 2) uniform noise terms. Values are
    tf-idf ((1 + log tf) * smoothed idf from the training rows), rows
    L2-normalised. Fully vectorised; memory is O(n * labels * features_per_label
    + n_labels * features_per_label).
    """
    if min(n_train, n_test, n_features, n_labels, features_per_label) < 1 or labels_per_example < 1:
        raise ValueError("synthetic_xmc: sizes must be >= 1 and labels_per_example >= 1")
    rng = np.random.default_rng(seed)
    n = n_train + n_test

    popularity = np.cumsum(1.0 / np.arange(1, n_labels + 1) ** zipf)
    label_of_rank = rng.permutation(n_labels)
    y_rows = np.repeat(np.arange(n), 1 + rng.poisson(labels_per_example - 1, size=n))
    ranks = np.searchsorted(popularity, rng.random(y_rows.size) * popularity[-1], side="right")
    y_cols = label_of_rank[np.minimum(ranks, n_labels - 1)]
    Y = sp.csr_matrix((np.ones(y_rows.size, np.float32), (y_rows, y_cols)), shape=(n, n_labels))
    Y.sum_duplicates()
    Y.data[:] = 1.0

    prototypes = rng.integers(n_features, size=(n_labels, features_per_label))
    p_rows = np.repeat(np.repeat(np.arange(n), np.diff(Y.indptr)), features_per_label)
    p_cols = prototypes[Y.indices].reshape(-1)
    keep = rng.random(p_rows.size) < PROTOTYPE_KEEP
    noise_rows = np.repeat(np.arange(n), 1 + rng.poisson(features_per_label / 2, size=n))
    noise_cols = rng.integers(n_features, size=noise_rows.size)
    rows = np.concatenate([p_rows[keep], noise_rows])
    cols = np.concatenate([p_cols[keep], noise_cols])
    X = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(n, n_features))
    X.sum_duplicates()  # values are now term counts

    df = np.bincount(X.indices[:X.indptr[n_train]], minlength=n_features)
    idf = np.log((1.0 + n_train) / (1.0 + df)) + 1.0
    X.data = ((1.0 + np.log(X.data)) * idf[X.indices]).astype(np.float32)
    norms = np.sqrt(np.add.reduceat(X.data.astype(np.float64) ** 2, X.indptr[:-1]))  # every row has a noise term
    X.data /= np.repeat(norms, np.diff(X.indptr)).astype(np.float32)

    name = (f"synthetic-xmc:n={n_train},test={n_test},features={n_features},labels={n_labels},"
            f"per_example={labels_per_example:g},per_label={features_per_label},zipf={zipf:g},seed={seed}")
    return XMCData(name=name, X_train=X[:n_train], Y_train=Y[:n_train], X_test=X[n_train:], Y_test=Y[n_train:])


def scaling_xmc_rows(n_labels: int) -> int:
    """Training examples of the XMC scaling study's data: L / 20 (a fixed number of examples per label)."""
    return max(1, n_labels // 20)


def scaling_xmc_spec(n_labels: int, n_test: int = 1000, seed: int = 0) -> str:
    """Data of the XMC scaling study: `n_labels` power-law labels, `scaling_xmc_rows` training
    examples, 10K features (fixed); `load(spec)` generates it."""
    return (f"synthetic-xmc:n={scaling_xmc_rows(n_labels)},test={n_test},features=10000,labels={n_labels},"
            f"seed={seed}")


def scaling_ann_spec(n_base: int, n_queries: int = 1000) -> str:
    """Data of the ANN scaling study: the GloVe 6B 50d base up to its 390K vectors, `glove_copies` beyond."""
    if n_base <= GLOVE_ROWS - GLOVE_QUERIES:
        return f"glove-6b-50d:base={n_base},queries={n_queries}"
    return f"glove-copies:base={n_base},queries={n_queries}"


def glove_copies(n_base: int, n_queries: int = 1000, noise: float = 0.5, seed: int = 0) -> ANNData:
    """GloVe 6B 50d grown past its 390K base vectors by seeded noisy copies, for ANN scaling studies.

    Rows below 390000 are the canonical base (`glove_split`); row i beyond is base row
    (i - 390000) mod 390000 plus Gaussian noise of expected norm `noise`, re-normalised (0.5 puts
    a copy of a query's nearest word about as close as its 10th neighbour). Queries are the first
    `n_queries` canonical queries; exact top-100 ground truth is cached like `load_glove`'s.
    """
    if n_base < 1 or not 1 <= n_queries <= 10000 or noise < 0:
        raise ValueError(f"glove_copies: need base >= 1, queries in [1, 10000], noise >= 0; got {n_base}, "
                         f"{n_queries}, {noise}")
    base, queries = glove_split()
    queries = queries[:n_queries]
    if n_base > len(base):
        extra = n_base - len(base)
        rng = np.random.default_rng(seed)
        copies = base[np.arange(extra) % len(base)]
        copies += rng.standard_normal(copies.shape, dtype=np.float32) * np.float32(noise / np.sqrt(base.shape[1]))
        base = np.concatenate([base, normalize_rows(copies, "glove_copies")])
    else:
        base = base[:n_base]
    name = f"glove-copies:base={n_base},queries={n_queries},noise={noise:g},seed={seed}"
    gt_ids, gt_dist = cached_exact_knn(name.replace(":", "_").replace(",", "_").replace("=", ""), queries, base,
                                       min(GROUND_TRUTH_K, n_base), "angular")
    return ANNData(name=name, base=base, queries=queries, metric="angular", gt_ids=gt_ids, gt_dist=gt_dist)
