"""The students' field mixing h0[b] = C @ x[b] as the dagfm_ext::field_mix op.

x (B, F, D), C (F, F) -> (B, F, D). On the CPU, float32 and float64 run fused kernels: the forward
as register-blocked products over the samples, the backward as one pass over tiles of samples that
computes both C^T @ grad[b] and grad_C = sum_b grad[b] @ x[b]^T while the tile is in cache (no
(B, F, F) intermediate), bit-identical for any thread count. CUDA and the 16-bit dtypes run the
same maths as batched products. The autocast rule is the propagation's (dagfm_ext.autocast).
"""
from __future__ import annotations

import torch

from . import _C
from .autocast import cast_inputs
from .functional import plain_inference

__all__ = ["field_mix"]

_mix_op = torch.ops.dagfm_ext.field_mix
_mix_bwd_op = torch.ops.dagfm_ext.field_mix_bwd
# The forward straight to its kernel, for what plain_inference accepts.
mix_no_grad = _C._field_mix_no_grad

_NO_DOUBLE_BACKWARD = (b"field_mix: double backward (differentiating its gradients, computed with "
                       b"create_graph=True) is not implemented")


@torch.library.register_fake("dagfm_ext::field_mix")
def _field_mix_fake(x, connect):
    torch._check(x.dim() == 3, lambda: f"x: expected (B, F, D), got shape {tuple(x.shape)}")
    torch._check(connect.dim() == 2, lambda: f"connect: expected (F, F), got shape {tuple(connect.shape)}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("dagfm_ext::field_mix_bwd")
def _field_mix_bwd_fake(grad, x, connect):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(connect, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    x, connect = inputs
    ctx.save_for_backward(x, connect)


def _backward(ctx, grad):
    x, connect = ctx.saved_tensors
    with torch.no_grad():
        grads = _mix_bwd_op(grad.contiguous(), x, connect)
    if torch.is_grad_enabled() and (x.requires_grad or connect.requires_grad):
        # Under create_graph=True the gradients get a backward that raises, never a silent None.
        grads = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, 2)(
            *[g.detach().requires_grad_() for g in grads])
    return grads


torch.library.register_autograd("dagfm_ext::field_mix", _backward, setup_context=_setup_context)


def field_mix(x: torch.Tensor, connect: torch.Tensor) -> torch.Tensor:
    """h0 = connect @ x[b] for every sample b: x (B, F, D), connect (F, F) -> (B, F, D)."""
    x, connect, _ = cast_inputs(x, connect, None)
    if plain_inference((x, connect), autocast_applied=True):
        return mix_no_grad(x, connect)
    return _mix_op(x, connect)
