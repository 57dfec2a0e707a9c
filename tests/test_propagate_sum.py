"""The propagation's second output z = h^0 + ... + h^L (dagfm_ext.dagfm_propagate_with_sum) against
the reference: values and gradients, gradcheck, opcheck, compile and export, and DAGFM+ on it.

Parametrised over the devices present (CPU always, CUDA when available).
"""
import pytest
import torch

import dagfm_ext
from dagfm_ext import reference
from dagfm_ext.modules import DAGFMPlus
from dagfm_ext.testing import make_grad_states, make_inputs, rel_err

KINDS = ("inner", "outer", "kernel")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (F, D, L, B): F=1, D=1, odd D, F > 64, B=0 and B=1 for every kind; D >= 8 takes the CPU's BLAS
# path for the kernel interaction, D < 8 its per-row path.
SHAPES = [(1, 1, 1, 3), (1, 5, 2, 1), (7, 1, 3, 9), (5, 3, 2, 0), (9, 16, 3, 33), (13, 7, 2, 1),
          (67, 2, 2, 5), (39, 16, 3, 20)]


def leaves(h0, p, q):
    out = [t.detach().clone().requires_grad_() for t in (h0, p)]
    return out + ([q.detach().clone().requires_grad_()] if q is not None else [])


def grads_of(fn, h0, p, q, kind, grad_states, grad_z):
    """(states, z) of fn and the gradients of <states, grad_states> + <z, grad_z> (a None
    upstream gradient leaves that output out of the loss)."""
    xs = leaves(h0, p, q)
    states, z = fn(xs[0], xs[1], xs[2] if q is not None else None, kind)
    outs = [o for o, g in ((states, grad_states), (z, grad_z)) if g is not None]
    ups = [g for g in (grad_states, grad_z) if g is not None]
    if states.shape[0] == 0:
        grads = [torch.zeros_like(x) for x in xs]
    else:
        grads = torch.autograd.grad(outs, xs, ups)
    return states.detach(), z.detach(), grads


def random_like_z(B, F, D, dtype, device, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, F, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("F,D,L,B", SHAPES)
@pytest.mark.parametrize("upstream", ["states_and_z", "z_only"])
def test_float64_values_and_gradients_match_reference(device, kind, F, D, L, B, upstream):
    if kind == "kernel" and F > 64 and D > 1:
        D = 1  # keeps the (L, F, F, D, D) weight small
    h0, p, q = make_inputs(kind, B, F, D, L, device=device, seed=F * 100 + D * 10 + L)
    gs = make_grad_states(B, F, L, device=device) if upstream == "states_and_z" else None
    gz = random_like_z(B, F, D, torch.float64, device)
    s_ref, z_ref, g_ref = grads_of(reference.dagfm_propagate_with_sum, h0, p, q, kind, gs, gz)
    s, z, g = grads_of(dagfm_ext.dagfm_propagate_with_sum, h0, p, q, kind, gs, gz)
    assert s.shape == (B, L + 1, F) and z.shape == (B, F, D) and z.dtype == torch.float64
    assert rel_err(s, s_ref) < 1e-10
    assert rel_err(z, z_ref) < 1e-10
    for name, a, b in zip(("h0", "p", "q"), g, g_ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("F,D,L,B", SHAPES)
def test_inference_op_matches_reference_and_the_training_op(device, kind, F, D, L, B):
    # Without a backward to feed, propagate_sum_fwd returns (states, z) and keeps no messages.
    if kind == "kernel" and F > 64 and D > 1:
        D = 1
    h0, p, q = make_inputs(kind, B, F, D, L, device=device, seed=F * 100 + D * 10 + L)
    s_ref, z_ref = reference.dagfm_propagate_with_sum(h0, p, q, kind)
    s, z = torch.ops.dagfm_ext.propagate_sum_fwd(h0, p, q, kind)
    assert s.shape == (B, L + 1, F) and z.shape == (B, F, D) and z.is_contiguous()
    assert rel_err(s, s_ref) < 1e-10
    assert rel_err(z, z_ref) < 1e-10
    s_train, z_train, _ = torch.ops.dagfm_ext.propagate_sum_fwd_train(h0, p, q, kind)
    assert rel_err(s_train, s_ref) < 1e-10 and rel_err(z_train, z_ref) < 1e-10
    with torch.no_grad():
        s_pub, z_pub = dagfm_ext.dagfm_propagate_with_sum(h0, p, q, kind)
    torch.testing.assert_close(s_pub, s, rtol=0, atol=0)
    torch.testing.assert_close(z_pub, z, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B", [17, 40, 100, 600])
def test_float32_z_at_tile_and_lane_boundaries(kind, B):
    # Whole and partial 16-sample lane groups, whole and partial 48-row tiles; 600: the kernel
    # interaction's BLAS forward. D = 16 runs the vector loops.
    F, D, L = 21, 16, 3
    h0, p, q = make_inputs(kind, B, F, D, L, seed=B)
    s_ref, z_ref = reference.dagfm_propagate_with_sum(h0, p, q, kind)
    cast = [t.float() if t is not None else None for t in (h0, p, q)]
    for states, z in (torch.ops.dagfm_ext.propagate_sum_fwd(*cast, kind),
                      torch.ops.dagfm_ext.propagate_sum_fwd_train(*cast, kind)[:2]):
        assert rel_err(states.double(), s_ref) < 1e-5
        assert rel_err(z.double(), z_ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kept", [True, False])
def test_backward_op_with_and_without_the_kept_messages(device, kind, kept):
    # The backward recomputes the messages when not given them; grad_sum enters both paths.
    B, F, D, L = 11, 6, 9, 3
    h0, p, q = make_inputs(kind, B, F, D, L, device=device, seed=5)
    gs = make_grad_states(B, F, L, device=device)
    gz = random_like_z(B, F, D, torch.float64, device)
    _, _, saved = torch.ops.dagfm_ext.propagate_sum_fwd_train(h0, p, q, kind)
    got = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind, saved if kept else None, gz)
    _, _, ref = grads_of(reference.dagfm_propagate_with_sum, h0, p, q, kind, gs, gz)
    for name, a, b in zip(("h0", "p", "q"), got, ref):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("kind", ["outer", "kernel"])
def test_gemm_backward_adds_grad_sum(kind):
    # The cuBLAS backward of the CUDA backend, checked on the CPU through its test hook.
    B, F, D, L = 13, 10, 4, 3
    h0, p, q = make_inputs(kind, B, F, D, L, seed=6)
    gs = make_grad_states(B, F, L)
    gz = random_like_z(B, F, D, torch.float64, "cpu")
    _, _, saved = torch.ops.dagfm_ext.propagate_sum_fwd_train(h0, p, q, kind)
    got = dagfm_ext._C._gemm_backward(gs, h0, p, q, kind, saved, gz)
    _, _, ref = grads_of(reference.dagfm_propagate_with_sum, h0, p, q, kind, gs, gz)
    for name, a, b in zip(("h0", "p", "q"), got, ref):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("F,D,L,B", [(3, 2, 2, 3), (1, 1, 1, 2), (4, 3, 1, 2)])
def test_gradcheck(device, kind, F, D, L, B):
    h0, p, q = make_inputs(kind, B, F, D, L, device=device, seed=3, requires_grad=True)
    inputs = [h0, p] + ([q] if q is not None else [])
    fn = lambda h, w, *rest: dagfm_ext.dagfm_propagate_with_sum(h, w, rest[0] if rest else None, kind)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(device, kind):
    B, F, D, L = 5, 4, 3, 2
    h0, p, q = make_inputs(kind, B, F, D, L, device=device)
    torch.library.opcheck(torch.ops.dagfm_ext.propagate_sum_fwd_train.default, (h0, p, q, kind))
    torch.library.opcheck(torch.ops.dagfm_ext.propagate_sum_fwd.default, (h0, p, q, kind))
    _, _, saved = torch.ops.dagfm_ext.propagate_sum_fwd_train(h0, p, q, kind)
    gs = make_grad_states(B, F, L, device=device)
    gz = random_like_z(B, F, D, torch.float64, device)
    torch.library.opcheck(torch.ops.dagfm_ext.propagate_bwd.default, (gs, h0, p, q, kind, saved, gz))
    torch.library.opcheck(torch.ops.dagfm_ext.propagate_bwd.default, (gs, h0, p, q, kind, None, gz))


def test_grad_sum_is_checked():
    h0, p, q = make_inputs("inner", 4, 3, 2, 2)
    gs = make_grad_states(4, 3, 2)
    with pytest.raises(RuntimeError, match=r"grad_sum: expected shape \(B, F, D\) = \(4, 3, 2\)"):
        torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, "inner", None, torch.zeros(4, 3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad_sum: expected dtype"):
        torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, "inner", None, torch.zeros(4, 3, 2))


def test_z_is_the_sum_of_the_layers_and_its_field_sums_are_the_states():
    h0, p, q = make_inputs("outer", 7, 5, 4, 3)
    states, z = dagfm_ext.dagfm_propagate_with_sum(h0, p, q, "outer")
    torch.testing.assert_close(states, dagfm_ext.dagfm_propagate(h0, p, q, "outer"), rtol=0, atol=0)
    torch.testing.assert_close(z.sum(-1), states.sum(1))


# ---------------------------------------------------------------------------------------------
# DAGFM+ on the fused op


def eager_dagfm_plus(m: DAGFMPlus, emb: torch.Tensor) -> torch.Tensor:
    """The same network with the propagation as the reference's einsum recurrence."""
    h0 = reference.field_mix(emb, m.connect_layer)
    z = reference.dagfm_propagate_with_sum(h0, m.p, m.q, m.interaction)[1]
    return m.mlp(z.reshape(z.shape[0], -1)).squeeze(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_dagfm_plus_matches_its_eager_form_in_float64(device, kind):
    torch.manual_seed(11)
    m = DAGFMPlus(6, 5, 3, kind, mlp=(16, 8)).double().to(device)
    emb = torch.randn(19, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    out = m(emb)
    grads = torch.autograd.grad(out.square().sum(), [emb, *m.parameters()])
    ref = eager_dagfm_plus(m, emb)
    ref_grads = torch.autograd.grad(ref.square().sum(), [emb, *m.parameters()])
    assert rel_err(out.detach(), ref.detach()) < 1e-10
    names = ["emb"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        assert rel_err(a, b) < 1e-10, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_dagfm_plus_compiled_training_step(device, kind):
    torch.manual_seed(12)
    eager, compiled_model = (DAGFMPlus(5, 4, 2, kind, mlp=(8,)).to(device) for _ in range(2))
    compiled_model.load_state_dict(eager.state_dict())
    emb = torch.randn(32, 5, 4, device=device)
    y = torch.rand(32, device=device)

    def loss_of(model, x):
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)

    # The forward and loss in one graph; their backward is the compiled graph's backward.
    loss_c = torch.compile(loss_of, fullgraph=True)(compiled_model, emb)
    loss_c.backward()
    loss_e = loss_of(eager, emb)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_dagfm_plus_export(device, kind, grad):
    # With gradients on the program carries the training op; under no_grad (inference, serving)
    # the op that keeps no messages.
    torch.manual_seed(13)
    m = DAGFMPlus(5, 4, 2, kind, mlp=(8,)).to(device).eval()
    emb = torch.randn(16, 5, 4, device=device)
    batch = torch.export.Dim("batch")
    with torch.set_grad_enabled(grad):
        exported = torch.export.export(m, (emb,), dynamic_shapes={"emb": {0: batch}})
    op = "dagfm_ext.propagate_sum_fwd_train.default" if grad else "dagfm_ext.propagate_sum_fwd.default"
    assert any(str(n.target) == op for n in exported.graph.nodes)
    other = torch.randn(7, 5, 4, device=device)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), m(other))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_dagfm_plus_inference_compiles(device, kind):
    torch.manual_seed(14)
    m = DAGFMPlus(5, 4, 2, kind, mlp=(8,)).to(device).eval()
    emb = torch.randn(16, 5, 4, device=device)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(emb), m(emb))
