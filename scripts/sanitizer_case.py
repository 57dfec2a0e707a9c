"""A small run of the CUDA kernels for compute-sanitizer (scripts/gpu_check.sh runs it under
memcheck and racecheck). Every interaction, float32 and float64, the shared-memory path and the
global-memory fallback, a ragged last tile, and a grid smaller than the tile count. Inputs are
made on the CPU and results checked on the CPU, so few kernels besides ours run under the tool.

    python scripts/sanitizer_case.py [--fast-only]     (exit 0: all results match the reference)
"""
from __future__ import annotations

import os
import sys

import torch

import dagfm_ext
from dagfm_ext import reference

SHAPES = [  # (B, F, D, L)
    (5, 7, 4, 2),      # ragged tile, several chunks of rows for the kernel interaction
    (3001, 6, 3, 1),   # more tiles than resident blocks: blocks loop over tiles
]


def check(kind, B, F, D, L, dtype, fallback):
    os.environ["DAGFM_CUDA_FORCE_FALLBACK"] = "1" if fallback else "0"
    g = torch.Generator().manual_seed(B * 1000 + F)
    h0 = torch.randn(B, F, D, generator=g, dtype=torch.float64)
    p = torch.randn((L, F, F, D, D) if kind == "kernel" else (L, F, F, D), generator=g, dtype=torch.float64) / F
    q = torch.randn(L, F, F, D, generator=g, dtype=torch.float64) if kind == "outer" else None
    gs = torch.randn(B, L + 1, F, generator=g, dtype=torch.float64)
    dev = [t.to("cuda", dtype) if t is not None else None for t in (h0, p, q, gs)]
    s = torch.ops.dagfm_ext.propagate_fwd(dev[0], dev[1], dev[2], kind).cpu().double()
    grads = [t.cpu().double() for t in torch.ops.dagfm_ext.propagate_bwd(dev[3], dev[0], dev[1], dev[2], kind)]
    torch.cuda.synchronize()
    # CPU reference in float64
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (h0, p, q)]
    s_ref = reference.dagfm_propagate(leaves[0], leaves[1], leaves[2], kind)
    want = torch.autograd.grad(s_ref, [t for t in leaves if t is not None], gs)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    errs = [((s - s_ref.detach()).norm() / s_ref.norm()).item()]
    errs += [((a - b).norm() / b.norm().clamp_min(1e-300)).item() for a, b in zip(grads, want)]
    ok = all(e < tol for e in errs)
    print(f"{'ok  ' if ok else 'FAIL'} {kind:6s} B={B} F={F} D={D} L={L} {str(dtype):13s} "
          f"fallback={int(fallback)} max rel err {max(errs):.1e}", flush=True)
    return ok


def main():
    fast_only = "--fast-only" in sys.argv
    ok = True
    for kind in ("inner", "outer", "kernel"):
        for dtype in (torch.float32, torch.float64):
            for fallback in ((False,) if fast_only else (False, True)):
                for shape in SHAPES:
                    ok &= check(kind, *shape, dtype, fallback)
    print("sanitizer_case:", "all results match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
