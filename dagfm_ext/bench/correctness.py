"""The gate every timed implementation passes first: its outputs against the float64 reference.

The tolerance is relative to the reference's own error in the benchmark dtype:
``max(4 * err_ref, rtol * max|ref64|)`` with rtol 1e-5 for float32, 1e-10 for float64 and 1e-2 for
the half types. A mismatch, a non-finite value or an exception fails the case, which is then
reported without a time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..testing import make_grad_states, make_inputs
from .arguments import Shape
from .ops import output_names, reference_op, run_pass

__all__ = ["RTOL", "case_inputs", "reference_outputs", "compare_outputs", "check_fused"]

RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def case_inputs(shape: Shape, interaction: str, device, dtype, seed: int = 0, requires_grad: bool = False):
    """(h0, p, q, grad_states) of one case, from ``dagfm_ext.testing``."""
    B, F, D, L = shape
    h0, p, q = make_inputs(interaction, B, F, D, L, dtype, device, seed, requires_grad=requires_grad)
    return h0, p, q, make_grad_states(B, F, L, dtype, device, seed=seed + 1)


def compare_outputs(outputs: Sequence, ref64: Sequence, ref_lo: Sequence, names: Sequence[str], dtype) -> dict:
    """Max abs error of ``outputs`` vs ``ref64`` against a tolerance set by ``ref_lo``'s own error."""
    checks, ok, worst = [], True, ""
    if len(outputs) != len(ref64):
        return {"ok": False, "detail": f"expected {len(ref64)} outputs, got {len(outputs)}", "checks": []}
    for name, out, r64, rlo in zip(names, outputs, ref64, ref_lo):
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(r64.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return {"ok": False, "detail": f"{name}: expected shape {tuple(r64.shape)}, got {got}",
                    "checks": checks}
        o = out.detach().to(torch.float64)
        scale = float(r64.abs().max()) if r64.numel() else 0.0
        err = float((o - r64).abs().max()) if r64.numel() else 0.0
        ref_err = float((rlo.detach().to(torch.float64) - r64).abs().max()) if r64.numel() else 0.0
        tol = max(4.0 * ref_err, RTOL.get(dtype, 1e-5) * scale, 1e-300)
        finite = bool(torch.isfinite(o).all())
        good = finite and err <= tol
        checks.append({"output": name, "max_abs_err": err, "reference_own_err": ref_err, "tol": tol,
                       "max_abs_ref": scale, "finite": finite, "ok": good})
        if not good and ok:
            ok = False
            worst = (f"{name}: non-finite values" if not finite else
                     f"{name}: max abs err {err:.3g} > tol {tol:.3g} (|ref| max {scale:.3g})")
    return {"ok": ok, "detail": worst or "ok", "checks": checks}


def reference_outputs(h0, p, q, grad_states, interaction: str, pass_: str, dtype):
    """(float64 reference, reference in the benchmark dtype) outputs on the same inputs."""
    def as64(t):
        return None if t is None else t.detach().to(torch.float64).requires_grad_(pass_ != "fwd")

    ref64 = run_pass(reference_op, as64(h0), as64(p), as64(q), grad_states.to(torch.float64), interaction, pass_)
    ref_lo = ref64 if dtype == torch.float64 else run_pass(reference_op, h0, p, q, grad_states, interaction, pass_)
    return ref64, ref_lo


def check_fused(op: Callable, shape: Shape, interaction: str, pass_: str, device="cpu",
                dtype=torch.float32, seed: int = 0, refs=None, inputs=None) -> dict:
    """Check ``op(h0, p, q, interaction)`` against the float64 reference: {'ok', 'detail', 'checks'}.

    Any exception raised by ``op`` is a failure (reported, not raised).
    """
    if inputs is None:
        inputs = case_inputs(shape, interaction, device, dtype, seed, requires_grad=pass_ != "fwd")
    h0, p, q, gs = inputs
    if refs is None:
        refs = reference_outputs(h0, p, q, gs, interaction, pass_, dtype)
    ref64, ref_lo = refs
    try:
        outs = run_pass(op, h0, p, q, gs, interaction, pass_)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a crash of the op under test is a failed check, not a crashed benchmark
        return {"ok": False, "detail": f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "checks": []}
    return compare_outputs(outs, ref64, ref_lo, output_names(q, pass_), dtype)
