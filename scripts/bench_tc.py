"""Low-precision and tensor-core presets of the benchmark, on a GPU (scripts/gpu_check.sh runs it).

Everything it measures goes through the ``dagfm_ext.bench`` package (inputs, the float64 check,
interleaved timing, ceilings, cost model); this script only says which cases to run. One run, side
by side, on the same inputs:

* ceilings measured now: device-to-device copy bandwidth; matrix-product rates in FP32 (exact), TF32,
  bf16 and fp16;
* the kernel interaction's forward at F=39, D=16, L=3 (B = 65,536 and 1,024): fused exact float32,
  fused TF32 (tensor cores), fused float16 / bfloat16 (tensor cores) and the same on CUDA cores,
  against reference eager and torch.compile(reference) in exact float32, and torch.compile(reference)
  with TF32 allowed;
* forward+backward of the kernel interaction in float32 / TF32 / float16 / bfloat16 against eager
  and the first CUDA kernels (v0); of inner and outer in float32 against eager, default path and v0;
* inner and outer forward in float32 / float16 / bfloat16 on the default (register-blocked) path and
  on v0, against eager;
* with --sweep instead: the tuning grid F in {8, 23, 39} x D in {8, 16, 32} for every inner / outer
  kernel variant and the kernel interaction's precisions.

Each fused row is checked against float64 on its own inputs before it is timed (relative error
printed). The roofline floor is max(FLOPs / rate, min bytes / copy bandwidth) with the rate of the
row's precision. A short table is printed last; --json writes every number.

    python scripts/bench_tc.py [--json PATH] [--no-compile] [--quick] [--sweep]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time

import torch

import dagfm_ext
from dagfm_ext import bench, cost
from dagfm_ext.bench.roofline import measure_copy_bandwidth, measure_matmul_rate
from dagfm_ext.bench.timing import median_seconds
from dagfm_ext.testing import make_grad_states, make_inputs, rel_err

F, D, L = 39, 16, 3
DT = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative error against float64 a fused row must stay under to be timed.
LIMIT = {"float32": 1e-5, "tf32": 1e-2, "float16": 1e-2, "bfloat16": 5e-2}
# The environment switches that select a kernel variant in the CUDA backend.
# The extension reads them once per process, so every change is followed by a reread.
VARIANT_ENV = ("DAGFM_CUDA_TENSOR_CORES", "DAGFM_CUDA_REGISTER_BLOCKING", "DAGFM_CUDA_GEMM_BACKWARD",
               "DAGFM_CUDA_RB_TILE", "DAGFM_CUDA_TC_ROWS")
SWEEP_F, SWEEP_D = (8, 23, 39), (8, 16, 32)


@contextlib.contextmanager
def precision(dtype_name: str):
    """TF32 matmuls for the 'tf32' rows only."""
    torch.set_float32_matmul_precision("high" if dtype_name == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("highest")


@contextlib.contextmanager
def variant(name=None, tensor_cores=True):
    """None = the default path, "v0" = the first CUDA-core kernels (forward and backward, no cuBLAS
    backward), "rb8" ... "rb64" = the
    register-blocked forward with that many samples per tile, "tc32" = the tensor-core forward
    with 32 samples per warp."""
    saved = {k: os.environ.get(k) for k in VARIANT_ENV}
    os.environ["DAGFM_CUDA_TENSOR_CORES"] = "1" if tensor_cores else "0"
    if name == "v0":
        os.environ["DAGFM_CUDA_REGISTER_BLOCKING"] = "0"
        os.environ["DAGFM_CUDA_GEMM_BACKWARD"] = "0"
    elif name == "tc32":
        os.environ["DAGFM_CUDA_TC_ROWS"] = "32"
    elif name:
        os.environ["DAGFM_CUDA_RB_TILE"] = name[2:]
    dagfm_ext._C._reread_cuda_switches()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        dagfm_ext._C._reread_cuda_switches()


@functools.lru_cache(maxsize=4)
def case(kind, B, dtype, seed, shape=(F, D), training=False):
    """(h0, p, q, grad_states) on the GPU; the variants of one case reuse them."""
    h0, p, q = make_inputs(kind, B, shape[0], shape[1], L, dtype, "cuda", seed, requires_grad=training)
    return h0, p, q, make_grad_states(B, shape[0], L, dtype, "cuda", seed=seed + 1)


def check_err(h0, p, q, gs, kind, pass_) -> float:
    """Largest relative error of the fused outputs (and gradients) against float64."""
    outs = bench.run_pass(bench.fused_op, h0, p, q, gs, kind, pass_)
    as64 = [t.detach().double().requires_grad_(pass_ != "fwd") if t is not None else None for t in (h0, p, q)]
    want = bench.run_pass(bench.reference_op, *as64, gs.double(), kind, pass_)
    return max(rel_err(a, b) for a, b in zip(outs, want))


def ceilings(quick: bool) -> dict:
    out = {}
    bandwidth, _ = measure_copy_bandwidth("cuda", 1 << 28, quick=True)  # 1 GiB each way
    out["copy_TBps"] = bandwidth / 1e12
    m = 4096 if quick else 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)):
        out[f"{name}_TFLOPs"] = measure_matmul_rate("cuda", dtype, m, quick=True, tf32=tf32) / 1e12
    torch.cuda.empty_cache()
    return out


class Run:
    """The rows of one run, their ceilings, and whether every fused row passed its check."""

    def __init__(self, roof: dict, no_compile: bool):
        self.roof, self.no_compile, self.rows, self.ok = roof, no_compile, [], True

    def add(self, name, kind, B, pass_, dtype_name, t, err=None, tc=None, shape=(F, D)):
        itemsize = torch.tensor([], dtype=DT[dtype_name]).element_size()
        size = (B, shape[0], shape[1], L)
        fl, by = cost.useful_flops(size, kind, pass_), cost.min_bytes(size, kind, pass_, itemsize)
        rate = {"float32": "fp32", "tf32": "tf32", "float16": "fp16", "bfloat16": "bf16"}[dtype_name]
        if tc is False:  # CUDA cores: the FP32 rate bounds the arithmetic whatever the storage
            rate = "fp32"
        floor, _ = bench.roofline_time(fl, by, self.roof[f"{rate}_TFLOPs"] * 1e12, self.roof["copy_TBps"] * 1e12)
        row = {"name": name, "kind": kind, "B": B, "F": shape[0], "D": shape[1], "pass": pass_,
               "dtype": dtype_name, "ms": t * 1e3, "floor_ms": floor * 1e3, "roofline_fraction": floor / t,
               "rel_err_vs_fp64": err, "TFLOPs": fl / t / 1e12, "GBps_min_bytes": by / t / 1e9}
        self.rows.append(row)
        print(f"  {name:34s} {kind:6s} F={shape[0]:<2d} D={shape[1]:<2d} B={B:<6d} {pass_:7s} {t * 1e3:9.4f} ms"
              f"  floor {floor * 1e3:8.4f} ms  ({100 * floor / t:5.1f}%)"
              + (f"  err {err:.1e}" if err is not None else ""), flush=True)
        return row

    def fused(self, kind, B, dtype_name, tc=True, name=None, shape=(F, D), pass_="fwd"):
        """A fused row: checked against float64, then timed; None when wrong."""
        training = pass_ != "fwd"
        h0, p, q, gs = case(kind, B, DT[dtype_name], 1 if training else 0, shape, training)
        with precision(dtype_name), variant(name, tc):
            err = check_err(h0, p, q, gs, kind, pass_)
            if not err < LIMIT[dtype_name]:
                self.ok = False
                print(f"  WRONG: fused {pass_} {kind} {dtype_name} B={B}: rel err {err:.2e} >= "
                      f"{LIMIT[dtype_name]}", flush=True)
                return None
            step = bench.make_step(bench.fused_op, h0, p, q, gs, kind, pass_)
            t = median_seconds(step, "cuda", rounds=5 if training else 7)
        if training:
            label = f"fused {dtype_name} fwd+bwd"
        else:
            label = f"fused {dtype_name}" + ("" if dtype_name == "float32" or kind != "kernel" else
                                             (" tensor cores" if tc else " CUDA cores"))
        label += f" [{name}]" if name else ""
        tensor_cores = False if training else tc and kind == "kernel" and dtype_name != "float32"
        return self.add(label, kind, B, pass_, dtype_name, t, err, tc=tensor_cores, shape=shape)

    def peer(self, kind, B, mode="eager", tf32=False, shape=(F, D), pass_="fwd"):
        """The reference in float32: eager, or torch.compile'd (mode="compile", checked first)."""
        training = pass_ != "fwd"
        h0, p, q, gs = case(kind, B, torch.float32, 1 if training else 0, shape, training)
        dtype_name = "tf32" if tf32 else "float32"
        with precision(dtype_name):
            step, name = bench.make_step(bench.reference_op, h0, p, q, gs, kind, pass_), "reference eager float32"
            if mode == "compile":
                torch._dynamo.reset()
                refs = bench.reference_outputs(h0, p, q, gs, kind, pass_, torch.float32)
                step, info = bench.compile_peer(None, h0, p, q, gs, kind, pass_, refs, torch.float32, "cuda")
                if step is None:  # a peer that does not compile (or is wrong) here is n/a, not a failure
                    print(f"  torch.compile n/a: {info['error']}", flush=True)
                    return None
                name = f"torch.compile(reference) {'TF32' if tf32 else 'float32'}"
            t = median_seconds(step, "cuda", rounds=5)
        if training:
            name += " fwd+bwd"
        return self.add(name, kind, B, pass_, dtype_name, t, tc=bool(tf32), shape=shape)


def ratio(label, slow, fast):
    if slow is not None and fast is not None:
        print(f"  ratio {label}: {slow['ms'] / fast['ms']:.2f}x", flush=True)


def presets(run: Run, big: int) -> None:
    print("== kernel interaction, forward", flush=True)
    for B in (big, 1024):
        base = {"eager": run.peer("kernel", B)}
        if not run.no_compile and B == big:
            base["compiled"] = run.peer("kernel", B, "compile")
            base["compiled_tf32"] = run.peer("kernel", B, "compile", tf32=True)
        exact = run.fused("kernel", B, "float32")  # register-blocked
        ratio(f"v0/register-blocked kernel exact B={B}", run.fused("kernel", B, "float32", name="v0"), exact)
        tf32 = run.fused("kernel", B, "tf32")
        ratio(f"16/32 rows per warp, tensor cores, tf32 B={B}", tf32, run.fused("kernel", B, "tf32", name="tc32"))
        for dn in ("float16", "bfloat16"):
            ratio(f"16/32 rows per warp, tensor cores, {dn} B={B}", run.fused("kernel", B, dn),
                  run.fused("kernel", B, dn, name="tc32"))
            run.fused("kernel", B, dn, tc=False)
        for label, r in (("exact", exact), ("tf32", tf32)):
            for peer_name, pr in base.items():
                ratio(f"{peer_name}/fused {label}", pr, r)
    print("== kernel interaction, forward+backward (backward: cuBLAS products on the kept messages; v0 = "
          "the first kernels)", flush=True)
    eager = run.peer("kernel", big, pass_="fwd+bwd")
    fused = {dn: run.fused("kernel", big, dn, pass_="fwd+bwd") for dn in ("float32", "tf32", "bfloat16", "float16")}
    for dn, r in fused.items():
        ratio(f"eager/fused fwd+bwd kernel {dn}", eager, r)
    ratio("v0/default fwd+bwd kernel float32", run.fused("kernel", big, "float32", name="v0", pass_="fwd+bwd"),
          fused["float32"])
    print("== inner / outer, forward+backward (backward: inner register-blocked, outer cuBLAS products; "
          "v0 = the first kernels)", flush=True)
    for kind in ("inner", "outer"):
        eager = run.peer(kind, big, pass_="fwd+bwd")
        fused = run.fused(kind, big, "float32", pass_="fwd+bwd")
        ratio(f"eager/fused fwd+bwd {kind}", eager, fused)
        ratio(f"v0/default fwd+bwd {kind}", run.fused(kind, big, "float32", name="v0", pass_="fwd+bwd"), fused)
    print("== inner / outer, forward (default path = register-blocked; v0 = the first kernels)", flush=True)
    for kind in ("inner", "outer"):
        for B in (big, 1024):
            eager = run.peer(kind, B)  # the compiled peer is in `python -m dagfm_ext bench`
            for dn in ("float32", "float16", "bfloat16"):
                fused = run.fused(kind, B, dn)
                first = run.fused(kind, B, dn, name="v0")
                if dn == "float32":
                    ratio(f"eager/fused {kind} B={B}", eager, fused)
                    ratio(f"v0/register-blocked {kind} B={B}", first, fused)


def sweep(run: Run, B: int) -> list:
    """Inner and outer forward over the F x D grid for every kernel variant (v0, register-blocked
    with 8 / 16 / 32 / 64 samples per tile, the planner's choice), float32, against eager; the kernel
    interaction exact (same variants) / TF32 / bf16. A variant whose tile does not fit falls back to
    the planner's choice or v0 (the row says so only through its time)."""
    print(f"== sweep, forward, B={B}", flush=True)
    best = []
    for f in SWEEP_F:
        for d in SWEEP_D:
            for kind, names in (("inner", ("v0", "rb8", "rb16", "rb32", "rb64", None)),
                                ("outer", ("v0", "rb8", "rb16", "rb32", "rb64", None)),
                                ("kernel", ("v0", "rb16", "rb32", "rb64", None))):
                eager = run.peer(kind, B, shape=(f, d))
                got = {v: run.fused(kind, B, "float32", name=v, shape=(f, d)) for v in names}
                if kind != "kernel":
                    ratio(f"eager/fused {kind} F={f} D={d}", eager, got[None])
                timed = {v: r["ms"] for v, r in got.items() if r is not None}
                if timed:
                    fastest = min(timed, key=timed.get)
                    best.append((kind, f, d, fastest or "default", timed[fastest], timed.get(None),
                                 eager["ms"] if eager else None))
            for dn in ("tf32", "bfloat16"):
                run.fused("kernel", B, dn, shape=(f, d))
    print("\n================ sweep summary (ms, float32 forward; default = the planner's choice)")
    print(f"{'kind':6s} {'F':>3s} {'D':>3s}  {'fastest':8s} {'ms':>9s}  {'default ms':>10s}  {'eager ms':>9s}")
    for kind, f, d, v, t, t_def, t_eager in best:
        print(f"{kind:6s} {f:3d} {d:3d}  {v:8s} {t:9.4f}  {t_def if t_def is not None else float('nan'):10.4f}"
              f"  {t_eager if t_eager is not None else float('nan'):9.4f}")
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    parser.add_argument("--sweep", action="store_true",
                        help="only the F x D tuning grid (inner/outer variants, kernel precisions)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_tc: needs a CUDA device", file=sys.stderr)
        return 2
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "F": F, "D": D, "L": L}
    print("env:", env, flush=True)
    run = Run(ceilings(args.quick), args.no_compile)
    print("ceilings:", {k: round(v, 1) for k, v in run.roof.items()}, flush=True)
    big = 16384 if args.quick else 65536
    result = {"env": env, "ceilings": run.roof, "rows": run.rows}
    if args.sweep:
        result["sweep_best"] = sweep(run, big)
        print("bench_tc sweep:", "all fused results checked against float64" if run.ok else "SOME FUSED RESULTS WRONG")
    else:
        presets(run, big)
        roof = run.roof
        print("\n================ bench_tc summary (ms; floor = max(FLOPs/rate, min bytes/copy bw))")
        print(f"ceilings: copy {roof['copy_TBps']:.2f} TB/s, fp32 {roof['fp32_TFLOPs']:.0f}, tf32 "
              f"{roof['tf32_TFLOPs']:.0f}, bf16 {roof['bf16_TFLOPs']:.0f}, fp16 {roof['fp16_TFLOPs']:.0f} TFLOP/s")
        for r in run.rows:
            print(f"{r['name']:34s} {r['kind']:6s} B={r['B']:<6d} {r['pass']:7s} {r['ms']:9.4f}  floor "
                  f"{r['floor_ms']:8.4f}  {100 * r['roofline_fraction']:5.1f}%")
        print("bench_tc:", "all fused results checked against float64" if run.ok else "SOME FUSED RESULTS WRONG")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, ok=run.ok), f, indent=1)
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
