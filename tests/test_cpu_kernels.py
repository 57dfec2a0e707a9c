"""The CPU kernels' own contracts: every instruction-set variant against the reference (states,
the sum z and the gradients), field j's result independent of the fields after it (non-finite
values included), and weights changed between two calls always seen by the second one."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_under_isa

import dagfm_ext
from dagfm_ext import reference
from dagfm_ext.testing import make_grad_states, make_inputs, rel_err

KINDS = reference.INTERACTIONS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Embedding sizes with and without whole vectors (and the BLAS backward from D = 8), batches
# around the register blocks (1, 2-3, 6-24 samples), the 16-sample lane groups (a partial one in
# 30) and the 48-row forward tiles, fields around the 1-4 field blocks.
SWEEP = [(F, D, B) for F in (1, 6, 9) for D in (1, 4, 5, 8, 16, 32) for B in (1, 7, 30, 50)]


def _sum_checks(kind, leaves, gs, dtype):
    """(what, got, want) for the sum op: states, z and, with a gradient of z too, the gradients of
    the training forward; states and z of the inference forward."""
    B, F, D = leaves[0].shape
    gz = torch.randn(B, F, D, dtype=torch.float64, generator=torch.Generator().manual_seed(B + F + D))

    def run(fn, dt):
        xs = [t.detach().to(dt).requires_grad_() for t in leaves]
        states, z = fn(xs[0], xs[1], xs[2] if len(xs) > 2 else None, kind)
        return states, z, torch.autograd.grad((states, z), xs, (gs.to(dt), gz.to(dt)))

    s_want, z_want, g_want = run(reference.dagfm_propagate_with_sum, torch.float64)
    s_got, z_got, g_got = run(dagfm_ext.dagfm_propagate_with_sum, dtype)
    with torch.no_grad():
        s_inf, z_inf = dagfm_ext.dagfm_propagate_with_sum(*[t.detach().to(dtype) for t in leaves[:2]],
                                                          leaves[2].detach().to(dtype) if len(leaves) > 2 else None,
                                                          kind)
    return [("sum states", s_got, s_want), ("z", z_got, z_want), ("inference sum states", s_inf, s_want),
            ("inference z", z_inf, z_want)] + [
            (f"sum grad {n}", a, b) for n, a, b in zip(("h0", "p", "q"), g_got, g_want)]


def _parity_failures(dtype, tol):
    """(kind, F, D, B, what, error) for every sweep case whose values or gradients are off."""
    bad = []
    for kind in KINDS:
        for F, D, B in SWEEP:
            h0, p, q = make_inputs(kind, B, F, D, 2, seed=F + D + B)
            gs = make_grad_states(B, F, 2)
            leaves = [t for t in (h0, p, q) if t is not None]
            want = reference.dagfm_propagate(*[t.requires_grad_() for t in leaves[:2]],
                                             leaves[2].requires_grad_() if q is not None else None,
                                             interaction=kind)
            want_g = torch.autograd.grad(want, leaves, gs)
            cast = [t.detach().to(dtype).requires_grad_() for t in leaves]
            got = dagfm_ext.dagfm_propagate(cast[0], cast[1], cast[2] if q is not None else None, kind)
            got_g = torch.autograd.grad(got, cast, gs.to(dtype))
            with torch.no_grad():
                got_inf = dagfm_ext.dagfm_propagate(*[t.detach() for t in cast[:2]],
                                                    cast[2].detach() if q is not None else None, kind)
            for what, a, b in [("states", got, want), ("inference", got_inf, want)] + [
                    (f"grad {n}", a, b) for n, a, b in zip(("h0", "p", "q"), got_g, want_g)] + _sum_checks(
                    kind, leaves, gs, dtype):
                err = rel_err(a, b.detach())
                if not err < tol:
                    bad.append((kind, F, D, B, what, err))
    return bad


def test_parity_sweep_float64():
    assert _parity_failures(torch.float64, 1e-10) == []


def test_parity_sweep_float32():
    assert _parity_failures(torch.float32, 1e-4) == []


@pytest.mark.parametrize("D", [8, 16])
def test_kernel_large_batch_path_matches_the_reference(D):
    """From B = 512 the kernel forward runs as BLAS products: values, messages and gradients."""
    B, F, L = 600, 7, 2
    h0, p, _ = make_inputs("kernel", B, F, D, L, seed=D)
    gs = make_grad_states(B, F, L)
    leaves = [h0.clone().requires_grad_(), p.clone().requires_grad_()]
    want = reference.dagfm_propagate(*leaves, interaction="kernel")
    want_g = torch.autograd.grad(want, leaves, gs)
    with torch.no_grad():
        assert rel_err(dagfm_ext.dagfm_propagate(h0, p, None, "kernel"), want.detach()) < 1e-10
    leaves = [h0.clone().requires_grad_(), p.clone().requires_grad_()]
    got = dagfm_ext.dagfm_propagate(*leaves, interaction="kernel")
    assert rel_err(got, want.detach()) < 1e-10
    for a, b in zip(torch.autograd.grad(got, leaves, gs), want_g):
        assert rel_err(a, b) < 1e-10


def test_isa_is_the_best_the_machine_has_by_default():
    assert torch.ops.dagfm_ext.cpu_isa() in ("avx512", "avx2", "generic")


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_lower_instruction_sets_match_the_reference(isa):
    """DAGFM_CPU_ISA lowers the dispatch: the AVX2 and portable loops run here too."""
    run_under_isa(isa, """
        from tests.test_cpu_kernels import _parity_failures
        assert _parity_failures(torch.float64, 1e-10) == [], _parity_failures(torch.float64, 1e-10)
        assert _parity_failures(torch.float32, 1e-4) == [], _parity_failures(torch.float32, 1e-4)
        """)


def test_unknown_isa_name_is_a_clear_error():
    script = "import dagfm_ext, torch; torch.ops.dagfm_ext.cpu_isa()"
    env = dict(os.environ, DAGFM_CPU_ISA="sse9", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "DAGFM_CPU_ISA: expected one of 'avx512', 'avx2', 'generic'" in out.stderr


# ------------------------------------------------------------------------------------------------
# Field j depends on fields i <= j only, whatever the later fields hold.

def _states(kind, h0, p, q, training):
    if training:
        leaves = [t.detach().requires_grad_() for t in (h0, p)]
        qq = q.detach().requires_grad_() if q is not None else None
        return dagfm_ext.dagfm_propagate(leaves[0], leaves[1], qq, kind).detach()
    with torch.no_grad():
        return dagfm_ext.dagfm_propagate(h0, p, q, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("D", [4, 16])
@pytest.mark.parametrize("B", [1, 29, 600])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_field_does_not_reach_earlier_fields(kind, training, D, B, bad):
    F, L, k = 9, 3, 5
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=torch.float32, seed=3)
    clean = _states(kind, h0, p, q, training)
    h0_bad = h0.clone()
    h0_bad[:, k, 1] = bad
    got = _states(kind, h0_bad, p, q, training)
    assert torch.isfinite(got[:, :, :k]).all()
    assert torch.equal(got[:, :, :k], clean[:, :, :k])
    assert not torch.isfinite(got[:, 0, k]).any()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D", [4, 16])
def test_non_finite_lower_triangle_is_never_read(kind, D):
    F, L, B = 9, 2, 13
    h0, p, q = make_inputs(kind, B, F, D, L, dtype=torch.float32, seed=4)
    lower = torch.ones(F, F, dtype=torch.bool).tril(-1)

    def poison(t):
        return None if t is None else t.masked_fill(lower.view((1, F, F) + (1,) * (t.dim() - 3)), float("inf"))

    for fn in (dagfm_ext.dagfm_propagate, reference.dagfm_propagate):
        clean = fn(h0, p, q, kind)
        got = fn(h0, poison(p), poison(q), kind)
        assert torch.isfinite(got).all(), fn
        torch.testing.assert_close(got, clean, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# A weight changed between two calls is seen by the second call.

def _model(kind):
    torch.manual_seed(0)
    return dagfm_ext.DAGFM(6, 8, 2, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_inference_sees_in_place_weight_updates(kind):
    model = _model(kind).eval()
    emb = torch.randn(5, 6, 8)
    with torch.no_grad():
        before = model(emb)
        model.p.mul_(1.5)  # same tensor, same storage, new values
        after = model(emb)
        model.p.data.add_(0.25)  # through .data: the version counter does not see it
        after_data = model(emb)
        expected = model.linear(reference.dagfm_propagate(model.mixed(emb), model.p, model.q, kind).flatten(1))
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after_data, expected.squeeze(-1))


@pytest.mark.parametrize("kind", KINDS)
def test_training_sees_optimizer_steps(kind):
    model = _model(kind).double()
    emb = torch.randn(7, 6, 8, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        loss = model(emb).square().mean()
        loss.backward()
        s_ref = reference.dagfm_propagate(model.mixed(emb), model.p, model.q, kind)
        g_ref = torch.autograd.grad(model.linear(s_ref.flatten(1)).squeeze(-1).square().mean(), model.p)[0]
        torch.testing.assert_close(model.p.grad, g_ref, rtol=1e-10, atol=1e-12)
        opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_model_sees_weight_updates(kind):
    model = _model(kind).eval()
    compiled = torch.compile(model, fullgraph=True)
    emb = torch.randn(4, 6, 8)
    with torch.no_grad():
        first = compiled(emb)
        torch.testing.assert_close(first, model(emb))
        model.p.mul_(-2.0)
        second = compiled(emb)
        torch.testing.assert_close(second, model(emb))
    assert not torch.allclose(first, second)


# ------------------------------------------------------------------------------------------------
# Small batches of the kernel interaction split the target fields over the threads.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 5, 30, 47, 48])
def test_kernel_small_batch_gives_the_same_bits_on_any_thread_count(dtype, B):
    """One thread runs the samples, two split the fields of every layer: the same sums either way,
    for the states, the training forward's messages and both sum ops' z, and each sample as if it
    came alone."""
    h0, p, _ = make_inputs("kernel", B, 39, 16, 2, dtype=dtype, seed=B)
    before = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                got[threads] = (dagfm_ext.dagfm_propagate(h0, p, None, "kernel"),
                                *torch.ops.dagfm_ext.propagate_fwd_train(h0, p, None, "kernel"),
                                dagfm_ext.dagfm_propagate(h0[-1:], p, None, "kernel"),
                                *torch.ops.dagfm_ext.propagate_sum_fwd(h0, p, None, "kernel"),
                                *torch.ops.dagfm_ext.propagate_sum_fwd_train(h0, p, None, "kernel"),
                                torch.ops.dagfm_ext.propagate_sum_fwd(h0[-1:], p, None, "kernel")[1])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got[1], got[2]):
        assert torch.equal(a, b)
    states, train_states, messages, last_alone, sum_states, z, train_sum_states, train_z, train_messages, \
        z_alone = got[2]
    for other in (train_states, sum_states, train_sum_states):
        assert torch.equal(states, other)
    assert torch.equal(states[-1:], last_alone) and torch.equal(messages, train_messages)
    assert torch.equal(z, train_z) and torch.equal(z[-1:], z_alone)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    want_states, want_z = reference.dagfm_propagate_with_sum(h0, p, None, "kernel")
    assert rel_err(states, want_states) < tol and rel_err(z, want_z) < tol
