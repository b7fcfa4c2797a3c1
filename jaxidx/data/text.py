"""Raw text beside XMC features, as token ids for a text encoder.

A data set directory may hold the text each row was made from; debian-depends
does (`packages.tsv` with name and short description per package, and
`train_packages.txt` / `test_packages.txt` naming each row's package). The
text is the same the tf-idf features were computed from (lower-cased name and
short description), so a text encoder sees no extra information.

Tokens: lower-cased runs of letters and digits. The vocabulary holds the
training tokens seen at least `min_count` times, most frequent first (ties by
token), after the reserved ids PAD = 0 and UNK = 1; rows are cut or padded to
`max_len` tokens.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

PAD, UNK = 0, 1
_TOKEN = re.compile(r"[a-z0-9]+")
PACKAGE_COLUMNS = ("package", "section", "short_description")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def build_vocab(texts: Sequence[str], min_count: int = 2) -> dict[str, int]:
    """token -> id (from 2 on) for the tokens of `texts` seen at least `min_count` times."""
    counts = collections.Counter(t for text in texts for t in tokenize(text))
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return {t: i + 2 for i, t in enumerate(kept)}


def encode(texts: Sequence[str], vocab: dict[str, int], max_len: int) -> np.ndarray:
    """int32 [n, max_len] token ids (UNK for unknown tokens, PAD after the end)."""
    out = np.full((len(texts), max_len), PAD, np.int32)
    for i, text in enumerate(texts):
        ids = [vocab.get(t, UNK) for t in tokenize(text)[:max_len]]
        out[i, :len(ids)] = ids
    return out


def read_package_texts(d: Path, split: str) -> Optional[list[str]]:
    """The text of each row of `split` ('train' | 'test') from a package table, or None if `d` has none.

    Every row's package must be in `packages.tsv`; errors name the file and line.
    """
    names_path, table_path = d / f"{split}_packages.txt", d / "packages.tsv"
    if not names_path.is_file() or not table_path.is_file():
        return None
    texts = {}
    with open(table_path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        missing = [c for c in PACKAGE_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{table_path}:1: header lacks the column(s) {', '.join(missing)}")
        name_col, desc_col = header.index("package"), header.index("short_description")
        for line_no, line in enumerate(f, start=2):
            cols = line.rstrip("\n").split("\t")
            if len(cols) != len(header):
                raise ValueError(f"{table_path}:{line_no}: {len(cols)} tab-separated fields, "
                                 f"the header has {len(header)}")
            texts[cols[name_col]] = f"{cols[name_col]} {cols[desc_col]}"
    rows = []
    with open(names_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            name = line.rstrip("\n")
            if name not in texts:
                raise ValueError(f"{names_path}:{line_no}: package {name!r} is not in {table_path.name}")
            rows.append(texts[name])
    return rows
