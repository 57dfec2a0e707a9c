"""What a raw table looks like: its file layout, its label column, and how each field's tokens are
made from the raw columns. The preprocessing (``preprocess.py``) and the row-by-row error locator
read a file through one of these descriptions.

Built in: Criteo (``criteo_format``) and Avazu (``avazu_format``); a generic CSV/TSV/Parquet file is
described by a JSON spec (``spec.py``).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

from .derive import DERIVATIONS, hour_of_day, weekday
from .schema import DataFormatError, FieldSpec, criteo_int_bucket

__all__ = ["Column", "TableFormat", "criteo_format", "avazu_format", "integer_token", "locate_error",
           "CRITEO_INT", "CRITEO_CAT", "AVAZU_COLUMNS"]

LABELS = ("0", "1")
CRITEO_INT = [f"I{i}" for i in range(1, 14)]
CRITEO_CAT = [f"C{i}" for i in range(1, 27)]
AVAZU_COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category",
                 "app_id", "app_domain", "app_category", "device_id", "device_ip", "device_model",
                 "device_type", "device_conn_type"] + [f"C{i}" for i in range(14, 22)]


def integer_token(raw: str) -> str:
    """The vocabulary key of a raw integer (empty: missing), as ``FieldSpec.token`` makes it."""
    return "" if raw == "" else str(criteo_int_bucket(int(raw)))


@dataclass
class Column:
    """One field of the schema, made from the raw column ``source``. ``derive`` maps a raw value to
    its token (None: the value is the token); it raises ValueError on a malformed value, which
    the error message describes as ``expects``."""
    name: str
    source: str
    kind: str = "categorical"
    min_count: int = 1
    sep: Optional[str] = None
    max_len: Optional[int] = None  # multi: None = the longest list in the data
    derive: Optional[Callable[[str], str]] = None
    expects: str = ""

    def field_spec(self, max_len: int = 1) -> FieldSpec:
        # A named derivation travels with the schema, so raw rows at inference are derived too.
        named = self.derive is not None and self.derive.__name__ in DERIVATIONS
        return FieldSpec(self.name, kind=self.kind, min_count=self.min_count,
                         max_len=max_len if self.kind == "multi" else 1, sep=self.sep,
                         source=self.source if named else None, derive=self.derive.__name__ if named else None)

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "kind": self.kind, "min_count": self.min_count,
                "sep": self.sep, "max_len": self.max_len,
                "derive": None if self.derive is None else self.derive.__name__}


@dataclass
class TableFormat:
    """A delimited text file (``delimiter``; a header line unless ``columns`` names them) or a
    Parquet file (``delimiter`` None); ``label`` holds 0/1."""
    name: str
    label: str
    fields: List[Column]
    delimiter: Optional[str] = "\t"
    columns: Optional[List[str]] = None
    quoted: bool = False
    user_field: Optional[str] = None
    layout: str = ""  # how an error message names the columns (default: their names)

    @property
    def parquet(self) -> bool:
        return self.delimiter is None

    @property
    def sources(self) -> List[str]:
        """The raw columns the preprocessing reads: the label, then each field's source once."""
        out = [self.label]
        for c in self.fields:
            if c.source not in out:
                out.append(c.source)
        return out

    @property
    def integer_sources(self) -> List[str]:
        """The raw columns every field of which is an integer bucketed by ``integer_token``: the
        parser may read them as int64."""
        return [s for s in self.sources[1:]
                if all(c.derive is integer_token for c in self.fields if c.source == s)]

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "delimiter": self.delimiter, "columns": self.columns,
                "quoted": self.quoted, "user_field": self.user_field, "fields": [c.describe() for c in self.fields]}


def criteo_format(min_count: int = 10) -> TableFormat:
    fields = ([Column(n, n, kind="integer", derive=integer_token, expects="an integer or empty")
               for n in CRITEO_INT] +
              [Column(n, n, min_count=min_count) for n in CRITEO_CAT])
    return TableFormat("criteo", "label", fields, columns=["label"] + CRITEO_INT + CRITEO_CAT,
                       layout="label, I1-I13, C1-C26")


def avazu_format(min_count: int = 10) -> TableFormat:
    """Avazu's CSV with its header; ``hour`` (YYMMDDHH) becomes hour-of-day and weekday fields."""
    fields = [Column("hour", "hour", derive=hour_of_day, expects="YYMMDDHH"),
              Column("weekday", "hour", derive=weekday, expects="YYMMDDHH")]
    fields += [Column(n, n, min_count=min_count) for n in AVAZU_COLUMNS[3:]]
    return TableFormat("avazu", "click", fields, delimiter=",")


# --------------------------------------------------------------------------------------------
# the row-by-row check that names the file and line of the first malformed row
# --------------------------------------------------------------------------------------------

def _text_rows(path: Path, fmt: TableFormat) -> Iterator[Tuple[int, List[str]]]:
    with open(path, "r", encoding="utf-8", errors="replace", newline=None) as f:
        if fmt.quoted:
            reader = csv.reader(f, delimiter=fmt.delimiter)
            for parts in reader:
                if parts:
                    yield reader.line_num, parts
            return
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line:
                yield lineno, line.split(fmt.delimiter)


def row_problem(fmt: TableFormat, names: List[str], parts: List[str]) -> Optional[str]:
    """What is wrong with one row of a delimited file (None: nothing)."""
    if len(parts) != len(names):
        kind = "tab-separated" if fmt.delimiter == "\t" else f"{fmt.delimiter!r}-separated"
        what = fmt.layout or ", ".join(names)
        return f"expected {len(names)} {kind} columns ({what}), got {len(parts)}"
    row = dict(zip(names, parts))
    if row[fmt.label] not in LABELS:
        return f"{fmt.label}: expected 0 or 1, got {row[fmt.label]!r}"
    for c in fmt.fields:
        if c.derive is not None:
            try:
                c.derive(row[c.source])
            except ValueError:
                return f"{c.source}: expected {c.expects}, got {row[c.source]!r}"
    return None


def locate_error(path: Path, fmt: TableFormat) -> Optional[DataFormatError]:
    """The first malformed row of a delimited file as a DataFormatError naming file and line."""
    names = fmt.columns
    for lineno, parts in _text_rows(path, fmt):
        if names is None:
            names = parts
            missing = [c for c in fmt.sources if c not in names]
            if missing:
                return DataFormatError(f"{path}:{lineno}: header: missing columns {missing}")
            continue
        problem = row_problem(fmt, names, parts)
        if problem:
            return DataFormatError(f"{path}:{lineno}: {problem}")
    return None


def read_header(path: Path, fmt: TableFormat) -> List[str]:
    """The column names of a delimited file: ``fmt.columns`` or its first line."""
    if fmt.columns is not None:
        return list(fmt.columns)
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as f:
        first = f.readline()
    names = next(csv.reader(io.StringIO(first), delimiter=fmt.delimiter)) if fmt.quoted else \
        first.rstrip("\r\n").split(fmt.delimiter)
    missing = [c for c in fmt.sources if c not in names]
    if missing:
        raise DataFormatError(f"{path}:1: header: missing columns {missing}, got {names}")
    return names
