"""Write a Criteo-format TSV (label, I1-I13, C1-C26) with power-law categories, missing values
and a planted signal, for benchmarks and tests of the preprocessing at realistic sizes.

    python scripts/make_criteo_sample.py --rows 1000000 --output criteo_1m.tsv

Categories are 8-hex-digit tokens drawn from a Zipf law over vocabularies of 10 to 1,000,000
values; the label is drawn from a logistic model of an integer feature, two categories and their
product, so a model has something to learn.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
CARDINALITIES = [10 ** (1 + (k * 5) // 25) for k in range(26)]  # 10 .. 1,000,000
MISSING_INT = [0.0, 0.0, 0.2, 0.2, 0.02, 0.2, 0.04, 0.0, 0.04, 0.45, 0.04, 0.75, 0.2]
MISSING_CAT = [0.0] * 18 + [0.45, 0.45, 0.0, 0.75, 0.0, 0.04, 0.45, 0.45]


def hex_tokens(values: np.ndarray) -> np.ndarray:
    """uint32 -> fixed-width 8-character hex strings (vectorised)."""
    v = values.astype(np.uint32)
    nibbles = (v[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & 0xF
    return np.ascontiguousarray(HEX[nibbles]).view("S8").ravel()


def make_chunk(rng: np.random.Generator, n: int) -> pa.Table:
    cols, ids = {}, []
    effect = np.zeros(n)
    for k in range(13):
        v = np.floor(rng.lognormal(1.0 + 0.3 * k, 1.2, size=n)).astype(np.int64) - (k == 1)
        if k == 0:
            effect += 0.3 * np.log1p(np.maximum(v, 0)) - 0.5
        mask = rng.random(n) < MISSING_INT[k]
        cols[f"I{k + 1}"] = pa.array(v, mask=mask).cast(pa.string())
    for k, card in enumerate(CARDINALITIES):
        raw = np.minimum(rng.zipf(1.15, size=n), card) - 1  # heavy head, long tail
        ids.append(raw)
        token = hex_tokens((raw * 2654435761 + k * 97) & 0xFFFFFFFF)
        mask = rng.random(n) < MISSING_CAT[k]
        cols[f"C{k + 1}"] = pa.array(token.astype(str), mask=mask)
    z1, z2 = np.cos(ids[0] * 1.7), np.sin(ids[2] * 0.9)
    effect += 0.8 * z1 + 0.6 * z2 + 1.2 * z1 * z2 - 1.0
    label = (rng.random(n) < 1 / (1 + np.exp(-effect))).astype(np.int8)
    return pa.table({"label": pa.array(label).cast(pa.string()), **cols})


def write(path: Path, rows: int, seed: int = 0, chunk: int = 250_000) -> None:
    rng = np.random.default_rng(seed)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with pacsv.CSVWriter(path, make_chunk(rng, 0).schema, write_options=options) as w:
        for start in range(0, rows, chunk):
            w.write_table(make_chunk(rng, min(chunk, rows - start)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows to write (default: %(default)s)")
    p.add_argument("--output", type=Path, required=True, help="the TSV file to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error(f"--rows: expected a positive count, got {args.rows}")
    write(args.output, args.rows, args.seed)
    print(f"wrote {args.rows:,} rows to {args.output} ({args.output.stat().st_size / 2**20:.0f} MiB)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
