"""Plain-PyTorch DAG propagation: the test oracle and the baseline of every speed comparison.

Written the way the public KD-DAGFM implementations write it (an einsum over the upper-triangle
masked weights per layer), deliberately not tuned. Works for any dtype and device.
"""
from __future__ import annotations

import torch

__all__ = ["dagfm_propagate", "dagfm_propagate_with_sum", "INTERACTIONS"]

INTERACTIONS = ("inner", "outer", "kernel")


def _edge_mask(num_fields: int, like: torch.Tensor) -> torch.Tensor:
    # Edge i -> j exists for i <= j (self-loops included).
    return torch.triu(torch.ones(num_fields, num_fields, dtype=like.dtype, device=like.device))


def dagfm_propagate(h0: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None = None,
                    interaction: str = "inner") -> torch.Tensor:
    """States of the DAG propagation, (B, L+1, F): s[:, t, j] = sum_d h^t_j (t = 0 is h0).

    h0: (B, F, D); p: (L, F, F, D) for inner/outer, (L, F, F, D, D) for kernel;
    q: (L, F, F, D) for outer, else None.
    """
    return dagfm_propagate_with_sum(h0, p, q, interaction)[0]


def dagfm_propagate_with_sum(h0: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None = None,
                             interaction: str = "inner") -> tuple[torch.Tensor, torch.Tensor]:
    """(states, z): the states as ``dagfm_propagate`` and z = h^0 + h^1 + ... + h^L, (B, F, D)."""
    if interaction not in INTERACTIONS:
        raise ValueError(f"interaction: expected one of {INTERACTIONS}, got {interaction!r}")
    num_fields = h0.shape[1]
    depth = p.shape[0]
    mask = _edge_mask(num_fields, p)
    h = h0
    states = [h0.sum(dim=-1)]
    total = h0
    for t in range(depth):
        if interaction == "inner":
            w = p[t] * mask[:, :, None]
            a = torch.einsum("bid,ijd->bjd", h, w)
        elif interaction == "outer":
            if q is None:
                raise ValueError("q: required for interaction='outer'")
            w = p[t] * mask[:, :, None]
            c = torch.einsum("bid,ijd->bij", h, w)
            a = torch.einsum("bij,ijd->bjd", c, q[t])
        else:
            w = p[t] * mask[:, :, None, None]
            a = torch.einsum("bid,ijde->bje", h, w)
        h = h0 * a
        states.append(h.sum(dim=-1))
        total = total + h
    return torch.stack(states, dim=1), total
