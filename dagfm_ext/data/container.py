"""Encoded data in memory (or memory-mapped) with its train/val/test split, and its batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np
import numpy.random  # noqa: F401  (numpy imports it on first use, which would be mid-run)
import torch

from .batches import iter_batches
from .schema import FeatureSchema

__all__ = ["split_indices", "split_of_rows", "TabularData"]


def split_of_rows(n: int, seed: int, fractions=(0.8, 0.1, 0.1)) -> np.ndarray:
    """The split of each row (int8: 0 train, 1 val, 2 test): a seeded random permutation cut
    into train/val/test. One byte a row beyond the permutation itself."""
    # ``Generator.permutation(n)``'s permutation (the same draws), in int32 when it fits: half the memory.
    perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    np.random.default_rng(seed).shuffle(perm)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    split = np.empty(n, np.int8)
    split[perm[:n_train]] = 0
    split[perm[n_train:n_train + n_val]] = 1
    split[perm[n_train + n_val:]] = 2
    return split


def split_indices(n: int, seed: int, fractions=(0.8, 0.1, 0.1)) -> Dict[str, np.ndarray]:
    """The sorted row indices of each split of ``split_of_rows``."""
    split = split_of_rows(n, seed, fractions)
    return {name: np.flatnonzero(split == k) for k, name in enumerate(("train", "val", "test"))}


@dataclass
class TabularData:
    """Encoded rows ``x`` (N, num_slots) (an array or a memmap), labels ``y`` (N,) in {0, 1}.
    A split is an array of row indices, or a range when the rows are stored grouped by split
    (preprocessed data; ``split_seed`` then says which random split grouped them, None when
    the split came from separate files). ``user_field`` names the field gAUC groups by."""
    name: str
    schema: FeatureSchema
    x: np.ndarray
    y: np.ndarray
    splits: Dict[str, Union[np.ndarray, range]]
    user_field: Optional[str] = None
    split_seed: Optional[int] = None

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                rng: Optional[np.random.Generator] = None, rank: int = 0,
                world_size: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``batch_size`` rows in split order, or shuffled by ``rng`` (a memory-mapped
        split by blocks of consecutive rows, see ``batches.py``). With ``world_size`` > 1 each
        batch is dealt round-robin across the ranks and only this ``rank``'s rows (r, r + W, ...)
        are yielded, so the global batch is unchanged."""
        if shuffle and rng is None:
            rng = np.random.default_rng()
        return iter_batches(self.x, self.y, self.splits[split], batch_size, rng if shuffle else None,
                            rank=rank, world_size=world_size)

    def users(self, split: str) -> Optional[np.ndarray]:
        """The user id of each row of a split (split order), or None without a user field."""
        if self.user_field is None:
            return None
        col = self.schema.slot_fields().index(self.schema.names.index(self.user_field))
        rows = self.splits[split]
        if isinstance(rows, range):
            return np.asarray(self.x[rows.start:rows.stop, col])
        return np.asarray(self.x[rows, col])

    def rows_in_source_order(self) -> np.ndarray:
        """``x`` in the order of the input file(s)."""
        if self.split_seed is None:
            return np.asarray(self.x)
        order = np.concatenate([np.asarray(v) for v in split_indices(len(self.y), self.split_seed).values()])
        out = np.empty(self.x.shape, self.x.dtype)
        out[order] = self.x
        return out
