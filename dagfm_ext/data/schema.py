"""The feature schema: fields, vocabularies and the slot layout of encoded rows.

Every sample is a row of integer *slots*: one slot per single-valued field and ``max_len`` slots
per multi-valued field (padding ``-1``). Within a field, id 0 is the out-of-vocabulary / missing
id and ids 1..n are the vocabulary. The schema is plain JSON-able data saved with every
checkpoint, so raw values are mapped the same way at inference (``FeatureSchema.encode``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from .derive import DERIVATIONS

__all__ = ["KINDS", "DataFormatError", "criteo_int_bucket", "FieldSpec", "FeatureSchema"]

KINDS = ("categorical", "multi", "integer")


class DataFormatError(ValueError):
    """A malformed input row; the message names the file and line."""


def criteo_int_bucket(value: int) -> int:
    """The public Criteo preprocessing of integer features: v > 2 -> ceil(ln(v)^2 + 1)."""
    return int(math.ceil(math.log(value) ** 2 + 1)) if value > 2 else value


@dataclass
class FieldSpec:
    """One field. ``kind``: 'categorical' (one token), 'multi' (up to ``max_len`` tokens,
    mean-pooled into one embedding) or 'integer' (bucketed with ``criteo_int_bucket`` first).
    ``vocab`` maps a raw token (str) to its id 1..n; anything else (or a token seen fewer than
    ``min_count`` times when the vocabulary was built) is id 0. ``sep`` splits the raw string of
    a 'multi' field (None: any whitespace). A derived field takes its raw value from the raw
    column ``source`` through the named function ``derive`` (see ``derive.DERIVATIONS``)."""
    name: str
    kind: str = "categorical"
    min_count: int = 1
    max_len: int = 1
    vocab: Dict[str, int] = field(default_factory=dict)
    sep: Optional[str] = None
    source: Optional[str] = None
    derive: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS} for field {self.name!r}, got {self.kind!r}")
        if self.kind != "multi" and self.max_len != 1:
            raise ValueError(f"max_len: only 'multi' fields may have max_len != 1 ({self.name!r})")
        if self.sep is not None and (self.kind != "multi" or not isinstance(self.sep, str) or not self.sep):
            raise ValueError(f"sep: only 'multi' fields take a separator, a non-empty string ({self.name!r})")
        if self.derive is not None and (self.kind != "categorical" or self.derive not in DERIVATIONS):
            raise ValueError(f"derive: expected one of {sorted(DERIVATIONS)} on a 'categorical' field "
                             f"({self.name!r}), got {self.derive!r}")

    @property
    def raw_column(self) -> str:
        """The raw column (or record key) this field's value comes from."""
        return self.source or self.name

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 1  # + the OOV id 0

    def token(self, raw) -> str:
        """The vocabulary key of one raw value (ValueError: a malformed value of a derived field)."""
        if self.derive is not None:
            return "" if raw is None else DERIVATIONS[self.derive][0](str(raw))
        if self.kind == "integer":
            if raw is None or raw == "":
                return ""
            return str(criteo_int_bucket(int(raw)))
        return "" if raw is None else str(raw)

    def build_vocab(self, counts: Mapping[str, int]) -> None:
        # Sorted by (-count, token) so the vocabulary does not depend on reading order.
        kept = sorted((t for t, c in counts.items() if c >= self.min_count and t != ""),
                      key=lambda t: (-counts[t], t))
        self.vocab = {t: i + 1 for i, t in enumerate(kept)}

    def split(self, raw) -> List[str]:
        """The tokens of one raw value of a 'multi' field."""
        if raw is None:
            return []
        return raw.split(self.sep) if isinstance(raw, str) else [str(t) for t in raw]

    def encode_one(self, raw) -> List[int]:
        if self.kind == "multi":
            tokens = self.split(raw)
            ids = [self.vocab.get(str(t), 0) for t in tokens[: self.max_len]] or [0]
            return ids + [-1] * (self.max_len - len(ids))
        return [self.vocab.get(self.token(raw), 0)]


class FeatureSchema:
    """An ordered list of fields; the slot layout of the encoded rows follows that order."""

    def __init__(self, fields: Sequence[FieldSpec]):
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"fields: duplicate names in {names}")
        self.fields = list(fields)

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def names(self) -> List[str]:
        return [f.name for f in self.fields]

    @property
    def num_slots(self) -> int:
        return sum(f.max_len for f in self.fields)

    def slot_fields(self) -> List[int]:
        """Field index of every slot."""
        return [i for i, f in enumerate(self.fields) for _ in range(f.max_len)]

    def encode(self, records: Iterable[Mapping[str, object]]) -> np.ndarray:
        """Map raw records (dicts by field name, a derived field's by its ``raw_column``; multi
        fields: list or space-separated str) to encoded rows (N, num_slots) int64, exactly as the
        training data was encoded."""
        rows = []
        for r in records:
            row: List[int] = []
            for f in self.fields:
                row += f.encode_one(r.get(f.raw_column))
            rows.append(row)
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), self.num_slots)

    def to_dict(self) -> dict:
        optional = ("sep", "source", "derive")
        return {"fields": [dict(name=f.name, kind=f.kind, min_count=f.min_count, max_len=f.max_len, vocab=f.vocab,
                                **{k: getattr(f, k) for k in optional if getattr(f, k) is not None})
                           for f in self.fields]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "FeatureSchema":
        return cls([FieldSpec(**f) for f in d["fields"]])

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path) -> "FeatureSchema":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}:{f.kind}[{f.vocab_size}]" for f in self.fields)
        return f"FeatureSchema({inner})"
