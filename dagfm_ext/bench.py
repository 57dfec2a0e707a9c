"""Speedup comparison: the fused op against ``reference`` in eager mode and ``torch.compile(reference)``.

Run it as ``dagfm-ext bench`` (or ``python -m dagfm_ext bench`` / ``python -m dagfm_ext.bench``)::

    dagfm-ext bench --quick --device cpu --json out.json --plot out.png   # smoke test, < 3 min on 2 cores
    dagfm-ext bench --device cpu --json cpu.json --plot speedup_cpu.png   # full CPU table
    dagfm-ext bench --core                                                 # issue 2's table: B=4096 F=39 D=16 L=3 fp32 CPU

What is measured (DESIGN.md section 5): every figure is a ratio measured side by side in one run, on the
same inputs. For each device, shape (B, F, D, L), interaction and pass (``fwd``: forward under no_grad;
``fwd+bwd``: forward plus ``torch.autograd.grad`` of the states for h0, p and q, i.e. a training step of the
op), it times

* ``fused``    -- ``dagfm_ext.dagfm_propagate`` (looked up at call time, so a monkeypatched op is what runs),
* ``eager``    -- ``dagfm_ext.reference.dagfm_propagate`` in eager mode,
* ``compiled`` -- ``torch.compile(reference, dynamic=False)``; compile time is excluded (the first call
  compiles before anything is timed; the compile seconds go to the JSON). If compiling fails the cell is
  ``n/a`` and the reason is printed and stored,
* ``graphs``   -- CUDA only, at serving sizes: ``torch.compile(reference, mode="reduce-overhead")`` (CUDA graphs).

Correctness comes first: the fused op's states (and for ``fwd+bwd`` the gradients of h0, p, q) are compared
with the reference evaluated in float64 on the same inputs. The tolerance is relative to the reference's own
error in the benchmark dtype (``max(4 * err_ref, rtol * max|ref64|)``, rtol 1e-5 for float32, 1e-10 for
float64, 1e-2 for half types). A mismatch (or a non-finite value, or an exception) gives a ``FAILED`` row with
no times, and the command exits with status 1. The compiled peers are checked the same way; a wrong compiled
result is reported as ``n/a`` rather than timed.

Timing: each implementation is warmed up, then timed in blocks of n calls (n chosen so a block lasts
``--min-block-ms``); the blocks of the implementations are interleaved round-robin (rotating the order) for
``--rounds`` rounds, so slow drifts of a shared machine hit all of them alike; the figure is the median of the
per-call block times. CPU uses ``time.perf_counter``, CUDA uses events after a synchronize.

Useful work (upper triangle only, E = F(F+1)/2 edges, per sample; an FMA counts 2 FLOPs), from DESIGN.md section 2:

* forward per layer: edge aggregation (inner 2ED, outer 4ED, kernel 2ED^2) + h0*a and the state sum (2FD);
  plus the t=0 state sum (FD);
* backward per layer: inner 4ED (dP, delta), outer 10ED (c, r, dQ, dP, delta), kernel 4ED^2 (dW, delta);
  plus alpha = delta*h0, dh0 += delta*a and the G broadcast (4FD). Recomputed forward work is not counted.

Minimal bytes (the memory side of the roofline): forward = h0 read once + states written once + the
upper-triangle weights read once; forward+backward adds grad_states read, h0 read again, weights read
again, dh0 written and the weight gradients written. The roofline time is
``max(FLOPs / FP32 rate, bytes / copy bandwidth)``, both measured at the start of the same run: the copy
bandwidth as ``2 * bytes / time`` of a large ``Tensor.copy_``, the FP32 rate as a square matrix product
(TF32 off on CUDA) -- a measured lower bound of the FMA peak, so the fraction is an upper bound.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["add_arguments", "main", "parse_shapes", "make_inputs", "check_fused", "useful_flops",
           "min_bytes", "time_interleaved", "default_shapes", "INTERACTIONS", "PASSES"]

INTERACTIONS = ("inner", "outer", "kernel")
PASSES = ("fwd", "fwd+bwd")

Shape = Tuple[int, int, int, int]  # (B, F, D, L)

# Default shapes (B, F, D, L). Criteo-like F=39 D=16 L=3 over a range of batch sizes (the plot's x axis),
# plus Avazu-like F=23 and a small F=8 (DESIGN.md section 5).
_CPU_FULL: List[Shape] = [(256, 39, 16, 3), (1024, 39, 16, 3), (4096, 39, 16, 3), (16384, 39, 16, 3),
                          (4096, 23, 16, 3), (4096, 8, 16, 3)]
_CPU_QUICK: List[Shape] = [(128, 39, 16, 3), (512, 39, 16, 3)]
_CUDA_FULL: List[Shape] = [(1024, 39, 16, 3), (8192, 39, 16, 3), (65536, 39, 16, 3),
                           (65536, 23, 16, 3), (65536, 8, 16, 3)]
_CUDA_QUICK: List[Shape] = [(1024, 39, 16, 3), (8192, 39, 16, 3)]
_CORE: List[Shape] = [(4096, 39, 16, 3)]  # issue 2's acceptance table (float32, CPU)

_PASS_LABEL = {"fwd": "fwd no-grad", "fwd+bwd": "fwd+bwd"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}
_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------------------------------------
# argument handling

def parse_shapes(text: str | Sequence[str]) -> List[Shape]:
    """'B:F:D:L' items separated by commas or spaces (or a list of such strings) -> [(B, F, D, L), ...]."""
    items = text if isinstance(text, (list, tuple)) else [text]
    out: List[Shape] = []
    for chunk in items:
        for tok in str(chunk).replace(",", " ").split():
            parts = tok.split(":")
            if len(parts) != 4:
                raise ValueError(f"--shapes: expected B:F:D:L (e.g. 4096:39:16:3), got {tok!r}")
            try:
                b, f, d, l = (int(x) for x in parts)
            except ValueError:
                raise ValueError(f"--shapes: expected four integers B:F:D:L, got {tok!r}") from None
            if b < 1 or f < 1 or d < 1 or l < 1:
                raise ValueError(f"--shapes: B, F, D, L must be positive, got {tok!r}")
            out.append((b, f, d, l))
    if not out:
        raise ValueError("--shapes: no shape given")
    return out


def default_shapes(device: str, quick: bool) -> List[Shape]:
    if device.startswith("cuda"):
        return list(_CUDA_QUICK if quick else _CUDA_FULL)
    return list(_CPU_QUICK if quick else _CPU_FULL)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the bench options to ``parser`` (the CLI's ``bench`` subparser or a standalone parser)."""
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or a comma list; 'auto' = cpu plus cuda when available "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                        help="dtype of the inputs and weights (default: %(default)s)")
    parser.add_argument("--interactions", default=",".join(INTERACTIONS),
                        help="comma list of interaction types (default: %(default)s)")
    parser.add_argument("--passes", default=",".join(PASSES),
                        help="comma list of passes: fwd (no grad), fwd+bwd (default: %(default)s)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="B:F:D:L",
                        help="shapes to run, e.g. '1024:39:16:3 4096:39:16:3' (default: a per-device set; "
                             "see --quick)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="small shapes and short timing (the CI smoke test; < 3 min on 2 CPU cores)")
    mode.add_argument("--core", action="store_true",
                      help="reproduce issue 2's table: B=4096 F=39 D=16 L=3, float32, CPU, no student rows")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's default)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile peers (cells read n/a)")
    parser.add_argument("--no-graphs", action="store_true",
                        help="skip the CUDA-graph peer (torch.compile mode='reduce-overhead')")
    parser.add_argument("--graphs-max-batch", type=int, default=8192,
                        help="largest batch ('serving size') for the CUDA-graph peer (default: %(default)s)")
    parser.add_argument("--no-student", action="store_true", help="skip the student vs teacher rows")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds per implementation (default: 7, --quick: 3)")
    parser.add_argument("--min-block-ms", type=float, default=None,
                        help="target duration of one timed block of calls (default: 100, --quick: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                        help="write every figure and the environment to PATH")
    parser.add_argument("--plot", dest="plot_path", default=None, metavar="PATH",
                        help="write a PNG of speedup vs batch size per interaction type to PATH")
    return parser


# ----------------------------------------------------------------------------------------------------------
# the operations under test

def _fused(h0, p, q, interaction):
    # Looked up at call time: a monkeypatched dagfm_ext.dagfm_propagate is what gets checked and timed.
    import dagfm_ext
    return dagfm_ext.dagfm_propagate(h0, p, q, interaction)


def _reference(h0, p, q, interaction):
    from dagfm_ext import reference
    return reference.dagfm_propagate(h0, p, q, interaction)


def make_inputs(shape: Shape, interaction: str, device, dtype, seed: int = 0, requires_grad: bool = False):
    """Random (h0, p, q, grad_states) for one case, scaled so the states stay O(1) over the layers.

    Generated in float64 on the CPU from ``seed`` and then cast and moved, so every device and dtype sees
    the same values.
    """
    B, F, D, L = shape
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(B, F, D, generator=g, dtype=torch.float64)
    if interaction == "kernel":
        p = torch.randn(L, F, F, D, D, generator=g, dtype=torch.float64) / math.sqrt(F * D)
        q = None
    elif interaction == "outer":
        p = torch.randn(L, F, F, D, generator=g, dtype=torch.float64) / math.sqrt(D)
        q = torch.randn(L, F, F, D, generator=g, dtype=torch.float64) / math.sqrt(F)
    elif interaction == "inner":
        p = torch.randn(L, F, F, D, generator=g, dtype=torch.float64) / math.sqrt(F)
        q = None
    else:
        raise ValueError(f"interaction: expected one of {INTERACTIONS}, got {interaction!r}")
    gs = torch.randn(B, L + 1, F, generator=g, dtype=torch.float64)

    def conv(t):
        if t is None:
            return None
        t = t.to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return conv(h0), conv(p), conv(q), gs.to(device=device, dtype=dtype)


def _grad_inputs(h0, p, q):
    return [t for t in (h0, p, q) if t is not None]


def _run_pass(op, h0, p, q, gs, interaction, pass_):
    """One evaluation of ``op``: the states for 'fwd' (under no_grad), states and input gradients otherwise."""
    if pass_ == "fwd":
        with torch.no_grad():
            return (op(h0, p, q, interaction),)
    s = op(h0, p, q, interaction)
    return (s.detach(),) + tuple(torch.autograd.grad(s, _grad_inputs(h0, p, q), gs))


def _output_names(q, pass_):
    names = ["states"]
    if pass_ != "fwd":
        names += ["grad_h0", "grad_p"] + (["grad_q"] if q is not None else [])
    return names


def _compare(outputs, ref64, ref_lo, names, dtype) -> dict:
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
        tol = max(4.0 * ref_err, _RTOL.get(dtype, 1e-5) * scale, 1e-300)
        finite = bool(torch.isfinite(o).all())
        good = finite and err <= tol
        checks.append({"output": name, "max_abs_err": err, "reference_own_err": ref_err, "tol": tol,
                       "max_abs_ref": scale, "finite": finite, "ok": good})
        if not good and ok:
            ok = False
            worst = (f"{name}: non-finite values" if not finite else
                     f"{name}: max abs err {err:.3g} > tol {tol:.3g} (|ref| max {scale:.3g})")
    return {"ok": ok, "detail": worst or "ok", "checks": checks}


def _reference_outputs(h0, p, q, gs, interaction, pass_, dtype):
    """(float64 reference, reference in the benchmark dtype) outputs on the same inputs."""
    def as64(t):
        return None if t is None else t.detach().to(torch.float64).requires_grad_(pass_ != "fwd")

    ref64 = _run_pass(_reference, as64(h0), as64(p), as64(q), gs.to(torch.float64), interaction, pass_)
    ref_lo = ref64 if dtype == torch.float64 else _run_pass(_reference, h0, p, q, gs, interaction, pass_)
    return ref64, ref_lo


def check_fused(op: Callable, shape: Shape, interaction: str, pass_: str, device="cpu",
                dtype=torch.float32, seed: int = 0, refs=None, inputs=None) -> dict:
    """Check ``op(h0, p, q, interaction)`` against the float64 reference: {'ok', 'detail', 'checks'}.

    Any exception raised by ``op`` is a failure (reported, not raised).
    """
    if inputs is None:
        inputs = make_inputs(shape, interaction, device, dtype, seed, requires_grad=pass_ != "fwd")
    h0, p, q, gs = inputs
    if refs is None:
        refs = _reference_outputs(h0, p, q, gs, interaction, pass_, dtype)
    ref64, ref_lo = refs
    try:
        outs = _run_pass(op, h0, p, q, gs, interaction, pass_)
        if device != "cpu" and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a crash of the op under test is a failed check, not a crashed benchmark
        return {"ok": False, "detail": f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "checks": []}
    return _compare(outs, ref64, ref_lo, _output_names(q, pass_), dtype)


# ----------------------------------------------------------------------------------------------------------
# work and traffic model

def useful_flops(shape: Shape, interaction: str, pass_: str) -> int:
    """FLOPs of the useful (upper-triangle) maths of DESIGN.md section 2; an FMA is 2 FLOPs."""
    B, F, D, L = shape
    E = F * (F + 1) // 2
    edge_fwd = {"inner": 2 * E * D, "outer": 4 * E * D, "kernel": 2 * E * D * D}[interaction]
    fwd = F * D + L * (edge_fwd + 2 * F * D)
    if pass_ == "fwd":
        return B * fwd
    edge_bwd = {"inner": 4 * E * D, "outer": 10 * E * D, "kernel": 4 * E * D * D}[interaction]
    return B * (fwd + L * (edge_bwd + 4 * F * D))


def _weight_elems(shape: Shape, interaction: str) -> int:
    _, F, D, L = shape
    E = F * (F + 1) // 2
    return {"inner": L * E * D, "outer": 2 * L * E * D, "kernel": L * E * D * D}[interaction]


def min_bytes(shape: Shape, interaction: str, pass_: str, itemsize: int) -> int:
    """Minimal memory traffic: h0 read once + states written once + weights (upper triangle) read once;
    the backward adds grad_states read, h0 and weights read again, dh0 and weight gradients written."""
    B, F, D, L = shape
    w = _weight_elems(shape, interaction)
    fwd = B * F * D + B * (L + 1) * F + w
    if pass_ == "fwd":
        return itemsize * fwd
    return itemsize * (fwd + B * (L + 1) * F + B * F * D + w + B * F * D + w)


# ----------------------------------------------------------------------------------------------------------
# timing

def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(fn: Callable, n: int, device) -> float:
    """Seconds per call of ``fn`` over a block of ``n`` calls."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def time_interleaved(fns: Dict[str, Callable], device="cpu", rounds: int = 7, min_block_s: float = 0.1,
                     warmup: int = 2) -> Dict[str, dict]:
    """Median seconds per call of each fn, timed in interleaved blocks: {name: {'median_s', 'samples_s', 'n'}}."""
    names = list(fns)
    per_call: Dict[str, float] = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        _sync(device)
        per_call[name] = _time_block(fns[name], 1, device)
    n = {name: max(1, min(1000, int(math.ceil(min_block_s / max(per_call[name], 1e-7))))) for name in names}
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(_time_block(fns[name], n[name], device))
    return {name: {"median_s": statistics.median(samples[name]), "samples_s": samples[name], "n": n[name]}
            for name in names}


def measure_roofline(device, dtype, quick: bool) -> dict:
    """Copy bandwidth (bytes/s) and matrix-product FLOP rate measured now on ``device``."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    rate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out: dict = {"device": str(dev)}
    numel = (1 << 28 if not quick else 1 << 26) if cuda else (1 << 25 if not quick else 1 << 23)
    src = torch.ones(numel, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    res = time_interleaved({"copy": lambda: dst.copy_(src)}, device, rounds=5 if quick else 9,
                           min_block_s=0.02 if quick else 0.05)
    out["copy_bytes"] = 2 * src.numel() * src.element_size()
    out["copy_GBps"] = out["copy_bytes"] / res["copy"]["median_s"] / 1e9
    del src, dst
    n = (8192 if not quick else 4096) if cuda else (2048 if not quick else 1024)
    a = torch.randn(n, n, dtype=rate_dtype, device=dev)
    b = torch.randn(n, n, dtype=rate_dtype, device=dev)
    ctx = contextlib.ExitStack()
    if cuda:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        ctx.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", prev)
    with ctx:
        res = time_interleaved({"mm": lambda: torch.mm(a, b)}, device, rounds=5 if quick else 9,
                               min_block_s=0.05 if quick else 0.2)
    out["matmul_n"] = n
    out["matmul_dtype"] = str(rate_dtype).replace("torch.", "")
    out["fp_GFLOPs"] = 2 * n ** 3 / res["mm"]["median_s"] / 1e9
    out["note"] = ("copy bandwidth = 2*bytes/time of Tensor.copy_; FP rate = square matmul"
                   + (" with TF32 off" if cuda else "") + " (a measured lower bound of the FMA peak)")
    return out


# ----------------------------------------------------------------------------------------------------------
# one case

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def _make_step(op, h0, p, q, gs, interaction, pass_, mark_step=False):
    inputs = _grad_inputs(h0, p, q)
    mark = torch.compiler.cudagraph_mark_step_begin if mark_step else None
    if pass_ == "fwd":
        def step():
            if mark:
                mark()
            with torch.no_grad():
                return op(h0, p, q, interaction)
    else:
        def step():
            if mark:
                mark()
            s = op(h0, p, q, interaction)
            return torch.autograd.grad(s, inputs, gs)
    return step


def _compile_peer(mode: Optional[str], h0, p, q, gs, interaction, pass_, refs, dtype, device):
    """Compile the reference (excluded from timing), check it; returns (step or None, info dict)."""
    from dagfm_ext import reference
    info: dict = {"mode": mode or "default"}
    try:
        kwargs = {"dynamic": False}
        if mode:
            kwargs["mode"] = mode
        compiled = torch.compile(reference.dagfm_propagate, **kwargs)
        op = (lambda a, b, c, d: compiled(a, b, c, d))
        t0 = time.perf_counter()
        if mode == "reduce-overhead":
            # cudagraph trees: several warm-up calls (record + replay) before the outputs are checked.
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                _run_pass(op, h0, p, q, gs, interaction, pass_)
            torch.compiler.cudagraph_mark_step_begin()
        outs = _run_pass(op, h0, p, q, gs, interaction, pass_)
        outs = tuple(o.clone() for o in outs)
        _sync(device)
        info["compile_s"] = time.perf_counter() - t0
    except Exception as exc:  # compile failures are reported as n/a with the reason, never a crash
        info["error"] = _first_line(exc)
        return None, info
    check = _compare(outs, refs[0], refs[1], _output_names(q, pass_), dtype)
    if not check["ok"]:
        info["error"] = f"wrong result, not timed ({check['detail']})"
        return None, info
    return _make_step(op, h0, p, q, gs, interaction, pass_, mark_step=mode == "reduce-overhead"), info


def run_case(shape: Shape, interaction: str, pass_: str, device: str, dtype, opts, roof: Optional[dict]) -> dict:
    """Check the fused op, then time fused / eager / compiled (/ graphs) side by side; one result row."""
    B, F, D, L = shape
    row: dict = {"device": device, "dtype": str(dtype).replace("torch.", ""), "shape": f"{B}:{F}:{D}:{L}",
                 "batch": B, "num_fields": F, "embed_dim": D, "depth": L, "interaction": interaction,
                 "pass": pass_}
    torch._dynamo.reset()
    inputs = make_inputs(shape, interaction, device, dtype, opts.seed, requires_grad=pass_ != "fwd")
    h0, p, q, gs = inputs
    refs = _reference_outputs(h0, p, q, gs, interaction, pass_, dtype)
    check = check_fused(_fused, shape, interaction, pass_, device, dtype, refs=refs, inputs=inputs)
    row["correctness"] = check
    if not check["ok"]:
        row["status"] = "FAILED"
        row["error"] = check["detail"]
        return row

    fns = {"fused": _make_step(_fused, h0, p, q, gs, interaction, pass_),
           "eager": _make_step(_reference, h0, p, q, gs, interaction, pass_)}
    peers: Dict[str, dict] = {}
    if opts.no_compile:
        peers["compiled"] = {"error": "skipped (--no-compile)"}
    else:
        step, peers["compiled"] = _compile_peer(None, h0, p, q, gs, interaction, pass_, refs, dtype, device)
        if step is not None:
            fns["compiled"] = step
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda and not opts.no_graphs and B <= opts.graphs_max_batch:
        if opts.no_compile:
            peers["graphs"] = {"error": "skipped (--no-compile)"}
        else:
            step, peers["graphs"] = _compile_peer("reduce-overhead", h0, p, q, gs, interaction, pass_, refs,
                                                  dtype, device)
            if step is not None:
                fns["graphs"] = step
    try:
        timings = time_interleaved(fns, device, rounds=opts.rounds, min_block_s=opts.min_block_s,
                                   warmup=getattr(opts, "warmup", 2))
    except Exception as exc:
        row["status"] = "error"
        row["error"] = f"timing failed: {_first_line(exc)}"
        return row

    row["status"] = "ok"
    row["peers"] = peers
    row["timings"] = {k: {"median_ms": v["median_s"] * 1e3, "samples_ms": [s * 1e3 for s in v["samples_s"]],
                          "calls_per_block": v["n"]} for k, v in timings.items()}
    fused_s = timings["fused"]["median_s"]
    for impl in ("fused", "eager", "compiled", "graphs"):
        row[f"{impl}_ms"] = timings[impl]["median_s"] * 1e3 if impl in timings else None
        if impl != "fused":
            row[f"speedup_vs_{impl}"] = (timings[impl]["median_s"] / fused_s) if impl in timings else None
            if impl in peers and "error" in peers[impl]:
                row[f"{impl}_error"] = peers[impl]["error"]
    flops = useful_flops(shape, interaction, pass_)
    nbytes = min_bytes(shape, interaction, pass_, torch.empty((), dtype=dtype).element_size())
    row["flops"] = flops
    row["min_bytes"] = nbytes
    row["fused_GFLOPs"] = flops / fused_s / 1e9
    row["eager_GFLOPs"] = flops / timings["eager"]["median_s"] / 1e9
    if roof:
        t_roof = max(flops / (roof["fp_GFLOPs"] * 1e9), nbytes / (roof["copy_GBps"] * 1e9))
        row["roofline_ms"] = t_roof * 1e3
        row["roofline_fraction"] = t_roof / fused_s
        row["roofline_bound"] = ("compute" if flops / (roof["fp_GFLOPs"] * 1e9) >= nbytes / (roof["copy_GBps"] * 1e9)
                                 else "memory")
    return row


# ----------------------------------------------------------------------------------------------------------
# student vs teacher

def run_student_teacher(device: str, dtype, batches: Sequence[int], F: int, D: int, L: int,
                        interactions: Sequence[str], opts) -> Tuple[List[dict], Optional[str]]:
    """DAGFM (fused op) forward vs the CrossNet teacher's forward (and the same DAGFM with the eager
    reference propagation). Returns (rows, skip message)."""
    try:
        from dagfm_ext.modules import DAGFM
        from dagfm_ext.teachers import CrossNet
    except Exception as exc:
        return [], f"student vs teacher rows skipped: dagfm_ext.modules.DAGFM / dagfm_ext.teachers.CrossNet " \
                   f"not available ({_first_line(exc)})"
    from dagfm_ext import reference
    rows = []
    for interaction in interactions:
        for B in batches:
            row = {"device": device, "dtype": str(dtype).replace("torch.", ""), "batch": B, "num_fields": F,
                   "embed_dim": D, "depth": L, "interaction": interaction, "teacher": f"CrossNet(depth={L})"}
            try:
                torch.manual_seed(opts.seed)
                student = DAGFM(F, D, L, interaction).to(device=device, dtype=dtype).eval()
                teacher = CrossNet(F, D, L).to(device=device, dtype=dtype).eval()
                g = torch.Generator().manual_seed(opts.seed)
                emb = torch.randn(B, F, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

                def student_eager(m=student, x=emb):
                    s = reference.dagfm_propagate(m.mixed(x), m.p, m.q, m.interaction)
                    return m.linear(s.reshape(s.shape[0], -1)).squeeze(-1)

                with torch.no_grad():
                    got, want = student(emb), student_eager()
                    m64 = DAGFM(F, D, L, interaction).to(device=device, dtype=torch.float64).eval()
                    m64.load_state_dict({k: v.to(torch.float64) for k, v in student.state_dict().items()})
                    s64 = reference.dagfm_propagate(m64.mixed(emb.double()), m64.p, m64.q, interaction)
                    want64 = m64.linear(s64.reshape(B, -1)).squeeze(-1)
                check = _compare((got,), (want64,), (want,), ["logits"], dtype)
                row["correctness"] = check
                if not check["ok"]:
                    row["status"], row["error"] = "FAILED", check["detail"]
                    rows.append(row)
                    continue

                def nograd(fn):
                    def run():
                        with torch.no_grad():
                            return fn()
                    return run

                t = time_interleaved({"student_fused": nograd(lambda: student(emb)),
                                      "student_eager": nograd(student_eager),
                                      "teacher": nograd(lambda: teacher(emb))},
                                     device, rounds=opts.rounds, min_block_s=opts.min_block_s,
                                     warmup=getattr(opts, "warmup", 2))
                for k, v in t.items():
                    row[f"{k}_ms"] = v["median_s"] * 1e3
                row["teacher_over_student_fused"] = t["teacher"]["median_s"] / t["student_fused"]["median_s"]
                row["teacher_over_student_eager"] = t["teacher"]["median_s"] / t["student_eager"]["median_s"]
                row["status"] = "ok"
            except Exception as exc:
                row["status"], row["error"] = "error", _first_line(exc)
            rows.append(row)
    return rows, None


# ----------------------------------------------------------------------------------------------------------
# reporting

def _fmt_ms(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if v < 1 else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def _fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _shape_str(r) -> str:
    return f"{r['batch']}x{r['num_fields']}x{r['embed_dim']}x{r['depth']}"


def format_table(rows: List[dict], device: str, roof: Optional[dict]) -> str:
    cuda = device.startswith("cuda")
    head = ["shape BxFxDxL", "interaction", "pass", "fused ms", "eager ms", "compiled ms"]
    if cuda:
        head += ["graphs ms"]
    head += ["vs eager", "vs compiled"]
    if cuda:
        head += ["vs graphs"]
    head += ["fused GFLOP/s", "roofline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes: List[str] = []
    for r in rows:
        cells = [_shape_str(r), r["interaction"], _PASS_LABEL.get(r["pass"], r["pass"])]
        if r["status"] != "ok":
            label = "FAILED" if r["status"] == "FAILED" else "ERROR"
            cells += [f"**{label}**: {r.get('error', '')}"] + [""] * (len(head) - 4)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        impls = ["fused", "eager", "compiled"] + (["graphs"] if cuda else [])
        for impl in impls:
            v = r.get(f"{impl}_ms")
            cell = _fmt_ms(v)
            err = r.get(f"{impl}_error")
            if v is None and err:
                if err not in notes:
                    notes.append(err)
                cell = f"n/a [{notes.index(err) + 1}]"
            cells.append(cell)
        cells += [_fmt_x(r.get("speedup_vs_eager")), _fmt_x(r.get("speedup_vs_compiled"))]
        if cuda:
            cells.append(_fmt_x(r.get("speedup_vs_graphs")))
        cells.append(f"{r['fused_GFLOPs']:.1f}")
        frac = r.get("roofline_fraction")
        cells.append("n/a" if frac is None else f"{100 * frac:.1f}% ({r['roofline_bound'][:3]})")
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    if roof:
        out += (f"\n\nRoofline on {roof['device']}: copy {roof['copy_GBps']:.1f} GB/s, "
                f"{roof['matmul_dtype']} matmul {roof['fp_GFLOPs']:.1f} GFLOP/s (both measured in this run); "
                "'roofline' = max(FLOPs/rate, min bytes/bandwidth) / fused time (com = compute-, mem = memory-bound).")
    for i, n in enumerate(notes):
        out += f"\n[{i + 1}] {n}"
    return out


def format_student_table(rows: List[dict]) -> str:
    head = ["batch", "FxDxL", "interaction", "DAGFM fused ms", "DAGFM eager ms", "CrossNet ms",
            "teacher/student fused", "teacher/student eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [str(r["batch"]), f"{r['num_fields']}x{r['embed_dim']}x{r['depth']}", r["interaction"]]
        if r["status"] != "ok":
            label = "FAILED" if r["status"] == "FAILED" else "ERROR"
            cells += [f"**{label}**: {r.get('error', '')}"] + [""] * 4
        else:
            cells += [_fmt_ms(r["student_fused_ms"]), _fmt_ms(r["student_eager_ms"]), _fmt_ms(r["teacher_ms"]),
                      _fmt_x(r["teacher_over_student_fused"]), _fmt_x(r["teacher_over_student_eager"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nForward, no grad, whole model (field mixing + propagation + readout); "
                               "teacher/student > 1 means the student is faster.")


def write_plot(results: List[dict], path: str) -> Optional[str]:
    """Speedup vs batch size per interaction type (one panel per device and pass). Returns an error or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except Exception as exc:
        return f"plot skipped: matplotlib not available ({_first_line(exc)})"
    ok = [r for r in results if r.get("status") == "ok"]
    devices = sorted({r["device"] for r in ok}) or ["cpu"]
    passes = [p for p in PASSES if any(r["pass"] == p for r in ok)] or list(PASSES)
    fig, axes = plt.subplots(len(devices), len(passes), figsize=(6.0 * len(passes), 4.2 * len(devices)),
                             squeeze=False)
    colors = {"inner": "tab:blue", "outer": "tab:orange", "kernel": "tab:green"}
    for i, dev in enumerate(devices):
        rows = [r for r in ok if r["device"] == dev]
        # the (F, D, L) family with the most batch sizes is the x axis
        fams: Dict[tuple, set] = {}
        for r in rows:
            fams.setdefault((r["num_fields"], r["embed_dim"], r["depth"]), set()).add(r["batch"])
        fam = max(fams, key=lambda k: (len(fams[k]), k)) if fams else None
        for j, pass_ in enumerate(passes):
            ax = axes[i][j]
            all_x: set = set()
            for inter in INTERACTIONS:
                sel = sorted((r for r in rows if fam and (r["num_fields"], r["embed_dim"], r["depth"]) == fam
                              and r["pass"] == pass_ and r["interaction"] == inter), key=lambda r: r["batch"])
                if not sel:
                    continue
                xs = [r["batch"] for r in sel]
                all_x.update(xs)
                for key, style, lab in (("speedup_vs_eager", "-o", "vs eager"),
                                        ("speedup_vs_compiled", "--s", "vs torch.compile"),
                                        ("speedup_vs_graphs", ":^", "vs CUDA graphs")):
                    pts = [(x, r.get(key)) for x, r in zip(xs, sel) if r.get(key)]
                    if pts:
                        ax.plot([a for a, _ in pts], [b for _, b in pts], style, color=colors[inter],
                                label=f"{inter} {lab}")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            if all_x:
                ax.set_xticks(sorted(all_x))
                ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.set_xlabel("batch size")
            ax.set_ylabel("speedup of the fused op (x)")
            fam_s = f"F={fam[0]} D={fam[1]} L={fam[2]}" if fam else ""
            ax.set_title(f"{dev} {pass_} {fam_s}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def environment(devices: Sequence[str]) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "argv": [os.path.basename(sys.argv[0])] + list(sys.argv[1:]),  # no local paths in results
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_start": _loadavg(),
        "devices": {},
    }
    try:
        import dagfm_ext
        env["dagfm_ext_version"] = getattr(dagfm_ext, "__version__", None)
        env["build_info"] = {k: str(v) for k, v in dagfm_ext.build_info().items()}
    except Exception as exc:
        env["build_info"] = f"unavailable ({_first_line(exc)})"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        res = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        commit = res.stdout.strip()
        env["git_commit"] = commit if res.returncode == 0 and len(commit) == 40 else None
    except Exception:
        env["git_commit"] = None
    for d in devices:
        if d.startswith("cuda"):
            env["devices"][d] = {"name": torch.cuda.get_device_name(torch.device(d)),
                                 "cuda": torch.version.cuda}
        else:
            env["devices"][d] = {"name": env["cpu_model"], "threads": torch.get_num_threads()}
    return env


# ----------------------------------------------------------------------------------------------------------
# entry point

def _resolve_devices(spec: str) -> List[str]:
    if spec == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devs = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devs:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise ValueError(f"--device: unknown device {d!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device: {d!r} requested but CUDA is not available")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected cpu or cuda, got {d!r}")
    return devs


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Run the comparison described by ``args`` (from ``add_arguments``). 0: all checks passed; 1: a
    correctness failure or error; 2: bad arguments."""
    try:
        devices = _resolve_devices(args.device)
        interactions = [s.strip() for s in args.interactions.split(",") if s.strip()]
        bad = [s for s in interactions if s not in INTERACTIONS]
        if bad or not interactions:
            raise ValueError(f"--interactions: expected a comma list of {INTERACTIONS}, got {args.interactions!r}")
        passes = [s.strip() for s in args.passes.split(",") if s.strip()]
        bad = [s for s in passes if s not in PASSES]
        if bad or not passes:
            raise ValueError(f"--passes: expected a comma list of {PASSES}, got {args.passes!r}")
        dtype = _DTYPES[args.dtype]
        shapes_arg = parse_shapes(args.shapes) if args.shapes else None
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads: expected a positive int, got {args.threads}")
    except ValueError as exc:
        print(f"dagfm-ext bench: error: {exc}", file=sys.stderr)
        return 2
    if args.core:
        devices, dtype, interactions = ["cpu"], torch.float32, list(INTERACTIONS)
        shapes_arg = shapes_arg or list(_CORE)
        args.no_student = True
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.warmup = 1 if args.quick else 2
    args.min_block_s = (args.min_block_ms or (20.0 if args.quick else 100.0)) / 1e3

    prev_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, devices, interactions, passes, dtype, shapes_arg)
    finally:
        torch.set_num_threads(prev_threads)


def _run(args, devices, interactions, passes, dtype, shapes_arg) -> int:
    t_start = time.perf_counter()
    env = environment(devices)
    report: dict = {"environment": env, "dtype": str(dtype).replace("torch.", ""),
                    "options": {"quick": bool(args.quick), "core": bool(args.core), "rounds": args.rounds,
                                "min_block_ms": args.min_block_s * 1e3, "seed": args.seed,
                                "interactions": interactions, "passes": passes},
                    "roofline": {}, "results": [], "student_teacher": [], "messages": []}
    failed = False
    tables: List[str] = []
    for device in devices:
        shapes = shapes_arg or default_shapes(device, args.quick)
        _log(f"[bench] {device}: measuring copy bandwidth and matmul rate ...")
        try:
            roof = measure_roofline(device, dtype, args.quick)
        except Exception as exc:
            roof = None
            report["messages"].append(f"{device}: roofline measurement failed: {_first_line(exc)}")
        report["roofline"][device] = roof
        rows = []
        for shape in shapes:
            for interaction in interactions:
                for pass_ in passes:
                    t0 = time.perf_counter()
                    try:
                        row = run_case(shape, interaction, pass_, device, dtype, args, roof)
                    except Exception as exc:  # never let one case kill the table
                        B, F, D, L = shape
                        row = {"device": device, "dtype": str(dtype).replace("torch.", ""),
                               "shape": f"{B}:{F}:{D}:{L}", "batch": B, "num_fields": F, "embed_dim": D,
                               "depth": L, "interaction": interaction, "pass": pass_, "status": "error",
                               "error": _first_line(exc)}
                    row["case_wall_s"] = time.perf_counter() - t0
                    if row["status"] != "ok":
                        failed = True
                    rows.append(row)
                    _log(f"[bench] {device} {row['shape']} {interaction:6s} {pass_:7s} "
                         + (f"fused {_fmt_ms(row['fused_ms'])} ms  eager {_fmt_ms(row['eager_ms'])} ms  "
                            f"compiled {_fmt_ms(row['compiled_ms'])} ms" if row["status"] == "ok"
                            else f"{row['status']}: {row.get('error')}")
                         + f"  ({row['case_wall_s']:.1f}s)")
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
        report["results"].extend(rows)
        title = (f"### {device} ({env['devices'][device]['name']}), {report['dtype']}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads")
        tables.append(title + "\n\n" + format_table(rows, device, roof))

        if not args.no_student:
            fam = [s for s in shapes if s[1:] == (39, 16, 3)] or shapes
            F, D, L = fam[0][1:]
            batches = sorted({s[0] for s in fam if s[1:] == (F, D, L)})
            if args.quick:
                batches = batches[-1:]
            _log(f"[bench] {device}: student vs teacher ...")
            st_rows, msg = run_student_teacher(device, dtype, batches, F, D, L, interactions, args)
            if msg:
                report["messages"].append(f"{device}: {msg}")
                tables.append(f"Student vs teacher ({device}): {msg}")
            else:
                report["student_teacher"].extend(st_rows)
                if any(r["status"] != "ok" for r in st_rows):
                    failed = True
                tables.append(f"#### Student vs teacher on {device}: DAGFM (fused op) vs CrossNet, forward\n\n"
                              + format_student_table(st_rows))

    env["loadavg_end"] = _loadavg()
    env["wall_s"] = time.perf_counter() - t_start
    report["ok"] = not failed
    print("\n\n".join(tables))
    for m in report["messages"]:
        print(f"\nnote: {m}")
    print(f"\n{env['date']} | {env['cpu_model']} ({env['cpu_count']} cores) | loadavg start "
          f"{_fmt_load(env['loadavg_start'])} end {_fmt_load(env['loadavg_end'])} | {env['wall_s']:.0f} s | "
          f"command: {env['command']}")
    if failed:
        print("\nbench: CORRECTNESS FAILURE or error in at least one row (see FAILED/ERROR above); no time is "
              "reported for those rows.")
    if args.plot_path:
        err = write_plot(report["results"], args.plot_path)
        if err:
            report["messages"].append(err)
            print(f"note: {err}")
    if args.json_path:
        d = os.path.dirname(os.path.abspath(args.json_path))
        os.makedirs(d, exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if failed else 0


def _fmt_load(v) -> str:
    return "n/a" if not v else "/".join(f"{x:.2f}" for x in v)


def _standalone(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dagfm_ext.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone())
