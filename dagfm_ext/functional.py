"""The differentiable fused op: an autograd.Function over the dagfm_ext::propagate_* custom ops.

The device and dtype pick the kernel through the dispatcher (CPU or CUDA implementation
registered in C++); the fake kernels here give torch.compile / torch.export the output shapes.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the op registrations)

__all__ = ["dagfm_propagate", "DagfmPropagate"]

_fwd_op = torch.ops.dagfm_ext.propagate_fwd
_bwd_op = torch.ops.dagfm_ext.propagate_bwd


@torch.library.register_fake("dagfm_ext::propagate_fwd")
def _propagate_fwd_fake(h0, p, q, interaction):
    torch._check(h0.dim() == 3, lambda: f"h0: expected (B, F, D), got shape {tuple(h0.shape)}")
    torch._check(p.dim() >= 1, lambda: "p: expected (L, F, F, D) or (L, F, F, D, D)")
    return h0.new_empty((h0.shape[0], p.shape[0] + 1, h0.shape[1]))


@torch.library.register_fake("dagfm_ext::propagate_bwd")
def _propagate_bwd_fake(grad_states, h0, p, q, interaction):
    grad_q = torch.empty_like(q) if q is not None else p.new_empty((0,))
    return torch.empty_like(h0), torch.empty_like(p), grad_q


def _setup_context(ctx, inputs, output):
    h0, p, q, interaction = inputs
    ctx.interaction = interaction
    ctx.has_q = q is not None
    ctx.save_for_backward(h0, p, q)


def _backward(ctx, grad_states):
    # The backward op recomputes the intermediate states from the inputs instead of saving them.
    h0, p, q = ctx.saved_tensors
    grad_h0, grad_p, grad_q = _bwd_op(grad_states.contiguous(), h0, p, q, ctx.interaction)
    return grad_h0, grad_p, (grad_q if ctx.has_q else None), None


# The raw forward op is differentiable too (e.g. when called as torch.ops.dagfm_ext.propagate_fwd).
torch.library.register_autograd("dagfm_ext::propagate_fwd", _backward, setup_context=_setup_context)


class DagfmPropagate(torch.autograd.Function):
    """Forward and backward are the registered custom ops; the backward recomputes the states."""

    @staticmethod
    def forward(h0, p, q, interaction):
        return _fwd_op(h0, p, q, interaction)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def dagfm_propagate(h0: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None = None,
                    interaction: str = "inner") -> torch.Tensor:
    """Fused DAG propagation. Returns the states s (B, L+1, F), s[:, t, j] = sum_d h^t_j.

    h0: (B, F, D) (after field mixing); p: (L, F, F, D) for inner/outer, (L, F, F, D, D) for
    kernel; q: (L, F, F, D) for outer, else None. Same contract as dagfm_ext.reference.
    """
    if not isinstance(interaction, str):
        raise TypeError(f"interaction: expected a str, got {type(interaction).__name__}")
    return DagfmPropagate.apply(h0, p, q, interaction)
