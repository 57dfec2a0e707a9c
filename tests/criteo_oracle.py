"""The row-by-row Criteo reader in plain Python: the reference the columnar preprocessing must
match encoding for encoding (same vocabularies, same ids, same split)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np

from dagfm_ext.data import DataFormatError, FeatureSchema, FieldSpec, TabularData, criteo_int_bucket, split_indices
from dagfm_ext.data.formats import CRITEO_CAT, CRITEO_INT


def _criteo_rows(path: Path) -> Iterator[Tuple[int, int, List[str]]]:
    """(line number, label, 39 tokens) for each row, validated; streams the file."""
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 40:
                raise DataFormatError(f"{path}:{lineno}: expected 40 tab-separated columns "
                                      f"(label, I1-I13, C1-C26), got {len(parts)}")
            if parts[0] not in ("0", "1"):
                raise DataFormatError(f"{path}:{lineno}: label: expected 0 or 1, got {parts[0]!r}")
            tokens = []
            for k in range(13):
                v = parts[1 + k]
                if v == "":
                    tokens.append("")
                    continue
                try:
                    tokens.append(str(criteo_int_bucket(int(v))))
                except ValueError:
                    raise DataFormatError(f"{path}:{lineno}: {CRITEO_INT[k]}: expected an integer "
                                          f"or empty, got {v!r}") from None
            tokens.extend(parts[14:])
            yield lineno, int(parts[0]), tokens


def load_criteo_rows(path, min_count: int = 10, seed: int = 2022) -> TabularData:
    """Criteo-format TSV (label, I1-I13, C1-C26), streamed in two passes (counts, then encode),
    rows in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"criteo: no such file: {path}")
    if min_count < 1:
        raise ValueError(f"min_count: expected >= 1, got {min_count}")
    fields = ([FieldSpec(n, kind="integer") for n in CRITEO_INT] +
              [FieldSpec(n, kind="categorical", min_count=min_count) for n in CRITEO_CAT])
    counts = [Counter() for _ in fields]
    n = 0
    for _, _, tokens in _criteo_rows(path):
        for c, t in zip(counts, tokens):
            c[t] += 1
        n += 1
    if n == 0:
        raise DataFormatError(f"{path}: no data rows")
    for f, c in zip(fields, counts):
        f.build_vocab(c)
    schema = FeatureSchema(fields)
    x = np.empty((n, 39), dtype=np.int32)
    y = np.empty(n, dtype=np.float32)
    vocabs = [f.vocab for f in fields]
    chunk, rows, start = 65536, [], 0
    for i, (_, label, tokens) in enumerate(_criteo_rows(path)):
        y[i] = label
        rows.append([v.get(t, 0) for v, t in zip(vocabs, tokens)])
        if len(rows) == chunk:
            x[start:start + chunk] = rows
            start, rows = start + chunk, []
    if rows:
        x[start:start + len(rows)] = rows
    return TabularData(f"criteo:{path}", schema, x, y, split_indices(n, seed))
