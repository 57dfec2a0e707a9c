"""``integer_token`` over a whole column at once (Criteo's I1-I13 and a spec's 'integer' fields).

``criteo_int_bucket`` is non-decreasing and steps by at most one, so for v >= 3 the bucket is 3
plus the number of thresholds (the smallest v of each later bucket) at or below v. The thresholds
are found with ``criteo_int_bucket`` itself, so the buckets are exactly the row-by-row ones.
Small values (the common case) take their bucket from a table instead of a binary search.

Arrow's integer parsing accepts what Python's ``int`` accepts, except hexadecimal ("0x1f"), which
``int`` rejects; a caller must keep such values away from it (``HEX_PREFIX``) so that they are
reported as malformed, as the row-by-row reader reports them.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .schema import criteo_int_bucket

__all__ = ["HEX_PREFIX", "integer_tokens", "integer_codes"]

HEX_PREFIX = "0x"  # in either case
_TABLE_SIZE = 1 << 16  # values below take their bucket from a table
_NEGATIVE = 64  # and so do the values down to -_NEGATIVE (each its own bucket)

_thresholds: List[int] = []  # _thresholds[j]: the smallest v with criteo_int_bucket(v) >= 4 + j
_threshold_array = np.zeros(0, np.int64)  # the same, as an array
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
    """At least the thresholds up to ``value``'s bucket."""
    global _threshold_array
    last = criteo_int_bucket(max(value, 3))
    if 4 + len(_threshold_array) > last:
        return _threshold_array
    with _extending:
        while 4 + len(_thresholds) <= last:
            _thresholds.append(_threshold(4 + len(_thresholds), _thresholds[-1] if _thresholds else 3))
        _threshold_array = np.asarray(_thresholds, np.int64)
        return _threshold_array


@functools.lru_cache(maxsize=None)
def _small_buckets() -> np.ndarray:
    """The bucket of every v in [0, _TABLE_SIZE)."""
    v = np.arange(_TABLE_SIZE, dtype=np.int64)
    return np.where(v > 2, 3 + np.searchsorted(_thresholds_up_to(_TABLE_SIZE), v, side="right"), v)


@functools.lru_cache(maxsize=None)
def _coded() -> Tuple[np.ndarray, pa.Array]:
    """(the code of every v in [-_NEGATIVE, _TABLE_SIZE), indexed by v itself: negative v from
    the end, as numpy indexes; the token of every code up to the largest int64's). Code 0 is
    missing, code k > 0 the bucket k - 1 - _NEGATIVE."""
    codes = np.concatenate([_small_buckets(), np.arange(-_NEGATIVE, 0)]) + _NEGATIVE + 1
    buckets = np.arange(-_NEGATIVE, criteo_int_bucket(np.iinfo(np.int64).max) + 1)
    tokens = pa.concat_arrays([pa.array([""], pa.string()), pc.cast(pa.array(buckets), pa.string())])
    return codes.astype(np.uint16), tokens


def _buckets(values: np.ndarray) -> np.ndarray:
    """``criteo_int_bucket`` of each int64 value."""
    buckets = _small_buckets()[np.clip(values, 0, _TABLE_SIZE - 1)]
    large = values >= _TABLE_SIZE
    if large.any():
        big = values[large]
        buckets[large] = 3 + np.searchsorted(_thresholds_up_to(int(big.max())), big, side="right")
    negative = values < 0
    if negative.any():
        buckets[negative] = values[negative]
    return buckets


def integer_codes(values: np.ndarray, valid: Optional[np.ndarray]) -> Tuple[np.ndarray, pa.Array, np.ndarray]:
    """Parsed int64 values (``valid`` False: missing; None: none is) as (per-row code, the token
    of each code, how many rows have each code); code 0 is missing (token ""). Values from
    -_NEGATIVE up take their code from a table (up to _TABLE_SIZE) or a binary search."""
    lo, hi = (int(values.min()), int(values.max())) if len(values) else (0, 0)
    if lo >= -_NEGATIVE:
        table, tokens = _coded()
        codes = table[values] if hi < _TABLE_SIZE else table[np.minimum(values, _TABLE_SIZE - 1)]
        if hi >= _TABLE_SIZE:
            large = values >= _TABLE_SIZE
            codes[large] = _buckets(values[large]) + _NEGATIVE + 1
        tokens = tokens[:criteo_int_bucket(max(hi, 3)) + _NEGATIVE + 2]  # up to the largest bucket here
    else:
        codes, tokens = _spread_codes(values, valid)
    if valid is not None:
        np.multiply(codes, valid, out=codes)
    return codes, tokens, np.bincount(codes, minlength=len(tokens))


def _spread_codes(values: np.ndarray, valid: Optional[np.ndarray]) -> Tuple[np.ndarray, pa.Array]:
    buckets = _buckets(values)
    present = buckets if valid is None else buckets[valid]
    if len(present) == 0:
        return np.zeros(len(values), np.int32), pa.array([""], pa.string())
    lo, hi = int(present.min()), int(present.max())
    if valid is not None:
        buckets[~valid] = lo  # whatever the parser left in the missing slots
    if hi - lo < _TABLE_SIZE:  # a dense range of buckets: codes by subtraction
        codes = (buckets - (lo - 1)).astype(np.int32)
        distinct = np.arange(lo, hi + 1, dtype=np.int64)
    else:  # far-apart negative values: only the buckets present
        distinct, inverse = np.unique(buckets, return_inverse=True)
        codes = (inverse + 1).astype(np.int32)
    return codes, pa.concat_arrays([pa.array([""], pa.string()), pc.cast(pa.array(distinct), pa.string())])


def integer_tokens(raw: pa.Array) -> Optional[pa.Array]:
    """The token of each raw value ("" when empty), or None when a value is not a plain decimal
    int64 (the caller then takes the values one by one, with Python's ``int``)."""
    if pc.any(pc.match_substring(raw, HEX_PREFIX, ignore_case=True)).as_py():
        return None
    empty = pc.equal(raw, "")
    try:
        values = pc.cast(pc.if_else(empty, "0", raw), pa.int64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if len(values) == 0:
        return pa.array([], pa.string())
    return pc.if_else(empty, "", pc.cast(pa.array(_buckets(values)), pa.string()))
