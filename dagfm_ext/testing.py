"""Inputs and error measures shared by the tests, the benchmarks and the GPU check scripts.

Like ``torch.testing``, this is part of the package so that every checker, installed or not, draws
the same cases: values are drawn in float64 on the CPU from a seed and then cast and moved, so every
device and dtype sees the same numbers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .reference import INTERACTIONS

__all__ = ["make_inputs", "make_grad_states", "rel_err", "weight_shape"]


def weight_shape(interaction: str, num_layers: int, num_fields: int, embed_dim: int) -> tuple:
    """Shape of ``p``: (L, F, F, D) for inner/outer, (L, F, F, D, D) for kernel."""
    if interaction not in INTERACTIONS:
        raise ValueError(f"interaction: expected one of {INTERACTIONS}, got {interaction!r}")
    base = (num_layers, num_fields, num_fields, embed_dim)
    return base + (embed_dim,) if interaction == "kernel" else base


def make_inputs(interaction: str, B: int, F: int, D: int, L: int, dtype=torch.float64, device="cpu",
                seed: int = 0, scale: Optional[float] = None, requires_grad: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Random ``(h0, p, q)`` for one case (``q`` is None unless ``interaction == "outer"``).

    The weights are scaled so the states stay O(1) through the layers, like trained weights:
    ``scale`` (default 1/sqrt(F), 1/sqrt(F*D) for kernel) multiplies ``p``, and the outer
    interaction's ``p`` is further divided by sqrt(D) since it enters through a D-long dot product.
    """
    gen = torch.Generator().manual_seed(seed)
    if scale is None:
        scale = 1.0 / max(1.0, (F * (D if interaction == "kernel" else 1)) ** 0.5)
    h0 = torch.randn(B, F, D, generator=gen, dtype=torch.float64)
    p = torch.randn(weight_shape(interaction, L, F, D), generator=gen, dtype=torch.float64) * scale
    q = None
    if interaction == "outer":
        q = torch.randn(L, F, F, D, generator=gen, dtype=torch.float64)
        p = p * D ** -0.5

    def convert(t):
        if t is None:
            return None
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return convert(h0), convert(p), convert(q)


def make_grad_states(B: int, F: int, L: int, dtype=torch.float64, device="cpu", seed: int = 1) -> torch.Tensor:
    """A random upstream gradient for the states, (B, L+1, F)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, L + 1, F, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: one number per tensor, 0 for empty tensors."""
    if expected.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().max()
    return (diff / expected.double().abs().max().clamp_min(1e-30)).item()
