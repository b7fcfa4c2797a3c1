"""In-memory data set containers shared by every method, reader and entry point."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional

import numpy as np
import scipy.sparse as sp

# ann-benchmarks distance names -> the kernel metric used on the stored vectors.
# Angular data is L2-normalised at load time, so cosine becomes an inner product.
ANN_METRICS = ("angular", "euclidean", "dot")
KERNEL_METRIC = {"angular": "ip", "euclidean": "l2", "dot": "ip"}


def benchmark_distance(kernel_dist: np.ndarray, metric: str) -> np.ndarray:
    """Kernel distances (ip: -dot, l2: squared L2) -> ann-benchmarks distances.

    angular: 1 - cos (vectors are normalised); euclidean: L2; dot: -dot.
    """
    d = np.asarray(kernel_dist, dtype=np.float32)
    if metric == "angular":
        return 1.0 + d
    if metric == "euclidean":
        return np.sqrt(np.maximum(d, 0.0))
    if metric == "dot":
        return d
    raise ValueError(f"metric: unknown {metric!r}; valid: {ANN_METRICS}")


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if sp.issparse(a):
            a = a.tocsr()
            for part in (a.indptr, a.indices, a.data):
                h.update(np.ascontiguousarray(part).tobytes())
            h.update(str(a.shape).encode())
        elif a is not None:
            a = np.ascontiguousarray(a)
            h.update(a.tobytes())
            h.update(str(a.shape).encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class XMCData:
    """Extreme multi-label data: CSR float32 features, CSR binary float32 labels."""

    name: str
    X_train: sp.csr_matrix
    Y_train: sp.csr_matrix
    X_test: Optional[sp.csr_matrix] = None  # None: built for an index only (jaxidx.fit on (X, Y))
    Y_test: Optional[sp.csr_matrix] = None
    # Token ids [n, max_len] of each row's raw text (see jaxidx.data.text), where the data set has text.
    tokens_train: Optional[np.ndarray] = None
    tokens_test: Optional[np.ndarray] = None
    vocab_size: int = 0

    task = "xmc"

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_labels(self) -> int:
        return self.Y_train.shape[1]

    def fingerprint(self) -> str:
        """Content hash of the training split, stored in checkpoints to detect data changes."""
        return _digest(self.X_train, self.Y_train)


@dataclasses.dataclass
class ANNData:
    """Nearest-neighbour data: base and held-out queries with exact ground truth.

    `base`/`queries` are float32 and already L2-normalised when metric is angular.
    `gt_ids`/`gt_dist` [Q, K] are the exact neighbours in ann-benchmarks distance
    convention (see `benchmark_distance`), ascending. Queries and ground truth are
    None for a base given to `jaxidx.fit` alone: building never needs them.
    """

    name: str
    base: np.ndarray
    queries: Optional[np.ndarray] = None
    metric: str = "euclidean"
    gt_ids: Optional[np.ndarray] = None
    gt_dist: Optional[np.ndarray] = None
    train_queries: Optional[np.ndarray] = None  # extra training points, if a source has them

    task = "ann"

    @property
    def dim(self) -> int:
        return self.base.shape[1]

    @property
    def n_items(self) -> int:
        return self.base.shape[0]

    @property
    def kernel_metric(self) -> str:
        return KERNEL_METRIC[self.metric]

    def fingerprint(self) -> str:
        return _digest(self.base, np.frombuffer(self.metric.encode(), np.uint8))
