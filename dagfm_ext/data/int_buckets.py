"""``integer_token`` over a whole column at once (Criteo's I1-I13 and a spec's 'integer' fields).

``criteo_int_bucket`` is non-decreasing and steps by at most one, so for v >= 3 the bucket is 3
plus the number of thresholds (the smallest v of each later bucket) at or below v. The thresholds
are found with ``criteo_int_bucket`` itself, so the buckets are exactly the row-by-row ones.
"""
from __future__ import annotations

import math
import threading
from typing import List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import criteo_int_bucket

__all__ = ["integer_tokens"]

_thresholds: List[int] = []  # _thresholds[j]: the smallest v with criteo_int_bucket(v) >= 4 + j
_extending = threading.Lock()


def _threshold(bucket: int, lo: int) -> int:
    """The smallest v > lo with criteo_int_bucket(v) >= bucket."""
    hi = max(lo + 1, int(math.exp(math.sqrt(bucket - 2))) + 2)
    while criteo_int_bucket(hi) < bucket:
        hi = 2 * hi
    while hi - lo > 1:  # criteo_int_bucket(lo) < bucket <= criteo_int_bucket(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if criteo_int_bucket(mid) >= bucket else (mid, hi)
    return hi


def _thresholds_up_to(value: int) -> np.ndarray:
    last = criteo_int_bucket(max(value, 3))
    with _extending:
        while 4 + len(_thresholds) <= last:
            _thresholds.append(_threshold(4 + len(_thresholds), _thresholds[-1] if _thresholds else 3))
        return np.asarray(_thresholds, np.int64)


def integer_tokens(raw: pa.Array) -> Optional[pa.Array]:
    """The token of each raw value ("" when empty), or None when a value is not a plain decimal
    int64 (the caller then takes the values one by one, with Python's ``int``)."""
    empty = pc.equal(raw, "")
    try:
        values = pc.cast(pc.if_else(empty, "0", raw), pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if len(values) == 0:
        return pa.array([], pa.string())
    thresholds = _thresholds_up_to(int(values.max()))
    buckets = np.where(values > 2, 3 + np.searchsorted(thresholds, values, side="right"), values)
    return pc.if_else(empty, "", pc.cast(pa.array(buckets), pa.string()))
