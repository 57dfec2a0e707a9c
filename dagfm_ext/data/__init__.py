"""Data: the feature schema, the shared field embedding, the encoded container and the datasets.

  * ``schema``     fields, vocabularies, the slot layout; ``FeatureSchema.encode`` at inference
  * ``embedding``  ``FieldEmbedding``, one table for all fields
  * ``container``  ``TabularData`` (encoded rows, labels, split) and its batches
  * ``batches``    batches: contiguous blocks of memory-mapped splits, shuffled by block
  * ``prefetch``   a background thread that assembles the next batches during the step
  * ``formats``, ``spec``   how raw Criteo, Avazu and spec-described tables become fields
  * ``preprocess`` the columnar preprocessing (pyarrow) of those files; ``chunks`` reads them in
                   parallel chunks, ``int_buckets`` buckets integer columns at once
  * ``derive``     named derivations (Avazu's hour -> hour-of-day, weekday), kept in the schema
  * ``cache``      the per-user cache directory and the preprocessed-data cache
  * ``movielens``, ``synthetic``: the in-memory datasets
  * ``datasets``   ``load_dataset``: any of them by name
  * ``command``    ``dagfm-ext preprocess``

Splits are a seeded random permutation cut 80/10/10 (train/val/test), or given files.

Names are loaded on first use, so that a serving process that needs only the schema does not
import the preprocessing stack (pyarrow) or the dataset loaders.
"""
from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_EXPORTS = {
    "cache_dir": "cache", "TabularData": "container", "split_indices": "container", "Prefetcher": "prefetch",
    "load_criteo": "datasets", "load_dataset": "datasets", "FieldEmbedding": "embedding",
    "fetch_ml100k": "movielens", "load_ml100k": "movielens", "read_ml100k_dir": "movielens",
    "DataFormatError": "schema", "FeatureSchema": "schema", "FieldSpec": "schema", "criteo_int_bucket": "schema",
    "make_synthetic": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
