"""The fused op never answers silently wrong: double backward raises, and a layer count beyond what
the kernels index is refused."""
import pytest
import torch

import dagfm_ext
from dagfm_ext.reference import dagfm_propagate as reference_propagate


def _inputs(interaction="inner"):
    torch.manual_seed(0)
    h = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    shape = (2, 4, 4, 2, 2) if interaction == "kernel" else (2, 4, 4, 2)
    p = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 4, 4, 2, dtype=torch.float64, requires_grad=True) if interaction == "outer" else None
    return h, p, q


CALLS = {"dagfm_propagate": dagfm_ext.dagfm_propagate,
         "raw op": lambda h, p: torch.ops.dagfm_ext.propagate_fwd(h, p, None, "inner"),
         "with sum": lambda h, p: dagfm_ext.dagfm_propagate_with_sum(h, p)[1]}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_double_backward_raises_instead_of_returning_none(call):
    h, p, q = _inputs()
    fn = CALLS[call]
    grad_h, = torch.autograd.grad(fn(h, p).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="dagfm_propagate: double backward .* is not implemented"):
        (grad_h ** 2).sum().backward()
    # The reference is twice differentiable: the op must not pretend to be.
    ref_grad, = torch.autograd.grad(reference_propagate(h, p).sum(), h, create_graph=True)
    assert torch.autograd.grad((ref_grad ** 2).sum(), p)[0].abs().sum() > 0


@pytest.mark.parametrize("interaction", ["inner", "outer", "kernel"])
def test_first_order_gradients_unchanged(interaction):
    h, p, q = _inputs(interaction)
    args = (h, p) if q is None else (h, p, q)
    assert torch.autograd.gradcheck(lambda *a: dagfm_ext.dagfm_propagate(*a, interaction=interaction), args)


@pytest.mark.parametrize("layers", [2 ** 16 + 1, 2 ** 31, 2 ** 32 + 1])
def test_layer_count_beyond_the_kernels_range_is_refused(layers):
    h = torch.randn(2, 2, 1)
    p = torch.randn(1, 2, 2, 1).expand(layers, 2, 2, 1)  # any L without the memory
    with pytest.raises(RuntimeError, match=r"p: up to 65536 layers \(L = p.size\(0\)\) supported"):
        dagfm_ext.dagfm_propagate(h, p)
