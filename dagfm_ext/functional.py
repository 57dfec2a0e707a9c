"""The differentiable fused op: an autograd.Function over the dagfm_ext::propagate_* custom ops.

The device and dtype pick the kernel through the dispatcher (CPU or CUDA implementation
registered in C++); the fake kernels here give torch.compile / torch.export the output shapes.
"""
from __future__ import annotations

import torch

from . import _C
from .autocast import cast_inputs

__all__ = ["dagfm_propagate", "DagfmPropagate"]

_fwd_op = torch.ops.dagfm_ext.propagate_fwd
_fwd_train_op = torch.ops.dagfm_ext.propagate_fwd_train
_bwd_op = torch.ops.dagfm_ext.propagate_bwd
# The inference forward straight to its kernel, for what plain_inference accepts.
propagate_no_grad = _C._propagate_fwd_no_grad


@torch.library.register_fake("dagfm_ext::propagate_fwd")
def _propagate_fwd_fake(h0, p, q, interaction):
    torch._check(h0.dim() == 3, lambda: f"h0: expected (B, F, D), got shape {tuple(h0.shape)}")
    torch._check(p.dim() >= 1, lambda: "p: expected (L, F, F, D) or (L, F, F, D, D)")
    return h0.new_empty((h0.shape[0], p.shape[0] + 1, h0.shape[1]))


@torch.library.register_fake("dagfm_ext::propagate_fwd_train")
def _propagate_fwd_train_fake(h0, p, q, interaction):
    states = _propagate_fwd_fake(h0, p, q, interaction)
    # What the backend keeps for its backward: the messages a^1..a^L, flat (B * L * F * D), on
    # CPU and CUDA alike.
    return states, h0.new_empty((h0.shape[0] * p.shape[0] * h0.shape[1] * h0.shape[2],))


@torch.library.register_fake("dagfm_ext::propagate_bwd")
def _propagate_bwd_fake(grad_states, h0, p, q, interaction, saved=None, grad_sum=None):
    grad_q = torch.empty_like(q) if q is not None else p.new_empty((0,))
    return torch.empty_like(h0), torch.empty_like(p), grad_q


def _setup_context(ctx, inputs, output):
    h0, p, q, interaction = inputs
    ctx.interaction = interaction
    ctx.has_q = q is not None
    ctx.save_for_backward(h0, p, q, None)


_NO_DOUBLE_BACKWARD = (b"dagfm_propagate: double backward (differentiating its gradients, computed with "
                       b"create_graph=True) is not implemented")


def backward_grads(grad_states, h0, p, q, interaction: str, saved, grad_sum=None):
    """(grad_h0, grad_p, grad_q) from the backward op. Under create_graph=True the gradients get
    a backward of their own that raises: double backward is an error, never a silent None."""
    with torch.no_grad():
        grads = _bwd_op(grad_states.contiguous(), h0, p, q, interaction, saved, grad_sum)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h0, p, q)):
        grads = torch._C._functions.DelayedError(_NO_DOUBLE_BACKWARD, 3)(
            *[g.detach().requires_grad_() for g in grads])
    return grads


def _backward(ctx, grad_states):
    # What the forward did not keep, the backward op recomputes from the inputs.
    h0, p, q, saved = ctx.saved_tensors
    grad_h0, grad_p, grad_q = backward_grads(grad_states, h0, p, q, ctx.interaction, saved)
    return grad_h0, grad_p, (grad_q if ctx.has_q else None), None


# The raw forward op is differentiable too (e.g. when called as torch.ops.dagfm_ext.propagate_fwd).
torch.library.register_autograd("dagfm_ext::propagate_fwd", _backward, setup_context=_setup_context)


class DagfmPropagate(torch.autograd.Function):
    """Training forward and backward are the registered custom ops. The forward keeps what the
    backend returns for its backward (possibly nothing); the rest the backward recomputes."""

    @staticmethod
    def forward(ctx, h0, p, q, interaction):
        states, saved = _fwd_train_op(h0, p, q, interaction)
        ctx.interaction = interaction
        ctx.has_q = q is not None
        ctx.save_for_backward(h0, p, q, saved)
        return states

    backward = staticmethod(_backward)


def prepare_inputs(h0, p, q, interaction: str):
    """What every public entry does first: checks ``interaction``, applies the autocast rule
    (dagfm_ext.autocast) and says whether a backward will be needed. Returns (h0, p, q, training)."""
    if not isinstance(interaction, str):
        raise TypeError(f"interaction: expected a str, got {type(interaction).__name__}")
    h0, p, q = cast_inputs(h0, p, q)
    tensors = (h0, p) if q is None else (h0, p, q)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors if isinstance(t, torch.Tensor))
    return h0, p, q, training


def dagfm_propagate(h0: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None = None,
                    interaction: str = "inner") -> torch.Tensor:
    """Fused DAG propagation. Returns the states s (B, L+1, F), s[:, t, j] = sum_d h^t_j.

    h0: (B, F, D) (after field mixing); p: (L, F, F, D) for inner/outer, (L, F, F, D, D) for
    kernel; q: (L, F, F, D) for outer, else None. Same contract as dagfm_ext.reference.
    """
    h0, p, q, training = prepare_inputs(h0, p, q, interaction)
    if training:
        return DagfmPropagate.apply(h0, p, q, interaction)
    # Inference keeps nothing for a backward.
    if plain_inference((h0, p, q), autocast_applied=True):
        return propagate_no_grad(h0, p, q, interaction)
    return _fwd_op(h0, p, q, interaction)


def plain_inference(tensors, autocast_applied: bool = False) -> bool:
    """Whether ``tensors`` (None entries allowed) may go straight to the kernels, below the
    dispatcher's autograd and autocast layers (microseconds less per call): plain tensors without
    __torch_function__ overrides or modes, none needing a gradient, outside torch.compile /
    torch.export tracing, and no autocast region unless ``autocast_applied`` (prepare_inputs has
    cast them). Anything else takes the registered ops, which also name a bad argument."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (not isinstance(t, torch.Tensor) or (grad and t.requires_grad)):
            return False
    return ((autocast_applied or not torch._C._is_any_autocast_enabled())
            and not torch._C._has_torch_function(tensors)
            and not torch.compiler.is_compiling())
