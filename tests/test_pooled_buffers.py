"""The CPU op's large outputs (from 256 KB: the training forward's kept messages, the states, the
field mixing's output, the backward's gradients) come from buffers reused between calls: a freed
call's buffer serves the next request of its size, a live one never does, and reuse changes no
value."""
import pytest
import torch

import dagfm_ext
from dagfm_ext import reference
from dagfm_ext.testing import make_inputs

from conftest import INTERACTIONS

# float64 shapes whose messages (1.4 MB), h0-sized tensors (0.7 MB) and states (269 KB) are all past
# the pool's 256 KB, and that no other test uses.
B, F, D, L = 1400, 8, 8, 2


def _train_forward(kind, seed=0, batch=B):
    h0, p, q = make_inputs(kind, batch, F, D, L, seed=seed)
    return (h0, p, q), torch.ops.dagfm_ext.propagate_fwd_train(h0, p, q, kind)


@pytest.mark.parametrize("kind", INTERACTIONS)
def test_a_freed_buffer_serves_the_next_forward_of_its_size(kind):
    _, (states, saved) = _train_forward(kind, seed=1)
    addresses = (states.data_ptr(), saved.data_ptr())
    del states, saved
    # Allocations in between, of the same sizes, that plain malloc could serve from the freed blocks.
    blockers = [torch.empty(B, L + 1, F, dtype=torch.float64), torch.empty(B * L * F * D, dtype=torch.float64)]
    (h0, p, q), (states, saved) = _train_forward(kind, seed=2)
    assert (states.data_ptr(), saved.data_ptr()) == addresses
    assert not {b.data_ptr() for b in blockers} & set(addresses)
    # The reused buffers hold this call's values: h^t = h0 * a^t sums to the states.
    torch.testing.assert_close((h0[:, None] * saved.view(B, L, F, D)).sum(-1), states[:, 1:])
    torch.testing.assert_close(states, reference.dagfm_propagate(h0, p, q, kind))


@pytest.mark.parametrize("kind", INTERACTIONS)
def test_a_live_buffer_is_never_handed_out_again(kind):
    _, (first_states, first) = _train_forward(kind, seed=3)
    kept = first.clone(), first_states.clone()
    _, (second_states, second) = _train_forward(kind, seed=4)
    _, (_, other_size) = _train_forward(kind, seed=4, batch=B + 1)
    assert len({first.data_ptr(), second.data_ptr(), other_size.data_ptr()}) == 3
    assert first_states.data_ptr() != second_states.data_ptr()
    assert torch.equal(first, kept[0]) and torch.equal(first_states, kept[1])


@pytest.mark.parametrize("kind", INTERACTIONS)
def test_a_freed_gradient_serves_the_next_backward(kind):
    (h0, p, q), (states, saved) = _train_forward(kind, seed=5)
    grad = torch.randn_like(states)
    grad_h0 = torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, kind, saved)[0]
    address = grad_h0.data_ptr()
    want = grad_h0.clone()
    del grad_h0
    blocker = torch.empty_like(h0)
    again = torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, kind, saved)[0]
    assert again.data_ptr() == address != blocker.data_ptr()
    assert again.shape == h0.shape and again.is_contiguous()
    assert torch.equal(again, want)


def test_a_reused_weight_gradient_starts_from_zero():
    """The outer interaction's grad_q is accumulated into: a reused buffer must be zeroed first;
    the kernel interaction's grad_p (1 MB here) is written whole."""
    for kind, (b, f, d) in (("outer", (6, 48, 16)), ("kernel", (6, 16, 16))):
        h0, p, q = make_inputs(kind, b, f, d, L, seed=6)
        states, saved = torch.ops.dagfm_ext.propagate_fwd_train(h0, p, q, kind)
        grad = torch.randn_like(states)
        first = [g.clone() for g in torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, kind, saved)]
        for _ in range(2):
            again = torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, kind, saved)
            for a, w in zip(again, first):
                assert torch.equal(a, w)


def test_field_mixing_output_is_reused():
    x = torch.randn(B, F, D, dtype=torch.float64)
    connect = torch.randn(F, F, dtype=torch.float64)
    out = torch.ops.dagfm_ext.field_mix(x, connect)
    address, want = out.data_ptr(), out.clone()
    del out
    blocker = torch.empty_like(x)
    out = torch.ops.dagfm_ext.field_mix(x, connect)
    assert out.data_ptr() == address != blocker.data_ptr()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


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
