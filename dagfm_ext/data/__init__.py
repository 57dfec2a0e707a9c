"""Data: the feature schema, the shared field embedding, the encoded container and the datasets.

  * ``schema``     fields, vocabularies, the slot layout; ``FeatureSchema.encode`` at inference
  * ``embedding``  ``FieldEmbedding``, one table for all fields
  * ``container``  ``TabularData`` (encoded rows, labels, split) and its batches
  * ``batches``    batches: contiguous blocks of memory-mapped splits, shuffled by block
  * ``prefetch``   a background thread that assembles the next batches during the step
  * ``formats``, ``spec``   how raw Criteo, Avazu and spec-described tables become fields
  * ``preprocess`` the columnar preprocessing (pyarrow) of those files
  * ``cache``      the per-user cache directory and the preprocessed-data cache
  * ``movielens``, ``synthetic``: the in-memory datasets
  * ``datasets``   ``load_dataset``: any of them by name
  * ``command``    ``dagfm-ext preprocess``

Splits are a seeded random permutation cut 80/10/10 (train/val/test), or given files.
"""
from __future__ import annotations

from .cache import cache_dir
from .container import TabularData, split_indices
from .prefetch import Prefetcher
from .datasets import load_criteo, load_dataset
from .embedding import FieldEmbedding
from .movielens import fetch_ml100k, load_ml100k, read_ml100k_dir
from .schema import DataFormatError, FeatureSchema, FieldSpec, criteo_int_bucket
from .synthetic import make_synthetic

__all__ = ["FieldSpec", "FeatureSchema", "FieldEmbedding", "TabularData", "DataFormatError",
           "cache_dir", "fetch_ml100k", "read_ml100k_dir", "load_ml100k", "load_criteo",
           "make_synthetic", "load_dataset", "criteo_int_bucket", "split_indices", "Prefetcher"]

