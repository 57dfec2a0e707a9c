"""The field-mixing op h0[b] = C @ x[b] (dagfm_ext::field_mix / field_mix_bwd) against the batched
matmul it replaces: values, both gradients, gradcheck, opcheck, strides, bad arguments, thread
counts and the lower instruction sets."""
import pytest
import torch
from conftest import run_under_isa

from dagfm_ext import reference
from dagfm_ext.field_mix import field_mix
from dagfm_ext.testing import rel_err

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (B, F, D): one field, one dim, dims that are not a multiple of any vector width, more fields than
# a register block, the empty and the single batch, and a large batch (several gradient chunks).
SHAPES = [(3, 1, 4), (5, 7, 1), (6, 9, 5), (7, 13, 17), (4, 70, 8), (0, 6, 16), (1, 39, 16), (33, 39, 16),
          (4096, 39, 16), (600, 11, 3), (9, 5, 24), (10, 4, 2)]


def _inputs(B, F, D, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, D, generator=g, dtype=dtype).to(device)
    connect = torch.randn(F, F, generator=g, dtype=dtype).to(device)
    grad = torch.randn(B, F, D, generator=g, dtype=dtype).to(device)
    return x, connect, grad


def _bmm_reference(x, connect, grad):
    """The batched-matmul form, its values and autograd's gradients."""
    x = x.detach().requires_grad_()
    connect = connect.detach().requires_grad_()
    out = reference.field_mix(x, connect)
    gx, gc = torch.autograd.grad(out, (x, connect), grad, allow_unused=True)
    return out.detach(), gx, (gc if gc is not None else torch.zeros_like(connect))


def _op_with_grads(x, connect, grad):
    x = x.detach().requires_grad_()
    connect = connect.detach().requires_grad_()
    out = field_mix(x, connect)
    gx, gc = torch.autograd.grad(out, (x, connect), grad)
    return out.detach(), gx, gc


def _parity_failures(dtype, tol):
    """The shapes where the op's values or gradients differ from the bmm form in float64 by more
    than ``tol`` (relative); computed in ``dtype``."""
    failures = []
    for B, F, D in SHAPES:
        x, connect, grad = _inputs(B, F, D)
        want = _bmm_reference(x, connect, grad)
        got = _op_with_grads(x.to(dtype), connect.to(dtype), grad.to(dtype))
        for name, a, b in zip(("out", "grad_x", "grad_connect"), got, want):
            err = rel_err(a.double(), b) if b.numel() else 0.0
            if not err <= tol:
                failures.append(((B, F, D), name, err))
    return failures


def test_float64_matches_the_batched_matmul():
    assert _parity_failures(torch.float64, 1e-12) == []


def test_float32_matches_the_batched_matmul():
    assert _parity_failures(torch.float32, 1e-5) == []


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_lower_instruction_sets_match_the_batched_matmul(isa):
    run_under_isa(isa, """
        from tests.test_field_mix import _parity_failures
        assert _parity_failures(torch.float64, 1e-12) == [], _parity_failures(torch.float64, 1e-12)
        assert _parity_failures(torch.float32, 1e-5) == [], _parity_failures(torch.float32, 1e-5)
        """, timeout=600)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 1, 1), (0, 3, 2), (5, 9, 16)])
def test_gradcheck(device, shape):
    x, connect, _ = _inputs(*shape, device=device)
    x.requires_grad_()
    connect.requires_grad_()
    assert torch.autograd.gradcheck(field_mix, (x, connect), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x, connect, grad = (t.to(dtype) for t in _inputs(6, 5, 7, device=device))
    torch.library.opcheck(torch.ops.dagfm_ext.field_mix.default, (x.requires_grad_(), connect.requires_grad_()))
    torch.library.opcheck(torch.ops.dagfm_ext.field_mix_bwd.default, (grad, x.detach(), connect.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_16_bit_dtypes_match_the_batched_matmul(device):
    for dtype in (torch.bfloat16, torch.float16):
        x, connect, grad = (t.to(dtype) for t in _inputs(8, 6, 5, device=device))
        got = _op_with_grads(x, connect, grad)
        want = _bmm_reference(x.double(), connect.double(), grad.double())
        for a, b in zip(got, want):
            assert a.dtype == dtype
            assert rel_err(a.double(), b) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_are_read_correctly(device):
    x, connect, grad = _inputs(7, 6, 5, device=device)
    x_nc = x.transpose(1, 2).contiguous().transpose(1, 2)      # (B, F, D) with D the slow dim
    connect_nc = connect.t().contiguous().t()                    # column-major
    grad_nc = torch.stack([grad, grad], dim=3)[..., 0]          # strided last dim
    assert not (x_nc.is_contiguous() or connect_nc.is_contiguous() or grad_nc.is_contiguous())
    want = _bmm_reference(x, connect, grad)
    got = _op_with_grads(x_nc, connect_nc, grad_nc)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12
    gx, gc = torch.ops.dagfm_ext.field_mix_bwd(grad_nc, x_nc, connect_nc)
    assert rel_err(gx, want[1]) < 1e-12 and rel_err(gc, want[2]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 200, 300, 4096])
def test_gradients_bit_identical_across_thread_counts(dtype, B):
    x, connect, grad = (t.to(dtype) for t in _inputs(B, 39, 16, seed=3))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(_op_with_grads(x, connect, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_inference_and_training_give_the_same_values():
    x, connect, _ = _inputs(5, 8, 16, dtype=torch.float32)
    with torch.no_grad():
        served = field_mix(x, connect)
    trained = field_mix(x, connect.clone().requires_grad_())
    assert torch.equal(served, trained.detach())


def test_double_backward_is_an_error():
    x, connect, _ = _inputs(3, 4, 5)
    x.requires_grad_()
    connect.requires_grad_()
    (gx,) = torch.autograd.grad(field_mix(x, connect).square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="field_mix: double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("mutate, pattern", [
    (lambda x, c: (x[0], c), r"x: expected a 3-D tensor of shape \(B, F, D\)"),
    (lambda x, c: (x, c[:-1]), r"connect: expected shape \(F, F\) = \(4, 4\)"),
    (lambda x, c: (x, c.float()), r"connect: expected dtype Double \(the dtype of x\)"),
    (lambda x, c: (x.long(), c.long()), r"x: expected a floating dtype"),
    (lambda x, c: (x[:, :0], c[:0, :0]), r"x: expected at least one field and one embedding dim"),
    (lambda x, c: (x[:, :, :0], c), r"x: expected at least one field and one embedding dim"),
])
def test_bad_arguments_name_the_argument(mutate, pattern):
    x, connect, _ = _inputs(3, 4, 5)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.dagfm_ext.field_mix(*mutate(x, connect))
    with pytest.raises(RuntimeError, match=pattern):
        field_mix(*mutate(x, connect))


def test_backward_op_checks_grad():
    x, connect, grad = _inputs(3, 4, 5)
    with pytest.raises(RuntimeError, match=r"grad: expected shape \(B, F, D\)"):
        torch.ops.dagfm_ext.field_mix_bwd(grad[:, :, :-1], x, connect)
    with pytest.raises(RuntimeError, match="grad: expected dtype Double"):
        torch.ops.dagfm_ext.field_mix_bwd(grad.float(), x, connect)


def test_autocast_on_cpu_runs_in_float32():
    x, connect, _ = (t.to(torch.bfloat16) for t in _inputs(4, 5, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = field_mix(x, connect)
        raw = torch.ops.dagfm_ext.field_mix(x, connect)
    assert out.dtype == raw.dtype == torch.float32
    assert torch.equal(out, torch.bmm(connect.float().expand(4, -1, -1), x.float()))


def test_torch_compile_fullgraph_and_export():
    x, connect, grad = _inputs(6, 5, 7, dtype=torch.float32)

    def step(x, connect):
        return field_mix(x, connect).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xc, cc = x.clone().requires_grad_(), connect.clone().requires_grad_()
    compiled(xc, cc).backward()
    xe, ce = x.clone().requires_grad_(), connect.clone().requires_grad_()
    step(xe, ce).backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(cc.grad, ce.grad)

    class Mix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.connect = torch.nn.Parameter(connect.clone())

        def forward(self, x):
            return field_mix(x, self.connect)

    exported = torch.export.export(Mix(), (x,))
    torch.testing.assert_close(exported.module()(x), Mix()(x))
