"""The fused propagation with its second output, z = h^0 + h^1 + ... + h^L (B, F, D): what the
DAGFM+ readout reads. Two ops: dagfm_ext::propagate_sum_fwd (states, z; inference keeps nothing)
and dagfm_ext::propagate_sum_fwd_train (states, z and the kept messages), whose backward is
dagfm_ext::propagate_bwd with grad_sum = dLoss/dz.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _C  # noqa: F401  (loads the op registrations)
from .functional import _propagate_fwd_fake, _propagate_fwd_train_fake, backward_grads, prepare_inputs

__all__ = ["dagfm_propagate_with_sum", "DagfmPropagateSum"]

_sum_fwd_op = torch.ops.dagfm_ext.propagate_sum_fwd
_sum_fwd_train_op = torch.ops.dagfm_ext.propagate_sum_fwd_train


@torch.library.register_fake("dagfm_ext::propagate_sum_fwd")
def _propagate_sum_fwd_fake(h0, p, q, interaction):
    return _propagate_fwd_fake(h0, p, q, interaction), torch.empty_like(h0, memory_format=torch.contiguous_format)


@torch.library.register_fake("dagfm_ext::propagate_sum_fwd_train")
def _propagate_sum_fwd_train_fake(h0, p, q, interaction):
    states, saved = _propagate_fwd_train_fake(h0, p, q, interaction)
    return states, torch.empty_like(h0, memory_format=torch.contiguous_format), saved


class DagfmPropagateSum(torch.autograd.Function):
    """Forward: the registered op, keeping its messages for the backward. Backward: one
    propagate_bwd call with both upstream gradients (either may be absent)."""

    @staticmethod
    def forward(ctx, h0, p, q, interaction):
        states, z, saved = _sum_fwd_train_op(h0, p, q, interaction)
        ctx.set_materialize_grads(False)
        ctx.interaction = interaction
        ctx.has_q = q is not None
        ctx.save_for_backward(h0, p, q, saved)
        ctx.mark_non_differentiable(saved)
        return states, z

    @staticmethod
    def backward(ctx, grad_states, grad_z):
        h0, p, q, saved = ctx.saved_tensors
        if grad_states is None:
            grad_states = h0.new_zeros((h0.shape[0], p.shape[0] + 1, h0.shape[1]))
        grad_sum = None if grad_z is None else grad_z.contiguous()
        grad_h0, grad_p, grad_q = backward_grads(grad_states, h0, p, q, ctx.interaction, saved, grad_sum)
        return grad_h0, grad_p, (grad_q if ctx.has_q else None), None


def dagfm_propagate_with_sum(h0: torch.Tensor, p: torch.Tensor, q: Optional[torch.Tensor] = None,
                             interaction: str = "inner") -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused DAG propagation returning (states, z): the states s (B, L+1, F) as
    ``dagfm_ext.dagfm_propagate`` and z = h^0 + h^1 + ... + h^L (B, F, D).

    Same arguments and contract as ``dagfm_ext.reference.dagfm_propagate_with_sum``.
    """
    h0, p, q, training = prepare_inputs(h0, p, q, interaction)
    if training:
        return DagfmPropagateSum.apply(h0, p, q, interaction)
    # Inference keeps nothing for a backward.
    return _sum_fwd_op(h0, p, q, interaction)
