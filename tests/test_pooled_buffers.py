"""The CPU op's large per-step buffers (the training forward's kept messages, the backward's
grad_h0) are reused between steps: a freed step's buffer serves the next request of its size, a
live one never does, and reuse changes no value."""
import pytest
import torch

import dagfm_ext
from dagfm_ext import reference
from dagfm_ext.testing import make_inputs

from conftest import INTERACTIONS

# Shapes no other test uses, so that no other test's freed buffer has this size.
B, F, D, L = 37, 5, 3, 2


def _train_forward(kind, seed=0, batch=B):
    h0, p, q = make_inputs(kind, batch, F, D, L, seed=seed)
    return (h0, p, q), torch.ops.dagfm_ext.propagate_fwd_train(h0, p, q, kind)


@pytest.mark.parametrize("kind", INTERACTIONS)
def test_a_freed_buffer_serves_the_next_forward_of_its_size(kind):
    _, (_, saved) = _train_forward(kind, seed=1)
    address = saved.data_ptr()
    del saved
    # An allocation in between, of the same size, that plain malloc would serve from the freed block.
    blocker = torch.empty(B * L * F * D, dtype=torch.float64)
    (h0, p, q), (states, saved) = _train_forward(kind, seed=2)
    assert saved.data_ptr() == address != blocker.data_ptr()
    # The reused buffer holds this call's messages: h^t = h0 * a^t sums to the states.
    torch.testing.assert_close((h0[:, None] * saved.view(B, L, F, D)).sum(-1), states[:, 1:])
    torch.testing.assert_close(states, reference.dagfm_propagate(h0, p, q, kind))


@pytest.mark.parametrize("kind", INTERACTIONS)
def test_a_live_buffer_is_never_handed_out_again(kind):
    _, (_, first) = _train_forward(kind, seed=3)
    kept = first.clone()
    _, (_, second) = _train_forward(kind, seed=4)
    _, (_, other_size) = _train_forward(kind, seed=4, batch=B + 1)
    assert len({first.data_ptr(), second.data_ptr(), other_size.data_ptr()}) == 3
    assert torch.equal(first, kept)


@pytest.mark.parametrize("kind", INTERACTIONS)
def test_a_freed_grad_h0_serves_the_next_backward(kind):
    (h0, p, q), (states, saved) = _train_forward(kind, seed=5)
    grad = torch.randn_like(states)
    grad_h0 = torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, kind, saved)[0]
    address = grad_h0.data_ptr()
    want = grad_h0.clone()
    del grad_h0
    blocker = torch.empty_like(h0)
    again = torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, kind, saved)[0]
    assert again.data_ptr() == address != blocker.data_ptr() and again.shape == h0.shape and again.is_contiguous()
    assert torch.equal(again, want)


@pytest.mark.parametrize("kind", INTERACTIONS)
def test_training_steps_on_reused_buffers_give_the_reference_gradients(kind):
    for seed in range(3):
        h0, p, q = make_inputs(kind, B, F, D, L, seed=10 + seed)
        leaves = [t.clone().requires_grad_() for t in (h0, p) + ((q,) if q is not None else ())]
        got = dagfm_ext.dagfm_propagate(*leaves[:2], leaves[2] if q is not None else None, kind)
        grad = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, leaves, grad)
        want_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        want = reference.dagfm_propagate(*want_leaves[:2], want_leaves[2] if q is not None else None, kind)
        for a, b in zip(got_grads, torch.autograd.grad(want, want_leaves, grad)):
            torch.testing.assert_close(a, b)
