"""Plain-PyTorch DAG propagation: the test oracle and the baseline of every speed comparison.

Written the way the public KD-DAGFM implementations write it (an einsum over the upper-triangle
masked weights per layer), deliberately not tuned. Works for any dtype and device.
"""
from __future__ import annotations

import torch

__all__ = ["dagfm_propagate", "INTERACTIONS"]

INTERACTIONS = ("inner", "outer", "kernel")


def _upper(w: torch.Tensor) -> torch.Tensor:
    """w (F, F, ...) with the edges i -> j for i > j set to zero (self-loops kept). A where(), not a
    product with a 0/1 mask: the unused weights may hold anything, and Inf * 0 would be NaN."""
    num_fields = w.shape[0]
    keep = torch.ones(num_fields, num_fields, dtype=torch.bool, device=w.device).triu()
    return torch.where(keep.view(keep.shape + (1,) * (w.dim() - 2)), w, torch.zeros((), dtype=w.dtype, device=w.device))


def dagfm_propagate(h0: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None = None,
                    interaction: str = "inner") -> torch.Tensor:
    """States of the DAG propagation, (B, L+1, F): s[:, t, j] = sum_d h^t_j (t = 0 is h0).

    h0: (B, F, D); p: (L, F, F, D) for inner/outer, (L, F, F, D, D) for kernel;
    q: (L, F, F, D) for outer, else None.
    """
    if interaction not in INTERACTIONS:
        raise ValueError(f"interaction: expected one of {INTERACTIONS}, got {interaction!r}")
    depth = p.shape[0]
    h = h0
    states = [h0.sum(dim=-1)]
    for t in range(depth):
        if interaction == "inner":
            w = _upper(p[t])
            a = torch.einsum("bid,ijd->bjd", h, w)
        elif interaction == "outer":
            if q is None:
                raise ValueError("q: required for interaction='outer'")
            c = torch.einsum("bid,ijd->bij", h, _upper(p[t]))
            a = torch.einsum("bij,ijd->bjd", c, _upper(q[t]))
        else:
            a = torch.einsum("bid,ijde->bje", h, _upper(p[t]))
        h = h0 * a
        states.append(h.sum(dim=-1))
    return torch.stack(states, dim=1)
