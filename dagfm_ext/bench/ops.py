"""The implementations under comparison and one pass of each: ``fwd`` or ``fwd+bwd``.

Every implementation has the op's signature ``op(h0, p, q, interaction)``. ``fwd`` is the forward
under no_grad; ``fwd+bwd`` is the forward plus ``torch.autograd.grad`` of the states for h0, p and q
(a training step of the op).
"""
from __future__ import annotations

from typing import Callable, List

import torch

from .. import reference

__all__ = ["fused_op", "reference_op", "grad_inputs", "output_names", "run_pass", "make_step"]


def fused_op(h0, p, q, interaction):
    # Looked up at call time: a monkeypatched dagfm_ext.dagfm_propagate is what gets checked and timed.
    import dagfm_ext
    return dagfm_ext.dagfm_propagate(h0, p, q, interaction)


def reference_op(h0, p, q, interaction):
    return reference.dagfm_propagate(h0, p, q, interaction)


def grad_inputs(h0, p, q) -> List[torch.Tensor]:
    return [t for t in (h0, p, q) if t is not None]


def output_names(q, pass_: str) -> List[str]:
    names = ["states"]
    if pass_ != "fwd":
        names += ["grad_h0", "grad_p"] + (["grad_q"] if q is not None else [])
    return names


def run_pass(op: Callable, h0, p, q, grad_states, interaction: str, pass_: str) -> tuple:
    """One evaluation of ``op``: the states for 'fwd' (under no_grad), states and input gradients otherwise."""
    if pass_ == "fwd":
        with torch.no_grad():
            return (op(h0, p, q, interaction),)
    s = op(h0, p, q, interaction)
    return (s.detach(),) + tuple(torch.autograd.grad(s, grad_inputs(h0, p, q), grad_states))


def make_step(op: Callable, h0, p, q, grad_states, interaction: str, pass_: str,
              mark_step: bool = False) -> Callable[[], object]:
    """A no-argument call of one pass, for timing (``mark_step``: begin a CUDA-graph step first)."""
    inputs = grad_inputs(h0, p, q)
    mark = torch.compiler.cudagraph_mark_step_begin if mark_step else None
    if pass_ == "fwd":
        def step():
            if mark:
                mark()
            with torch.no_grad():
                return op(h0, p, q, interaction)
    else:
        def step():
            if mark:
                mark()
            s = op(h0, p, q, interaction)
            return torch.autograd.grad(s, inputs, grad_states)
    return step
