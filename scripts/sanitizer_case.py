"""A small run of the CUDA kernels for compute-sanitizer (scripts/gpu_check.sh runs it under
memcheck and racecheck). Every interaction, float32 and float64, float16 and bfloat16, the
shared-memory path and the global-memory fallback, a ragged last tile, a grid smaller than the
tile count, the register-blocked forward over several weight chunks / column blocks and the first
forward kernels it replaced, the training path (kept messages, the register-blocked inner backward),
and the tensor-core forward of the kernel interaction (float16, bfloat16, TF32). Inputs are
made on the CPU and results checked on the CPU, so few kernels besides ours run under the tool.

    python scripts/sanitizer_case.py [--fast-only]     (exit 0: all results match the reference)
"""
from __future__ import annotations

import os
import sys

import torch

import dagfm_ext  # noqa: F401  (loads the ops)
from dagfm_ext import reference
from dagfm_ext.testing import make_grad_states, make_inputs, rel_err

SHAPES = [  # (B, F, D, L)
    (5, 7, 4, 2),      # ragged tile, several chunks of rows for the kernel interaction
    (3001, 6, 3, 1),   # more tiles than resident blocks: blocks loop over tiles
]
TC_SHAPE = (37, 7, 16, 2)  # the tensor-core forward (kernel interaction, D = 16): ragged warp tiles
# Relative error against float64 that each dtype must stay under (TF32: float32 with TF32 allowed).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, "tf32": 5e-3, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def check(kind, B, F, D, L, dtype, fallback, tf32=False, keep_messages=False):
    os.environ["DAGFM_CUDA_FORCE_GLOBAL_MEMORY"] = "1" if fallback else "0"
    dagfm_ext._C._reread_cuda_switches()  # the extension reads its switches once per process
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    seed = B * 1000 + F
    dev = [*make_inputs(kind, B, F, D, L, dtype, "cuda", seed), make_grad_states(B, F, L, dtype, "cuda", seed + 1)]
    if keep_messages:  # the training path: the forward keeps a^t, the backward reads them
        s, saved = torch.ops.dagfm_ext.propagate_fwd_train(dev[0], dev[1], dev[2], kind)
        s = s.cpu().double()
        grads = torch.ops.dagfm_ext.propagate_bwd(dev[3], dev[0], dev[1], dev[2], kind, saved)
    else:
        s = torch.ops.dagfm_ext.propagate_fwd(dev[0], dev[1], dev[2], kind).cpu().double()
        grads = torch.ops.dagfm_ext.propagate_bwd(dev[3], dev[0], dev[1], dev[2], kind)
    grads = [t.cpu().double() for t in grads]
    torch.cuda.synchronize()
    # CPU reference in float64, on the inputs as rounded to dtype
    leaves = [t.cpu().double().requires_grad_() if t is not None else None for t in dev[:3]]
    s_ref = reference.dagfm_propagate(leaves[0], leaves[1], leaves[2], kind)
    want = torch.autograd.grad(s_ref, [t for t in leaves if t is not None], dev[3].cpu().double())
    tol = TOL["tf32" if tf32 else dtype]
    errs = [rel_err(a, b) for a, b in zip([s, *grads], [s_ref.detach(), *want])]
    ok = all(e < tol for e in errs)  # a NaN error fails too
    print(f"{'ok  ' if ok else 'FAIL'} {kind:6s} B={B} F={F} D={D} L={L} {str(dtype) + ('/tf32' if tf32 else ''):19s} "
          f"fallback={int(fallback)} saved={int(keep_messages)} max rel err {max(errs):.1e}", flush=True)
    return ok


def main():
    fast_only = "--fast-only" in sys.argv
    ok = True
    for kind in ("inner", "outer", "kernel"):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for fallback in ((False,) if fast_only else (False, True)):
                for shape in SHAPES:
                    ok &= check(kind, *shape, dtype, fallback)
    # The register-blocked forward (the default off tensor cores) over several weight chunks
    # (inner / outer at F = 80) or column blocks (kernel, F = 40, D = 8: three blocks), and the
    # first forward kernels it replaced.
    for kind, shape in (("inner", (33, 80, 16, 1)), ("outer", (33, 80, 16, 1)), ("kernel", (33, 40, 8, 1))):
        ok &= check(kind, *shape, torch.float32, False)
        os.environ["DAGFM_CUDA_REGISTER_BLOCKING"] = "0"  # check() rereads the switches
        ok &= check(kind, *SHAPES[0], torch.float32, False)
        del os.environ["DAGFM_CUDA_REGISTER_BLOCKING"]
    # The training path (messages kept; the inner backward is then register-blocked), every kind.
    for kind in ("inner", "outer", "kernel"):
        for shape in SHAPES:
            ok &= check(kind, *shape, torch.float32, False, keep_messages=True)
    # Tensor-core forward (shared memory only: racecheck looks at it too).
    for dtype in (torch.float16, torch.bfloat16):
        ok &= check("kernel", *TC_SHAPE, dtype, False)
    ok &= check("kernel", *TC_SHAPE, torch.float32, False, tf32=True)
    torch.set_float32_matmul_precision("highest")
    print("sanitizer_case:", "all results match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
