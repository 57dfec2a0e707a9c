"""Training and evaluation batches.

A split is either a range of rows (preprocessed data, memory-mapped, stored grouped by split) or
an array of row indices (in-memory data). Shuffling a range permutes *blocks* of ``block_rows``
consecutive rows (the largest divisor of the batch size up to 64), never single rows, so a batch
is a handful of contiguous slices rather than a per-row gather across the file; the partial block
of the split's tail goes last, so every batch but the final one has ``batch_size`` rows. An index
array is in memory, where gathers are cheap: it is shuffled row by row.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["block_rows", "iter_batches"]

Rows = Union[range, np.ndarray]
MAX_BLOCK = 64


def block_rows(batch_size: int) -> int:
    return max(d for d in range(1, min(batch_size, MAX_BLOCK) + 1) if batch_size % d == 0)


def _slices(a: np.ndarray, start: int, pieces: Sequence[Tuple[int, int]]) -> np.ndarray:
    if len(pieces) == 1:
        return a[start + pieces[0][0]:start + pieces[0][1]]
    return np.concatenate([a[start + s:start + e] for s, e in pieces])


def _range_pieces(n: int, batch_size: int, rng: Optional[np.random.Generator]) -> Iterator[list]:
    """For each batch, the (start, stop) positions within the split that make it up."""
    if rng is None:
        for s in range(0, n, batch_size):
            yield [(s, min(s + batch_size, n))]
        return
    block = block_rows(batch_size)
    full = n // block
    starts = rng.permutation(full) * block
    if n % block:
        starts = np.append(starts, full * block)
    stops = np.minimum(starts + block, n)
    per_batch = batch_size // block
    for k in range(0, len(starts), per_batch):
        yield list(zip(starts[k:k + per_batch].tolist(), stops[k:k + per_batch].tolist()))


def iter_batches(x: np.ndarray, y: np.ndarray, rows: Rows, batch_size: int, rng: Optional[np.random.Generator] = None,
                 rank: int = 0, world_size: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(x int64, y float32) batches of ``rows`` in order, or shuffled by ``rng`` (see above). With
    ``world_size`` > 1 only this rank's rows of each batch (r, r + W, ...) are yielded."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
    if isinstance(rows, range):
        parts = ((_slices(x, rows.start, p), _slices(y, rows.start, p))
                 for p in _range_pieces(len(rows), batch_size, rng))
    else:
        parts = _index_batches(x, y, rows, batch_size, rng)
    for xb, yb in parts:
        # Copies: a batch must not alias a (read-only) memmap or the data itself.
        yield (torch.from_numpy(np.array(xb[rank::world_size], dtype=np.int64)),
               torch.from_numpy(np.array(yb[rank::world_size], dtype=np.float32)))


def _index_batches(x, y, idx: np.ndarray, batch_size: int, rng: Optional[np.random.Generator]):
    if rng is not None:
        idx = rng.permutation(idx)
    for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        if rng is not None:
            part = np.sort(part)  # locality; the order inside a batch is irrelevant
        yield x[part], y[part]
