"""The field embedding shared by teacher and student: one table, per-field offsets."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .schema import FeatureSchema

__all__ = ["FieldEmbedding"]


class FieldEmbedding(nn.Module):
    """One table for all fields (per-field offsets); multi-valued fields are mean-pooled.
    forward(x (B, num_slots) int) -> (B, num_fields, embed_dim)."""

    def __init__(self, schema: FeatureSchema, embed_dim: int):
        super().__init__()
        self.num_fields, self.embed_dim = schema.num_fields, embed_dim
        sizes = [f.vocab_size for f in schema.fields]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        slot_field = schema.slot_fields()
        self.table = nn.Embedding(int(sum(sizes)), embed_dim)
        with torch.no_grad():  # xavier-uniform per field, as the public code initialises each table
            for s, n in zip(starts, sizes):
                bound = math.sqrt(6.0 / (n + embed_dim))
                self.table.weight[s:s + n].uniform_(-bound, bound)
        self.register_buffer("offsets", torch.as_tensor(starts[slot_field]), persistent=False)
        self.register_buffer("slot_field", torch.as_tensor(slot_field, dtype=torch.long), persistent=False)
        self.pooled = len(slot_field) != schema.num_fields

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.offsets.numel():
            raise ValueError(f"x: expected encoded rows (B, {self.offsets.numel()}), got {tuple(x.shape)}")
        ids = x.long()
        if not self.pooled:
            return self.table(ids + self.offsets)
        valid = ids >= 0
        e = self.table(ids.clamp_min(0) + self.offsets) * valid.unsqueeze(-1).to(self.table.weight.dtype)
        B = ids.shape[0]
        out = e.new_zeros(B, self.num_fields, self.embed_dim).index_add_(1, self.slot_field, e)
        count = e.new_zeros(B, self.num_fields).index_add_(1, self.slot_field, valid.to(e.dtype))
        return out / count.clamp_min(1.0).unsqueeze(-1)
