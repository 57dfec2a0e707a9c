"""Plain-PyTorch DAG propagation: the test oracle and the baseline of every speed comparison.

Written the way the public KD-DAGFM implementations write it (an einsum over the upper-triangle
masked weights per layer), deliberately not tuned. Works for any dtype and device. The
recurrence itself is derived in docs/maths.md.
"""
from __future__ import annotations

import torch

__all__ = ["dagfm_propagate", "dagfm_propagate_with_sum", "field_mix", "propagate_layer", "edge_mask", "upper",
           "INTERACTIONS"]

INTERACTIONS = ("inner", "outer", "kernel")


def field_mix(x: torch.Tensor, connect: torch.Tensor) -> torch.Tensor:
    """The students' field mixing h0[b] = connect @ x[b], (B, F, D), as one batched matmul."""
    return torch.bmm(connect.expand(x.shape[0], -1, -1), x)


def edge_mask(num_fields: int, device=None) -> torch.Tensor:
    """The DAG's edges as an (F, F) bool matrix: edge i -> j exists for i <= j (self-loops included)."""
    return torch.ones(num_fields, num_fields, dtype=torch.bool, device=device).triu()


def upper(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """w (F, F, ...) with the edges outside ``mask`` set to zero. A where(), not a product with a 0/1
    mask: the unused weights may hold anything, and Inf * 0 would be NaN."""
    return torch.where(mask.view(mask.shape + (1,) * (w.dim() - 2)), w, torch.zeros((), dtype=w.dtype, device=w.device))


def propagate_layer(h: torch.Tensor, h0: torch.Tensor, p_t: torch.Tensor, q_t: torch.Tensor | None,
                    interaction: str, mask: torch.Tensor) -> torch.Tensor:
    """One layer of the recurrence: h^{t+1} = h0 * a^{t+1}, (B, F, D), where a^{t+1}_j aggregates
    the messages of every h^t_i along the edges i -> j.

    p_t: (F, F, D) for inner/outer, (F, F, D, D) for kernel; q_t: (F, F, D) for outer, else None;
    mask: ``edge_mask(F, p_t.device)``.
    """
    if interaction == "inner":
        a = torch.einsum("bid,ijd->bjd", h, upper(p_t, mask))
    elif interaction == "outer":
        if q_t is None:
            raise ValueError("q: required for interaction='outer'")
        c = torch.einsum("bid,ijd->bij", h, upper(p_t, mask))
        a = torch.einsum("bij,ijd->bjd", c, upper(q_t, mask))
    elif interaction == "kernel":
        a = torch.einsum("bid,ijde->bje", h, upper(p_t, mask))
    else:
        raise ValueError(f"interaction: expected one of {INTERACTIONS}, got {interaction!r}")
    return h0 * a


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
    if interaction == "outer" and q is None:
        raise ValueError("q: required for interaction='outer'")
    mask = edge_mask(h0.shape[1], p.device)
    h = h0
    states = [h0.sum(dim=-1)]
    total = h0
    for t in range(p.shape[0]):
        h = propagate_layer(h, h0, p[t], q[t] if q is not None else None, interaction, mask)
        states.append(h.sum(dim=-1))
        total = total + h
    return torch.stack(states, dim=1), total
