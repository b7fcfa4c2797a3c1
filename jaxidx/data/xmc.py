"""Extreme Classification Repository text format: strict reader and writer.

Format: a header line `N D L`, then one line per example
`l1,l2,... f:v f:v ...` with 0-based ids. A line without labels starts with
whitespace or directly with an `f:v` token; an empty line is an example with
neither. Every error is a ValueError naming the file and the 1-based line.
"""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import scipy.sparse as sp

_MAX_SIZE = 2**31 - 1  # ids are stored as int32 (CSR indices, padded rows), so N, D and L are at most this


def read_xmc(path) -> Tuple[sp.csr_matrix, sp.csr_matrix]:
    """Read an XMC repository file -> (X float32 CSR [N, D], Y binary float32 CSR [N, L]).

    Rows are canonical CSR (sorted ids); explicit zero feature values are
    dropped; repeated label ids on a line collapse to one; a repeated feature
    id is an error (its value would be ambiguous).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"{path}:1: empty file (expected a header 'N D L')")
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline terminates the last line, it does not start a new one
        lines.pop()
    n, d, n_labels = _parse_header(path, lines[0])
    body = lines[1:]
    if len(body) != n:
        where = n + 2 if len(body) > n else len(lines) + 1
        raise ValueError(f"{path}:{where}: header says {n} examples, file has {len(body)} example lines")

    label_ids, label_rows, cols, vals, feat_rows = [], [], [], [], []
    for i, line in enumerate(body):
        lineno = i + 2
        toks = line.split()
        if toks and not line[0].isspace() and ":" not in toks[0]:
            for t in toks[0].split(","):
                label_ids.append(_parse_id(path, lineno, t, n_labels, "label"))
            label_rows.extend([i] * (len(label_ids) - len(label_rows)))
            toks = toks[1:]
        for t in toks:
            c, sep, v = t.partition(":")
            if not sep:
                raise ValueError(f"{path}:{lineno}: malformed feature token {t!r} (expected id:value)")
            cols.append(_parse_id(path, lineno, c, d, "feature"))
            try:
                vals.append(float(v))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: non-numeric feature value in {t!r}") from None
        feat_rows.extend([i] * (len(cols) - len(feat_rows)))

    feat_rows = np.asarray(feat_rows, np.int64)
    with np.errstate(over="ignore"):
        vals = np.asarray(vals, np.float64).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(vals))
    if bad.size:
        raise ValueError(f"{path}:{feat_rows[bad[0]] + 2}: feature value is NaN, Inf or beyond float32")
    feat_rows, cols, vals, repeated = _sorted_entries(feat_rows, np.asarray(cols, np.int64), vals, d)
    if repeated.any():
        raise ValueError(f"{path}:{feat_rows[repeated][0] + 2}: a feature id appears more than once")
    X = _csr(feat_rows, cols, vals, (n, d))
    X.eliminate_zeros()
    label_rows, labels, ones, repeated = _sorted_entries(
        np.asarray(label_rows, np.int64), np.asarray(label_ids, np.int64), np.ones(len(label_ids), np.float32),
        n_labels)
    keep = ~repeated
    Y = _csr(label_rows[keep], labels[keep], ones[keep], (n, n_labels))
    return X, Y


def write_xmc(path, X, Y) -> None:
    """Write (X [N, D], Y [N, L]) in the repository format that `read_xmc` reads.

    Nonzero entries of Y are the labels; values are written with 9 significant
    digits, enough to round-trip float32.
    """
    X, Y = sp.csr_matrix(X, dtype=np.float32, copy=True), sp.csr_matrix(Y, copy=True)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows, Y has {Y.shape[0]}")
    for M in (X, Y):
        M.eliminate_zeros()
        M.sort_indices()
    out = [f"{X.shape[0]} {X.shape[1]} {Y.shape[1]}"]
    for i in range(X.shape[0]):
        labs = ",".join(map(str, Y.indices[Y.indptr[i]:Y.indptr[i + 1]].tolist()))
        s, e = X.indptr[i], X.indptr[i + 1]
        feats = " ".join(f"{c}:{v:.9g}" for c, v in zip(X.indices[s:e].tolist(), X.data[s:e].tolist()))
        # A label-less line with features starts with a space; one with neither stays empty.
        out.append(f"{labs} {feats}" if feats else labs)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def _parse_int(token: str) -> int:
    """A decimal integer: ASCII digits with an optional '-' (int() alone also takes '1_0' or non-ASCII digits)."""
    if not (token.isascii() and token.removeprefix("-").isdigit()):
        raise ValueError(token)
    return int(token)


def _parse_header(path: str, line: str) -> Tuple[int, int, int]:
    fields = line.split()
    try:
        if len(fields) != 3:
            raise ValueError
        n, d, n_labels = (_parse_int(x) for x in fields)
    except ValueError:
        raise ValueError(f"{path}:1: bad header {line[:80]!r} (expected three integers 'N D L')") from None
    if not 0 < min(n, d, n_labels) <= max(n, d, n_labels) <= _MAX_SIZE:
        raise ValueError(f"{path}:1: header fields must be positive and at most 2^31 - 1 (ids are int32), "
                         f"got {line.strip()[:80]!r}")
    return n, d, n_labels


def _parse_id(path: str, lineno: int, token: str, size: int, what: str) -> int:
    try:
        i = _parse_int(token)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: bad {what} id {token[:40]!r} (expected an integer)") from None
    if not 0 <= i < size:
        raise ValueError(f"{path}:{lineno}: {what} id {token[:40]} out of range [0, {size})")
    return i


def _sorted_entries(rows, cols, vals, n_cols):
    """COO triplets sorted by (row, col), plus a mask of entries repeating their predecessor."""
    order = np.argsort(rows * n_cols + cols, kind="stable")
    rows, cols, vals = rows[order], cols[order], vals[order]
    repeated = np.zeros(rows.size, bool)
    repeated[1:] = (rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])
    return rows, cols, vals, repeated


def _csr(rows, cols, vals, shape) -> sp.csr_matrix:
    """CSR from (row, col)-sorted, duplicate-free COO triplets."""
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))])
    M = sp.csr_matrix((vals.astype(np.float32), cols.astype(np.int32), indptr.astype(np.int32)), shape=shape)
    M.has_sorted_indices = True
    return M
