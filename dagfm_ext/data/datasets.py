"""``load_dataset``: the dataset named on the command line, from the preprocessing cache when
the raw files are unchanged.

  * ``ml-100k``      MovieLens-100K (downloaded once, see ``movielens.py``)
  * ``synthetic``    planted interactions (``synthetic.py``)
  * ``criteo:PATH``  Criteo-format TSV: label, I1-I13, C1-C26
  * ``avazu:PATH``   Avazu CSV with its header
  * ``spec:PATH``    a CSV/TSV/Parquet file described by a JSON feature spec (``spec.py``)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Sequence, Tuple

from .cache import build_or_open, cache_dir as default_cache_dir, entry_key
from .container import TabularData
from .formats import TableFormat, avazu_format, criteo_format
from .movielens import load_ml100k
from .names import DATASET_HELP, check_dataset
from .preprocess import SPLITS, Source, preprocess_files
from .schema import FeatureSchema
from .synthetic import make_synthetic

__all__ = ["load_dataset", "check_dataset", "resolve", "preprocessed_entry", "load_preprocessed", "load_criteo",
           "DATASET_HELP"]

def resolve(value: str, min_count: int = 10) -> Tuple[TableFormat, List[Source]]:
    """The format and files of a file-backed dataset name."""
    kind, _, path = check_dataset(value).partition(":")
    if kind == "spec":
        from .spec import load_spec
        return load_spec(path)
    if min_count < 1:
        raise ValueError(f"min_count: expected >= 1, got {min_count}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{kind}: no such file: {p}")
    return (criteo_format(min_count) if kind == "criteo" else avazu_format(min_count)), [Source(p)]


def preprocessed_entry(name: str, fmt: TableFormat, sources: Sequence[Source], seed: int = 2022,
                       cache_dir=None, progress: bool = False) -> dict:
    """The cache entry of these files and options (see ``cache.open_entry``), preprocessing the
    files first if the cache lacks it; ``built`` says which happened."""
    random_split = sources[0].split is None
    options = {"format": fmt.describe(), "splits": [s.split for s in sources], "seed": seed if random_split else None}
    key = entry_key([s.path for s in sources], options)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def build(tmp: Path) -> dict:
        bar = None
        if progress:
            from tqdm.auto import tqdm
            total = sum(s.path.stat().st_size for s in sources)
            # Drawn on a terminal only and cleared when done: logs and error output stay clean.
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"preprocessing {name}", file=sys.stderr,
                       leave=False, disable=None)
        try:
            meta = preprocess_files(sources, fmt, tmp, seed,
                                    progress=(lambda nbytes, rows: bar.update(nbytes)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
        meta["schema"] = meta["schema"].to_dict()
        meta.update(user_field=fmt.user_field, split_seed=seed if random_split else None, options=options)
        return meta

    return build_or_open(root / "preprocessed", f"{fmt.name}-{key}", build)


def load_preprocessed(name: str, fmt: TableFormat, sources: Sequence[Source], seed: int = 2022,
                      cache_dir=None, progress: bool = False) -> TabularData:
    """Encoded data from the cache, preprocessing the files first if the cache lacks them."""
    entry = preprocessed_entry(name, fmt, sources, seed, cache_dir, progress)
    splits = {s: range(*entry["splits"][s]) for s in SPLITS}
    return TabularData(name, FeatureSchema.from_dict(entry["schema"]), entry["x"], entry["y"], splits,
                       user_field=entry["user_field"], split_seed=entry["split_seed"])


def load_criteo(path, min_count: int = 10, seed: int = 2022, cache_dir=None) -> TabularData:
    """Criteo-format TSV (label, I1-I13, C1-C26): integer features bucketed by
    ``criteo_int_bucket``, categories seen fewer than ``min_count`` times (and missing values)
    mapped to id 0; preprocessed once into the cache, memory-mapped from there."""
    fmt, sources = resolve(f"criteo:{path}", min_count)
    return load_preprocessed(f"criteo:{path}", fmt, sources, seed=seed, cache_dir=cache_dir)


def load_dataset(spec: str, seed: int = 2022, min_count: int = 10, cache_dir=None,
                 synthetic_size: int = 20000, progress: bool = False) -> TabularData:
    """The dataset ``spec`` names (see the module docstring)."""
    if spec == "ml-100k":
        return load_ml100k(seed=seed)
    if spec == "synthetic":
        return make_synthetic(n=synthetic_size, seed=0, split_seed=seed)
    fmt, sources = resolve(spec, min_count)
    return load_preprocessed(spec, fmt, sources, seed=seed, cache_dir=cache_dir, progress=progress)
