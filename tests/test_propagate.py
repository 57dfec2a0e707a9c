"""The fused op against dagfm_ext.reference: values, gradients, compile/export, bad inputs.

Parametrised over the devices present (CPU always, CUDA when available) and the dtypes each
computes in, so every backend passes the same checks at the tolerance of each dtype.
"""
import pytest
import torch

import dagfm_ext
from dagfm_ext import reference
from dagfm_ext.testing import make_inputs

from conftest import (DEVICES, DEVICE_DTYPES, HALF_DTYPES, INTERACTIONS, assert_close_to_float64,
                      dtypes_on, fused_and_reference, lower_triangle, parity_shapes, run_with_grads)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kind,F,D,L,B,seed", parity_shapes())
def test_values_and_gradients_match_reference(device, dtype, kind, F, D, L, B, seed):
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=dtype, device=device, seed=seed)
    (s, g), (s_lo, g_lo), (s64, g64) = fused_and_reference(h0, p, q, kind)
    assert s.shape == (B, L + 1, F) and s.dtype == dtype
    assert_close_to_float64(s, s_lo, s64, "states")
    assert len(g) == len(g64) == (3 if kind == "outer" else 2)
    for name, a, a_lo, exact in zip(("h0", "p", "q"), g, g_lo, g64):
        assert a.dtype == dtype, name
        assert_close_to_float64(a, a_lo, exact, f"grad {name}")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kind", INTERACTIONS)
def test_lower_triangle_gradients_are_exactly_zero(device, dtype, kind):
    F, D, L = 6, 5, 2
    h0, p, q = make_inputs(kind, 17, F, D, L, dtype=dtype, device=device)
    _, grads, _ = run_with_grads(dagfm_ext.dagfm_propagate, h0, p, q, kind)
    lower = lower_triangle(F, device)
    for g in grads[1:]:
        assert torch.count_nonzero(g[:, lower]) == 0
        assert torch.count_nonzero(g[:, ~lower]) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", INTERACTIONS)
@pytest.mark.parametrize("F,D,L,B", [(3, 2, 2, 3), (1, 1, 1, 2), (4, 9, 1, 2)])
def test_gradcheck(device, kind, F, D, L, B):
    h0, p, q = make_inputs(kind, B, F, D, L, device=device, seed=3)
    inputs = [h0.requires_grad_(), p.requires_grad_()] + ([q.requires_grad_()] if q is not None else [])
    fn = lambda h, w, *rest: dagfm_ext.dagfm_propagate(h, w, rest[0] if rest else None, kind)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", INTERACTIONS)
def test_opcheck_forward_and_backward_ops(device, kind):
    h0, p, q = make_inputs(kind, 5, 4, 3, 2, device=device)
    torch.library.opcheck(torch.ops.dagfm_ext.propagate_fwd.default, (h0, p, q, kind))
    grad = torch.randn(5, 3, 4, dtype=h0.dtype, device=device)
    torch.library.opcheck(torch.ops.dagfm_ext.propagate_bwd.default, (grad, h0, p, q, kind))
    # With requires_grad inputs too: the raw forward op is differentiable on its own.
    h0r, pr = h0.clone().requires_grad_(), p.clone().requires_grad_()
    qr = q.clone().requires_grad_() if q is not None else None
    torch.library.opcheck(torch.ops.dagfm_ext.propagate_fwd.default, (h0r, pr, qr, kind))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", INTERACTIONS)
def test_torch_compile_fullgraph_training_step(device, kind):
    h0, p, q = make_inputs(kind, 9, 5, 4, 2, dtype=torch.float32, device=device)

    def step(h, w, v):
        s = dagfm_ext.dagfm_propagate(h, w, v, kind)
        return (s * s).sum()

    compiled = torch.compile(step, fullgraph=True)
    args_e = [t.clone().requires_grad_() if t is not None else None for t in (h0, p, q)]
    args_c = [t.clone().requires_grad_() if t is not None else None for t in (h0, p, q)]
    loss_e = step(*args_e)
    loss_e.backward()
    loss_c = compiled(*args_c)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(args_c, args_e):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("kind", INTERACTIONS)
def test_torch_compile_inductor_cpu(kind):
    h0, p, q = make_inputs(kind, 9, 5, 4, 2, dtype=torch.float32)
    fn = torch.compile(lambda h, w, v: dagfm_ext.dagfm_propagate(h, w, v, kind), fullgraph=True)
    torch.testing.assert_close(fn(h0, p, q), reference.dagfm_propagate(h0, p, q, kind))


class _Student(torch.nn.Module):
    def __init__(self, kind, F, D, L):
        super().__init__()
        self.kind = kind
        _, p, q = make_inputs(kind, 1, F, D, L, dtype=torch.float32)
        self.p = torch.nn.Parameter(p)
        self.q = torch.nn.Parameter(q) if q is not None else None
        self.readout = torch.nn.Linear((L + 1) * F, 1)

    def forward(self, h0):
        return self.readout(dagfm_ext.dagfm_propagate(h0, self.p, self.q, self.kind).flatten(1)).squeeze(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", INTERACTIONS)
def test_torch_export_module(device, kind):
    model = _Student(kind, 5, 4, 2).to(device)
    h0 = torch.randn(6, 5, 4, device=device)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (h0,), dynamic_shapes={"h0": {0: batch}})
    assert any("dagfm_ext.propagate_fwd" in str(n.target) for n in exported.graph.nodes)
    other = torch.randn(11, 5, 4, device=device)
    torch.testing.assert_close(exported.module()(other), model(other))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", INTERACTIONS)
@pytest.mark.parametrize("batch", [200, 1500])  # on the CPU: a small batch cut in two chunks; four chunks
def test_gradients_bit_identical_across_runs_and_thread_counts(device, kind, batch):
    h0, p, q = make_inputs(kind, batch, 9, 16, 3, dtype=torch.float32, device=device, seed=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in ([1, 2, 1, 2] if device == "cpu" else [threads, threads]):
            torch.set_num_threads(n)
            _, grads, _ = run_with_grads(dagfm_ext.dagfm_propagate, h0, p, q, kind)
            results.append(grads)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", INTERACTIONS)
def test_non_contiguous_inputs_are_read_correctly(device, kind):
    h0, p, q = make_inputs(kind, 8, 5, 6, 2, device=device)
    h0_nc = h0.transpose(0, 1).contiguous().transpose(0, 1)
    p_nc = p.transpose(1, 2).contiguous().transpose(1, 2)
    assert not h0_nc.is_contiguous() and not p_nc.is_contiguous()
    expected = reference.dagfm_propagate(h0, p, q, kind)
    torch.testing.assert_close(dagfm_ext.dagfm_propagate(h0_nc, p_nc, q, kind), expected)
    # Expanded (stride-0) h0 as well.
    h0_b = h0[:1].expand(8, -1, -1)
    torch.testing.assert_close(dagfm_ext.dagfm_propagate(h0_b, p, q, kind),
                               reference.dagfm_propagate(h0_b.contiguous(), p, q, kind))


# ------------------------------------------------------------------------------------------------
# Bad inputs: each raises an error that names the argument.

def _good(kind="inner", device="cpu"):
    return make_inputs(kind, 4, 3, 2, 2, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda h0, p, q: (h0[0], p, q, "inner"), RuntimeError, r"h0: expected a 3-D tensor .*\(B, F, D\)"),
    (lambda h0, p, q: (h0, p[0], q, "inner"), RuntimeError, r"p: expected a 4-D tensor of shape \(L, F, F, D\)"),
    (lambda h0, p, q: (h0, p[:, :2], q, "inner"), RuntimeError, r"p: expected shape \(L, F, F, D\) = \(2, 3, 3, 2\)"),
    (lambda h0, p, q: (h0[:, :, :1], p, q, "inner"), RuntimeError, r"p: expected shape .*\(2, 3, 3, 1\)"),
    (lambda h0, p, q: (h0, p, p.clone(), "inner"), RuntimeError, r"q: expected None for interaction='inner'"),
    (lambda h0, p, q: (h0, p, None, "outer"), RuntimeError, r"q: expected a tensor of shape \(L, F, F, D\)"),
    (lambda h0, p, q: (h0, p, p[:1].clone(), "outer"), RuntimeError, r"q: expected shape"),
    (lambda h0, p, q: (h0, p, q, "kernel"), RuntimeError, r"p: expected a 5-D tensor of shape \(L, F, F, D, D\)"),
    (lambda h0, p, q: (h0, p, q, "cross"), (RuntimeError, ValueError), r"interaction: expected one of"),
    (lambda h0, p, q: (h0, p.float(), q, "inner"), RuntimeError, r"p: expected dtype .*Double"),
    (lambda h0, p, q: (h0.int(), p, q, "inner"), RuntimeError, r"h0: expected dtype float32 or float64"),
    (lambda h0, p, q: (h0[:, :0], p[:, :0, :0], q, "inner"), RuntimeError, r"h0: expected at least one field"),
])
def test_bad_inputs_name_the_argument(device, mutate, exc, pattern):
    h0, p, q = _good(device=device)
    args = mutate(h0, p, q)
    with pytest.raises(exc, match=pattern):
        dagfm_ext.dagfm_propagate(*args)


@pytest.mark.parametrize("dtype", [d for d in HALF_DTYPES if d not in dtypes_on("cpu")])
@pytest.mark.parametrize("kind", INTERACTIONS)
def test_half_on_cpu_is_a_clear_error(kind, dtype):
    # float16 / bfloat16 run on CUDA only; on the CPU the inference, training and backward ops say so.
    h0, p, q = make_inputs(kind, 4, 3, 2, 2, dtype=dtype)
    torch_name = {torch.float16: "Half", torch.bfloat16: "BFloat16"}[dtype]
    pattern = (rf"h0: expected dtype float32 or float64 on device cpu, got {torch_name} "
               r"\(float16 and bfloat16 are supported on CUDA only")
    with pytest.raises(RuntimeError, match=pattern):
        dagfm_ext.dagfm_propagate(h0, p, q, kind)
    with pytest.raises(RuntimeError, match=pattern):
        dagfm_ext.dagfm_propagate(h0.requires_grad_(), p.requires_grad_(), q, kind)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.dagfm_ext.propagate_bwd(torch.zeros(4, 3, 3, dtype=dtype), h0, p, q, kind)


def test_interaction_must_be_a_string():
    h0, p, q = _good()
    with pytest.raises(TypeError, match="interaction"):
        dagfm_ext.dagfm_propagate(h0, p, q, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch_names_the_argument():
    h0, p, q = _good()
    with pytest.raises(RuntimeError, match=r"p: expected device"):
        dagfm_ext.dagfm_propagate(h0.cuda(), p, q, "inner")


def test_backward_op_checks_grad_states():
    h0, p, q = _good()
    with pytest.raises(RuntimeError, match=r"grad_states: expected shape \(B, L\+1, F\) = \(4, 3, 3\)"):
        torch.ops.dagfm_ext.propagate_bwd(torch.zeros(4, 2, 3, dtype=h0.dtype), h0, p, q, "inner")
    with pytest.raises(RuntimeError, match=r"grad_states: expected dtype"):
        torch.ops.dagfm_ext.propagate_bwd(torch.zeros(4, 3, 3), h0, p, q, "inner")


def test_build_info_reports_the_build():
    info = dagfm_ext.build_info()
    assert info["cpu_kernels"] is True
    assert isinstance(info["cuda"], bool)
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert info["compiler"]


def test_states_t0_is_the_field_sum_of_h0():
    h0, p, q = _good()
    s = dagfm_ext.dagfm_propagate(h0, p, q, "inner")
    torch.testing.assert_close(s[:, 0], h0.sum(-1), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# The training forward: what a backend keeps for its backward must not change the gradients.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", INTERACTIONS)
def test_training_forward_op_and_saved_messages(device, kind):
    h0, p, q = make_inputs(kind, 70, 6, 9, 3, device=device)
    states, saved = torch.ops.dagfm_ext.propagate_fwd_train(h0, p, q, kind)
    torch.testing.assert_close(states, torch.ops.dagfm_ext.propagate_fwd(h0, p, q, kind), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.dagfm_ext.propagate_fwd_train.default, (h0, p, q, kind))
    grad = torch.randn_like(states)
    with_saved = torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, kind, saved)
    torch.library.opcheck(torch.ops.dagfm_ext.propagate_bwd.default, (grad, h0, p, q, kind, saved))
    recomputed = torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, kind)
    for a, b in zip(with_saved, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert saved.shape == (70 * 3 * 6 * 9,)
    # saved holds the messages a^t, laid out (B, L, F, D): h^t = h0 * a^t sums to the states.
    torch.testing.assert_close((h0[:, None] * saved.view(70, 3, 6, 9)).sum(-1), states[:, 1:])


# The GEMM backward of the kernel and outer interactions (csrc/cuda/gemm_backward.cpp): the CUDA backend's
# backward when the messages are kept; device-agnostic, so its algebra is checked here on every device.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["kernel", "outer"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (0, 4, 2, 2), (5, 3, 2, 0), (7, 5, 3, 2), (33, 13, 4, 3),
                                   (9, 70, 2, 1), (3, 2, 17, 2), (5, 8, 2, 2), (4, 17, 2, 3)])
def test_gemm_backward_matches_autograd(device, kind, shape):
    # F = 8, 17: field blocks of the triangle-aware products end exactly at F / one field past it.
    B, F, D, L = shape
    h0, p, q = make_inputs(kind, B, F, D, L, device=device, seed=21)
    gs = torch.randn(B, L + 1, F, dtype=h0.dtype, device=device)
    _, saved = torch.ops.dagfm_ext.propagate_fwd_train(h0, p, q, kind)
    # NaN below the diagonal of the weights: never read, and their gradients there exactly zero.
    lower = torch.ones(F, F, dtype=torch.bool, device=device).tril(-1).view((1, F, F) + (1,) * (p.dim() - 3))
    poison = lambda t: None if t is None else t.masked_fill(lower.view((1, F, F) + (1,) * (t.dim() - 3)), float("nan"))
    got = dagfm_ext._C._gemm_backward(gs, h0, poison(p), poison(q), kind, saved)
    leaves = [t.clone().requires_grad_() for t in (h0, p, q) if t is not None]
    want = torch.autograd.grad(reference.dagfm_propagate(*leaves, *([None] if q is None else []), kind), leaves,
                               gs, allow_unused=True)
    want = [w if w is not None else torch.zeros_like(t) for w, t in zip(want, leaves)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    for g in got[1:]:
        if g.numel():
            assert (g[lower.view((1, F, F) + (1,) * (g.dim() - 3)).expand_as(g)] == 0).all()


def test_gemm_backward_float32_and_checks():
    for kind in ("kernel", "outer"):
        h0, p, q = make_inputs(kind, 50, 7, 4, 3, dtype=torch.float32, seed=22)
        gs = torch.randn(50, 4, 7, generator=torch.Generator().manual_seed(23))
        _, saved = torch.ops.dagfm_ext.propagate_fwd_train(h0, p, q, kind)
        got = dagfm_ext._C._gemm_backward(gs, h0, p, q, kind, saved)
        want = torch.ops.dagfm_ext.propagate_bwd(gs, h0, p, q, kind, saved)
        for a, b in zip(got, want):
            # Two float32 summation orders: gradients up to ~200 differ by a few float32 ulps of
            # the largest, so the absolute tolerance follows the gradient's scale.
            scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(RuntimeError, match="saved: the messages are required"):
        dagfm_ext._C._gemm_backward(gs, h0, p, q, "outer", torch.empty(0))
    with pytest.raises(RuntimeError, match="saved: expected a 1-D tensor"):
        dagfm_ext._C._gemm_backward(gs, h0, p, q, "outer", saved[:-1])
    with pytest.raises(RuntimeError, match="interaction: expected 'outer' or 'kernel'"):
        dagfm_ext._C._gemm_backward(gs, h0, p, None, "inner", saved)


def test_saved_messages_are_checked():
    h0, p, q = make_inputs("kernel", 5, 3, 4, 2)
    grad = torch.zeros(5, 3, 3, dtype=h0.dtype)
    with pytest.raises(RuntimeError, match=r"saved: expected a 1-D tensor of B\*L\*F\*D = 120 elements"):
        torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, "kernel", torch.zeros(5, 2, 3, 4, dtype=h0.dtype))
    with pytest.raises(RuntimeError, match=r"saved: expected dtype"):
        torch.ops.dagfm_ext.propagate_bwd(grad, h0, p, q, "kernel", torch.zeros(120))


def test_inference_keeps_nothing_for_a_backward():
    h0, p, q = make_inputs("kernel", 5, 3, 4, 2)
    with torch.no_grad():
        s = dagfm_ext.dagfm_propagate(h0, p.requires_grad_(), q, "kernel")
    assert s.grad_fn is None
    s = dagfm_ext.dagfm_propagate(h0, p, q, "kernel")
    assert s.grad_fn is not None
