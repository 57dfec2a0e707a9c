"""Training and evaluation batches.

A split is either a range of rows (preprocessed data is stored grouped by split) or an array of
row indices (in-memory data). Shuffling permutes *blocks* of ``block_rows`` consecutive rows
(the largest divisor of the batch size up to 64), never single rows, so a batch of a memory-mapped
split is a handful of contiguous slices rather than a per-row gather across the file. The partial
block of the split's tail goes last, so every batch but the final one has ``batch_size`` rows.
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


def _gather(a: np.ndarray, rows: Rows, pieces: Optional[Sequence[Tuple[int, int]]]) -> np.ndarray:
    """Rows of ``a``: by slices when the split is a range, else by index."""
    if isinstance(rows, range):
        return np.concatenate([a[rows.start + s:rows.start + e] for s, e in pieces]) if len(pieces) > 1 \
            else a[rows.start + pieces[0][0]:rows.start + pieces[0][1]]
    return a[np.concatenate([rows[s:e] for s, e in pieces])]


def _batch_pieces(n: int, batch_size: int, rng: Optional[np.random.Generator]) -> Iterator[list]:
    """For each batch, the (start, stop) positions within the split that make it up. Every batch
    but the last has ``batch_size`` rows, shuffled or not."""
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
    """(x int64, y float32) batches of ``rows`` in order, or block-shuffled by ``rng``. With
    ``world_size`` > 1 only this rank's rows of each batch (r, r + W, ...) are yielded."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
    for pieces in _batch_pieces(len(rows), batch_size, rng):
        xb = _gather(x, rows, pieces)[rank::world_size]
        yb = _gather(y, rows, pieces)[rank::world_size]
        # Copies: a batch must not alias a (read-only) memmap or the data itself.
        yield (torch.from_numpy(np.array(xb, dtype=np.int64)), torch.from_numpy(np.array(yb, dtype=np.float32)))
