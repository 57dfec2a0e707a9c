"""The dataset names the command line and a run's config accept (no loading: cheap to import)."""
from __future__ import annotations

__all__ = ["FILE_KINDS", "DATASET_HELP", "check_dataset"]

FILE_KINDS = ("criteo", "avazu", "spec")
DATASET_HELP = "'ml-100k', 'synthetic', 'criteo:PATH', 'avazu:PATH' or 'spec:SPEC.json'"


def check_dataset(value: str) -> str:
    """``value`` if it names a dataset, else ValueError saying what is expected."""
    kind, _, path = value.partition(":")
    if value in ("ml-100k", "synthetic") or (kind in FILE_KINDS and path):
        return value
    raise ValueError(f"dataset: expected {DATASET_HELP}, got {value!r}")
