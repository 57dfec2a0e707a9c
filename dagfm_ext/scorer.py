"""``Scorer``: encoded rows (B, num_slots) int64 -> logits (B,), the shared field embedding followed
by one network (a teacher or a student). Training steps call it; ``serving.export_student`` exports
it. It depends on torch alone, so serving can use it without the model or training code."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["Scorer"]


class Scorer(nn.Module):
    """Encoded rows (B, num_slots) int64 -> logits (B,): the shared embedding, then one network."""

    def __init__(self, embedding: nn.Module, network: nn.Module):
        super().__init__()
        self.embedding, self.network = embedding, network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.embedding(x))
