"""Data: the feature schema, the shared field embedding, the encoded container and the datasets.

  * ``schema``     fields, vocabularies, the slot layout; ``FeatureSchema.encode`` at inference
  * ``embedding``  ``FieldEmbedding``, one table for all fields
  * ``container``  ``TabularData`` (encoded rows, labels, split) and its batches
  * ``cache``      the per-user cache directory
  * ``movielens``, ``criteo``, ``synthetic``: the datasets, chosen by ``load_dataset``

Splits are a seeded random permutation cut 80/10/10 (train/val/test).
"""
from __future__ import annotations

from .cache import cache_dir
from .container import TabularData, split_indices
from .criteo import load_criteo
from .embedding import FieldEmbedding
from .movielens import fetch_ml100k, load_ml100k, read_ml100k_dir
from .schema import DataFormatError, FeatureSchema, FieldSpec, criteo_int_bucket
from .synthetic import make_synthetic

__all__ = ["FieldSpec", "FeatureSchema", "FieldEmbedding", "TabularData", "DataFormatError",
           "cache_dir", "fetch_ml100k", "read_ml100k_dir", "load_ml100k", "load_criteo",
           "make_synthetic", "load_dataset", "criteo_int_bucket", "split_indices"]


def load_dataset(spec: str, seed: int = 2022, min_count: int = 10, work_dir=None,
                 synthetic_size: int = 20000) -> TabularData:
    """``ml-100k``, ``criteo:PATH`` or ``synthetic``."""
    if spec == "ml-100k":
        return load_ml100k(seed=seed)
    if spec == "synthetic":
        return make_synthetic(n=synthetic_size, seed=0, split_seed=seed)
    if isinstance(spec, str) and spec.startswith("criteo:"):
        return load_criteo(spec[len("criteo:"):], min_count=min_count, seed=seed, work_dir=work_dir)
    raise ValueError(f"dataset: expected 'ml-100k', 'criteo:PATH' or 'synthetic', got {spec!r}")
