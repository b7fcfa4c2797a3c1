"""8-bit scalar quantization (SQ8) of an index's rows, for the `sq8_search` kernel (kernels/sq8.cpp).

One byte per dimension: u = rint((x - lo) / scale) clipped to [0, 255], with lo and scale = (max - min) / 255
per dimension from the rows (scale 1 where a dimension is constant); rows are padded with zero bytes to a
multiple of 32. Four times smaller than the float rows and scored by integer dot
products (AVX-512 VNNI or AVX2), where 4-bit PQ needs lookup tables and a coarser code: the simpler
alternative for short scans (few candidates per query), whose exact re-rank then reads only `reorder` rows.
The scores' definition (query weights rounded to 7 bits) is `reference.sq8_search`'s.
"""
from __future__ import annotations

import numpy as np

PAD = 32      # code bytes per row: a multiple of this (one AVX2 register)
LEVELS = 255  # codes 0..255


def fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, scale) float32 [d]: each dimension's range over the rows x [n, d] split into 255 steps."""
    if len(x) == 0:
        raise ValueError("sq8.fit: no rows to take the ranges from")
    lo, hi = x.min(0).astype(np.float32), x.max(0).astype(np.float32)
    scale = (hi - lo) / np.float32(LEVELS)
    return lo, np.where(scale > 0, scale, np.float32(1)).astype(np.float32)


def encode(x: np.ndarray, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Codes uint8 [n, ceil(d / 64) * 64] of rows x [n, d] (rows outside the fitted range are clipped)."""
    n, d = x.shape
    codes = np.zeros((n, -(-d // PAD) * PAD), np.uint8)
    codes[:, :d] = np.clip(np.rint((x - lo) / scale), 0, LEVELS)
    return codes


def row_terms(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """|scale * u|^2 per row [n] float32: the l2 score's row term (the decoded row's offset-free norm)."""
    v = codes[:, :len(scale)].astype(np.float64) * scale
    return np.einsum("nd,nd->n", v, v).astype(np.float32)


def store(arrays: dict, x: np.ndarray, metric: str) -> None:
    """Codes of the rows x (in the index's row order) into an index's arrays: `sq8_codes`, `sq8_lo`,
    `sq8_scale`, and for l2 `sq8_terms`."""
    lo, scale = fit(x)
    arrays.update(sq8_codes=encode(x, lo, scale), sq8_lo=lo, sq8_scale=scale)
    arrays.pop("sq8_terms", None)
    if metric == "l2":
        arrays["sq8_terms"] = row_terms(arrays["sq8_codes"], scale)


def insert(arrays: dict, at: np.ndarray, x: np.ndarray) -> None:
    """Codes of new rows x (the fitted ranges kept) inserted before rows `at` (np.insert's rule)."""
    codes = encode(x, arrays["sq8_lo"], arrays["sq8_scale"])
    arrays["sq8_codes"] = np.insert(arrays["sq8_codes"], at, codes, axis=0)
    if "sq8_terms" in arrays:
        arrays["sq8_terms"] = np.insert(arrays["sq8_terms"], at, row_terms(codes, arrays["sq8_scale"]))


def keep(arrays: dict, rows: np.ndarray) -> None:
    """Only the codes of the kept rows (a bool mask over the index's rows)."""
    arrays["sq8_codes"] = np.ascontiguousarray(arrays["sq8_codes"][rows])
    if "sq8_terms" in arrays:
        arrays["sq8_terms"] = arrays["sq8_terms"][rows]


CODES = ("pq4", "sq8")  # a setting's `codes`: which codes `reorder` > 0 scans


def codes_of(setting: dict, where: str = "search") -> str:
    """A search setting's `codes` (default 'pq4'), checked against CODES (`where` names it in the error)."""
    codes = setting.get("codes", "pq4")
    if codes not in CODES:
        raise ValueError(f"{where}: codes={codes!r} must be one of {', '.join(CODES)}")
    return codes


def check_config(config) -> None:
    """`index.sq8` (store 8-bit codes) and the search settings' `codes` ('sq8' needs them)."""
    held = bool(config.get("index", {}).get("sq8", False))  # absent from configs saved before 8-bit codes
    for s in config.search.settings:
        if codes_of(s, "search.settings") == "sq8" and not held:
            raise ValueError("search.settings: codes='sq8' scans 8-bit codes; set index.sq8=True")
