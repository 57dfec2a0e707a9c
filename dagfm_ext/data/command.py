"""``dagfm-ext preprocess``: encode a raw dataset into the cache ahead of training."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

__all__ = ["add_cache_argument", "build_parser", "main"]


def add_cache_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where preprocessed data is kept (default: $DAGFM_EXT_CACHE, else "
                        "$XDG_CACHE_HOME/dagfm_ext, else ~/.cache/dagfm_ext)")


def _file_dataset(value: str) -> str:
    from .names import check_dataset
    try:
        check_dataset(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value in ("ml-100k", "synthetic"):
        raise argparse.ArgumentTypeError(f"expected 'criteo:PATH', 'avazu:PATH' or 'spec:SPEC.json' "
                                         f"(only files are preprocessed), got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dagfm-ext preprocess",
                                description="Encode a raw dataset into the cache that 'dagfm-ext run' reads, "
                                            "so the first training run starts at once.")
    p.add_argument("--dataset", required=True, type=_file_dataset, metavar="{criteo:PATH,avazu:PATH,spec:SPEC.json}",
                   help="the raw data; a JSON spec describes a generic CSV/TSV/Parquet file")
    p.add_argument("--min-count", type=int, default=10,
                   help="Criteo/Avazu: categories seen fewer times become out-of-vocabulary (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2022, help="seed of the random 8:1:1 split; use the seed "
                   "you will train with (default: %(default)s)")
    add_cache_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from .datasets import preprocessed_entry, resolve
    from .schema import DataFormatError
    t0 = time.perf_counter()
    try:
        fmt, sources = resolve(args.dataset, args.min_count)
        entry = preprocessed_entry(args.dataset, fmt, sources, seed=args.seed, cache_dir=args.cache_dir,
                                   progress=not args.quiet)
    except (ValueError, FileNotFoundError, DataFormatError) as e:
        print(f"dagfm-ext preprocess: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    rows = entry["rows"]
    sizes = ", ".join(f"{s} {b - a:,}" for s, (a, b) in entry["splits"].items())
    if entry["built"]:
        print(f"preprocessed {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s): {sizes}")
    else:
        print(f"already preprocessed ({rows:,} rows: {sizes}), ready in {seconds:.2f} s")
    print(f"cache: {entry['path']}")
    return 0
