"""ELIAS's label-to-cluster graph on the host: the approximate adjacency built after stage 1, the
edge every label keeps, each label's home cluster, and the adjacency as a soft partition."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from jaxidx.partition import Partition

def approximate_adjacency(Y, beam_ids: np.ndarray, beam_scores: np.ndarray, n_clusters: int, kappa: int,
                          keep_best: bool = False):
    """A = top-kappa labels per cluster row of (Y^T M)^T, M [N, C] the training points' beam scores.

    `Y` [N, L] binary CSR, `beam_ids` / `beam_scores` [N, b]. Row c's value for
    label l sums the scores with which l's training points reached c; ties keep
    the smaller label id. `keep_best`: every label keeps one edge, in its best
    row that has room (`reserved_edges`), ranked first in that row, so rare
    labels that frequent ones crowd out of every top-kappa are still reachable
    (rows stay capped at kappa).
    Returns members int32 [C, kappa] (-1 padding) and values float32 [C, kappa].
    """
    N, b = beam_ids.shape
    M = sp.csr_matrix((beam_scores.ravel().astype(np.float32), beam_ids.ravel().astype(np.int64),
                       np.arange(0, N * b + 1, b)), shape=(N, n_clusters))
    A = sp.csr_matrix(sp.csr_matrix(Y, dtype=np.float32).T @ M).T.tocsr()
    A.sum_duplicates()
    A.eliminate_zeros()
    rows = np.repeat(np.arange(n_clusters), np.diff(A.indptr))
    first = reserved_edges(rows, A.indices, A.data, n_clusters, kappa) if keep_best else np.zeros(A.nnz, bool)
    order = np.lexsort((A.indices, -A.data, ~first, rows))
    rank = np.arange(A.nnz) - A.indptr[rows[order]]
    top = rank < kappa
    keep, col = order[top], rank[top]
    members = np.full((n_clusters, kappa), -1, np.int32)
    values = np.zeros((n_clusters, kappa), np.float32)
    members[rows[keep], col] = A.indices[keep]
    values[rows[keep], col] = A.data[keep]
    return members, values


def reserved_edges(rows: np.ndarray, labels: np.ndarray, values: np.ndarray, n_rows: int, capacity: int):
    """bool per edge: the one edge each label keeps, at most `capacity` per row.

    In round r every label without an edge yet proposes its r-th best row (by
    value, ties to the smaller row); each row accepts the strongest proposals
    (ties to the smaller label) while it has room. A label is left out only when
    every row it reaches is full.
    """
    by_label = np.lexsort((rows, -values, labels))
    lab = labels[by_label]
    starts = np.flatnonzero(np.concatenate([[True], lab[1:] != lab[:-1]]))
    counts = np.diff(np.append(starts, len(lab)))
    free = np.full(n_rows, capacity, np.int64)
    keep = np.zeros(len(rows), bool)
    pending = np.arange(len(starts))  # label groups without an edge
    r = 0
    while len(pending) and free.any():
        pending = pending[counts[pending] > r]
        edge = by_label[starts[pending] + r]
        order = np.lexsort((labels[edge], -values[edge], rows[edge]))
        edge, group = edge[order], pending[order]
        row = rows[edge]
        rank = np.arange(len(row)) - np.searchsorted(row, row)  # position among this round's proposals to the row
        ok = rank < free[row]
        keep[edge[ok]] = True
        np.subtract.at(free, row[ok], 1)
        pending = np.sort(group[~ok])
        r += 1
    return keep


def home_clusters(members: np.ndarray, weights: np.ndarray, n_labels: int) -> np.ndarray:
    """Each label's cluster of largest edge weight (ties to the smaller cluster), -1 if it has no edge."""
    C, width = members.shape
    rows = np.repeat(np.arange(C, dtype=np.int32), width)
    lab, w = members.ravel(), weights.ravel()
    ok = lab >= 0
    rows, lab, w = rows[ok], lab[ok], w[ok]
    order = np.lexsort((rows, -w, lab))
    lab, rows = lab[order], rows[order]
    first = np.concatenate([[True], lab[1:] != lab[:-1]])
    home = np.full(n_labels, -1, np.int32)
    home[lab[first]] = rows[first]
    return home


def soft_partition(members: np.ndarray, weights: np.ndarray) -> Partition:
    """The adjacency table [C, width] as a one-repetition CSR Partition with edge weights."""
    ok = members >= 0
    offsets = np.concatenate([[0], np.cumsum(ok.sum(axis=1))]).astype(np.int32)[None]
    return Partition(offsets=offsets, members=np.ascontiguousarray(members[ok][None], np.int32),
                     weights=np.ascontiguousarray(weights[ok][None], np.float32))
