"""Encoded data in memory (or memory-mapped) with its train/val/test split, and its batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .schema import FeatureSchema

__all__ = ["split_indices", "TabularData"]


def split_indices(n: int, seed: int, fractions=(0.8, 0.1, 0.1)) -> Dict[str, np.ndarray]:
    """Seeded random permutation cut into train/val/test."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
            "test": np.sort(perm[n_train + n_val:])}


@dataclass
class TabularData:
    """Encoded rows ``x`` (N, num_slots) (an array or a memmap), labels ``y`` (N,) in {0, 1}."""
    name: str
    schema: FeatureSchema
    x: np.ndarray
    y: np.ndarray
    splits: Dict[str, np.ndarray]

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                rng: Optional[np.random.Generator] = None, rank: int = 0,
                world_size: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``batch_size`` rows in split order (or shuffled by ``rng``). With
        ``world_size`` > 1 each batch is dealt round-robin across the ranks and only this
        ``rank``'s rows (r, r + W, ...) are yielded, so the global batch is unchanged."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        idx = self.splits[split]
        if shuffle:
            idx = (rng or np.random.default_rng()).permutation(idx)
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            if shuffle:
                part = np.sort(part)  # locality for memmaps; order inside a batch is irrelevant
            part = part[rank::world_size]
            yield (torch.from_numpy(np.asarray(self.x[part], dtype=np.int64)),
                   torch.from_numpy(np.asarray(self.y[part], dtype=np.float32)))
