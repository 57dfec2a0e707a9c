"""A generic CSV/TSV/Parquet dataset described by a small JSON feature spec::

    {"format": "csv",                     # csv | tsv | parquet
     "files": "clicks.csv",               # or {"train": ..., "valid": ..., "test": ...}
     "label": "clicked",                  # a 0/1 column
     "user_field": "user",                # optional: the field gAUC groups by
     "min_count": 2,                      # optional default for the fields (1)
     "columns": ["clicked", "user", ...], # optional: the column names of a file without a header
     "fields": [{"name": "user"},
                {"name": "age", "kind": "integer"},                 # bucketed like Criteo's I1-I13
                {"name": "tags", "kind": "multi", "sep": "|", "max_len": 5},
                {"name": "city", "source": "city_name", "min_count": 5}]}

Relative file paths are relative to the spec file. One file is split at random 8:1:1 by the seed;
with train/valid/test files the vocabularies are built on the training file only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

from .formats import Column, TableFormat, integer_token
from .preprocess import Source

__all__ = ["load_spec"]

DELIMITERS = {"csv": ",", "tsv": "\t", "parquet": None}
FIELD_KEYS = {"name", "source", "kind", "min_count", "sep", "max_len"}


def _fail(path, what: str):
    raise ValueError(f"dataset spec {path}: {what}")


def _column(path, f, default_min: int) -> Column:
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        _fail(path, f"fields: expected objects with a 'name', got {f!r}")
    unknown = set(f) - FIELD_KEYS
    if unknown:
        _fail(path, f"field {f['name']!r}: unknown keys {sorted(unknown)}; expected some of {sorted(FIELD_KEYS)}")
    kind = f.get("kind", "categorical")
    if kind not in ("categorical", "integer", "multi"):
        _fail(path, f"field {f['name']!r}: kind: expected 'categorical', 'integer' or 'multi', got {kind!r}")
    min_count = f.get("min_count", default_min)
    if not isinstance(min_count, int) or min_count < 1:
        _fail(path, f"field {f['name']!r}: min_count: expected a positive int, got {min_count!r}")
    max_len = f.get("max_len")
    if max_len is not None and (kind != "multi" or not isinstance(max_len, int) or max_len < 1):
        _fail(path, f"field {f['name']!r}: max_len: expected a positive int on a 'multi' field, got {max_len!r}")
    sep = f.get("sep")
    if sep is not None and (kind != "multi" or not isinstance(sep, str) or not sep):
        _fail(path, f"field {f['name']!r}: sep: expected a non-empty string on a 'multi' field, got {sep!r}")
    integer = kind == "integer"
    return Column(f["name"], f.get("source", f["name"]), kind=kind, min_count=min_count, sep=sep, max_len=max_len,
                  derive=integer_token if integer else None, expects="an integer or empty" if integer else "")


def load_spec(path) -> Tuple[TableFormat, List[Source]]:
    """The table format and the input files a spec file describes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec: no such file: {path}")
    try:
        spec = json.loads(path.read_text())
    except ValueError as e:
        _fail(path, f"not valid JSON ({e})")
    if not isinstance(spec, dict):
        _fail(path, "expected a JSON object")
    kind = spec.get("format")
    if kind not in DELIMITERS:
        _fail(path, f"format: expected one of {sorted(DELIMITERS)}, got {kind!r}")
    if not isinstance(spec.get("label"), str):
        _fail(path, "label: expected the name of the 0/1 label column")
    fields = spec.get("fields")
    if not isinstance(fields, list) or not fields:
        _fail(path, "fields: expected a non-empty list")
    default_min = spec.get("min_count", 1)
    columns = [_column(path, f, default_min) for f in fields]
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        _fail(path, f"fields: duplicate names in {names}")
    user = spec.get("user_field")
    if user is not None and user not in names:
        _fail(path, f"user_field: expected one of the fields {names}, got {user!r}")
    header = spec.get("columns")
    if header is not None and (not isinstance(header, list) or not all(isinstance(c, str) for c in header)):
        _fail(path, "columns: expected a list of column names")
    files = spec.get("files")
    if isinstance(files, str):
        sources = [Source(path.parent / files)]
    elif isinstance(files, dict) and set(files) == {"train", "valid", "test"}:
        sources = [Source(path.parent / files[k], split) for k, split in
                   (("train", "train"), ("valid", "val"), ("test", "test"))]
    else:
        _fail(path, f"files: expected a file name or {{'train', 'valid', 'test'}} file names, got {files!r}")
    for s in sources:
        if not s.path.is_file():
            raise FileNotFoundError(f"spec {path}: no such file: {s.path}")
    fmt = TableFormat(f"spec-{path.stem}", spec["label"], columns, delimiter=DELIMITERS[kind], columns=header,
                      quoted=kind == "csv", user_field=user)
    return fmt, sources
