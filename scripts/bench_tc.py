"""Low-precision and tensor-core benchmark of the fused op on a GPU (issue 4; scripts/gpu_check.sh runs
it). One run, side by side, on the same inputs:

* ceilings measured now: device-to-device copy bandwidth; matrix-product rates in FP32 (exact), TF32,
  bf16 and fp16 (8192^3 through torch.matmul, random data);
* the kernel interaction's forward at F=39, D=16, L=3 (B = 65,536 and 1,024): fused exact float32,
  fused TF32 (tensor cores), fused float16 / bfloat16 (tensor cores) and the same on CUDA cores
  (DAGFM_CUDA_TENSOR_CORES=0), against reference eager and torch.compile(reference) in exact float32,
  and torch.compile(reference) with TF32 allowed;
* forward+backward of the kernel interaction in float32 / TF32 / float16 / bfloat16 against eager (the
  backward: cuBLAS products on the kept messages) and v0; of inner and outer in float32 against
  eager, default path and v0;
* inner and outer forward in float32 / float16 / bfloat16 (B = 65,536 and 1,024), on the default
  (register-blocked) path and on the first CUDA-core kernels (v0), against eager;
* with --sweep instead: the F x D grid of issue 4 (F in {8, 23, 39}, D in {8, 16, 32}) for every
  inner / outer kernel variant and the kernel interaction's precisions.

Each fused row is checked against float64 on its own inputs before it is timed (relative error
printed). Times are medians of interleaved blocks timed with CUDA events. A short table is printed
last; --json writes every number.

    python scripts/bench_tc.py [--json PATH] [--no-compile] [--quick] [--sweep]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import dagfm_ext
from dagfm_ext import reference

F, D, L = 39, 16, 3
DT = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def set_tf32(on: bool) -> None:
    torch.set_float32_matmul_precision("high" if on else "highest")


def time_fn(fn, rounds=7, min_block_s=0.05) -> float:
    """Median seconds per call (CUDA events around blocks of calls; 2 warm-up calls)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end) / 1e3, 1e-6)
    n = max(1, min(2000, int(min_block_s / one)))
    samples = []
    for _ in range(rounds):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / n)
    return statistics.median(samples)


def ceilings(quick: bool) -> dict:
    out = {}
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), rounds=5)
    out["copy_TBps"] = 2 * n / t / 1e12
    del src, dst
    m = 4096 if quick else 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)):
        set_tf32(tf32)
        a = torch.randn(m, m, device="cuda", dtype=dtype)
        b = torch.randn(m, m, device="cuda", dtype=dtype)
        t = time_fn(lambda: a @ b, rounds=5)
        out[f"{name}_TFLOPs"] = 2 * m ** 3 / t / 1e12
        del a, b
    set_tf32(False)
    torch.cuda.empty_cache()
    return out


def flops(kind, B, pass_="fwd", F=F, D=D):
    E = F * (F + 1) // 2
    edge = {"inner": 2 * E * D, "outer": 4 * E * D, "kernel": 2 * E * D * D}[kind]
    fwd = B * L * (edge + 2 * F * D)
    if pass_ == "fwd":
        return fwd
    edge_b = {"inner": 4 * E * D, "outer": 10 * E * D, "kernel": 4 * E * D * D}[kind]
    return 2 * fwd + B * L * edge_b  # the backward recomputes the forward


def min_bytes(kind, B, itemsize, pass_="fwd", F=F, D=D):
    E = F * (F + 1) // 2
    w = L * E * (D * D if kind == "kernel" else (2 * D if kind == "outer" else D))
    fwd = B * F * D + B * (L + 1) * F + w
    if pass_ == "fwd":
        return itemsize * fwd
    return itemsize * (fwd + B * (L + 1) * F + 2 * B * F * D + 2 * w)


def inputs(kind, B, dtype, seed=0, F=F, D=D):
    # Drawn on the GPU: a CPU generator takes seconds per sweep shape at B = 65,536.
    g = torch.Generator(device="cuda").manual_seed(seed)
    h0 = torch.randn(B, F, D, generator=g, device="cuda")
    pshape = (L, F, F, D, D) if kind == "kernel" else (L, F, F, D)
    p = torch.randn(pshape, generator=g, device="cuda") / (F * (D if kind == "kernel" else 1)) ** 0.5
    q = torch.randn(L, F, F, D, generator=g, device="cuda") / D ** 0.5 if kind == "outer" else None
    return [t.to(dtype) if t is not None else None for t in (h0, p, q)]


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def run(args) -> int:
    rows, ok = [], True
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "F": F, "D": D, "L": L}
    print("env:", env, flush=True)
    roof = ceilings(args.quick)
    print("ceilings:", {k: round(v, 1) for k, v in roof.items()}, flush=True)

    def add(name, kind, B, pass_, dtype_name, t, err=None, tc=None, shape=(F, D)):
        itemsize = torch.tensor([], dtype=DT[dtype_name]).element_size()
        fl, by = flops(kind, B, pass_, *shape), min_bytes(kind, B, itemsize, pass_, *shape)
        rate = {"float32": roof["fp32_TFLOPs"], "tf32": roof["tf32_TFLOPs"], "float16": roof["fp16_TFLOPs"],
                "bfloat16": roof["bf16_TFLOPs"]}[dtype_name]
        if tc is False:  # CUDA cores: the FP32 rate bounds the arithmetic whatever the storage
            rate = roof["fp32_TFLOPs"]
        floor = max(fl / (rate * 1e12), by / (roof["copy_TBps"] * 1e12))
        row = {"name": name, "kind": kind, "B": B, "F": shape[0], "D": shape[1], "pass": pass_,
               "dtype": dtype_name, "ms": t * 1e3,
               "floor_ms": floor * 1e3, "roofline_fraction": floor / t, "rel_err_vs_fp64": err,
               "TFLOPs": fl / t / 1e12, "GBps_min_bytes": by / t / 1e9}
        rows.append(row)
        print(f"  {name:34s} {kind:6s} F={shape[0]:<2d} D={shape[1]:<2d} B={B:<6d} {pass_:7s} {t * 1e3:9.4f} ms  floor {floor * 1e3:8.4f} ms"
              f"  ({100 * floor / t:5.1f}%)" + (f"  err {err:.1e}" if err is not None else ""), flush=True)
        return row

    def fused_fwd(kind, B, dtype_name, tc=True, seed=0, variant=None, shape=(F, D)):
        """variant: None = the default path, "v0" = the first CUDA-core kernels, "rb8" ... "rb64" =
        the register-blocked forward with that many samples per tile, "tc32" = the tensor-core
        forward with 32 samples per warp."""
        saved = {k: os.environ.get(k) for k in VARIANT_ENV}
        os.environ["DAGFM_CUDA_TENSOR_CORES"] = "1" if tc else "0"
        if variant == "v0":
            os.environ["DAGFM_CUDA_REGISTER_BLOCKING"] = "0"
        elif variant == "tc32":
            os.environ["DAGFM_CUDA_TC_ROWS"] = "32"
        elif variant:
            os.environ["DAGFM_CUDA_RB_TILE"] = variant[2:]
        set_tf32(dtype_name == "tf32")
        try:
            return _fused_fwd(kind, B, dtype_name, tc, seed, variant, shape)
        finally:
            set_tf32(False)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _fused_fwd(kind, B, dtype_name, tc, seed, variant, shape):
        nonlocal ok
        h0, p, q = inputs(kind, B, DT[dtype_name], seed, *shape)
        s = dagfm_ext.dagfm_propagate(h0, p, q, kind)
        s64 = reference.dagfm_propagate(h0.double(), p.double(), q.double() if q is not None else None, kind)
        err = rel(s, s64)
        limit = {"float32": 1e-5, "tf32": 1e-2, "float16": 1e-2, "bfloat16": 5e-2}[dtype_name]
        if not err < limit:
            ok = False
            print(f"  WRONG: fused {kind} {dtype_name} B={B}: rel err {err:.2e} >= {limit}", flush=True)
            return None
        del s64
        t = time_fn(lambda: dagfm_ext.dagfm_propagate(h0, p, q, kind))
        label = f"fused {dtype_name}" + ("" if dtype_name in ("float32",) or kind != "kernel" else
                                         (" tensor cores" if tc else " CUDA cores"))
        if variant:
            label += f" [{variant}]"
        return add(label, kind, B, "fwd", dtype_name, t, err,
                   tc=(tc and kind == "kernel" and dtype_name != "float32"), shape=shape)

    def fused_train(kind, B, dtype_name, variant=None):
        """variant "v0": DAGFM_CUDA_REGISTER_BLOCKING=0 (the first forward and backward kernels)."""
        saved_env = os.environ.get("DAGFM_CUDA_REGISTER_BLOCKING")
        if variant == "v0":
            os.environ["DAGFM_CUDA_REGISTER_BLOCKING"] = "0"
        try:
            return _fused_train(kind, B, dtype_name, variant)
        finally:
            if saved_env is None:
                os.environ.pop("DAGFM_CUDA_REGISTER_BLOCKING", None)
            else:
                os.environ["DAGFM_CUDA_REGISTER_BLOCKING"] = saved_env

    def _fused_train(kind, B, dtype_name, variant):
        nonlocal ok
        set_tf32(dtype_name == "tf32")
        h0, p, q = inputs(kind, B, DT[dtype_name], 1)
        leaves = [t.requires_grad_() for t in (h0, p, q) if t is not None]
        gs = torch.randn(B, L + 1, F, device="cuda", dtype=DT[dtype_name])

        def step():
            s = dagfm_ext.dagfm_propagate(h0, p, q, kind)
            return torch.autograd.grad(s, leaves, gs)

        g = step()
        h64 = [t.detach().double().requires_grad_() for t in leaves]
        s64 = reference.dagfm_propagate(h64[0], h64[1], h64[2] if q is not None else None, kind)
        g64 = torch.autograd.grad(s64, h64, gs.double())
        err = max(rel(a, b) for a, b in zip(g, g64))
        del s64, g64, h64
        limit = {"float32": 1e-5, "tf32": 1e-2, "float16": 1e-2, "bfloat16": 5e-2}[dtype_name]
        if not err < limit:
            ok = False
            print(f"  WRONG: fused fwd+bwd {kind} {dtype_name}: rel err {err:.2e}", flush=True)
            set_tf32(False)
            return None
        t = time_fn(step, rounds=5)
        set_tf32(False)
        label = f"fused {dtype_name} fwd+bwd" + (f" [{variant}]" if variant else "")
        return add(label, kind, B, "fwd+bwd", dtype_name, t, err, tc=False)

    def eager_train(kind, B):
        h0, p, q = inputs(kind, B, torch.float32, 1)
        leaves = [t.requires_grad_() for t in (h0, p, q) if t is not None]
        gs = torch.randn(B, L + 1, F, device="cuda")
        t = time_fn(lambda: torch.autograd.grad(reference.dagfm_propagate(h0, p, q, kind), leaves, gs), rounds=5)
        return add("reference eager float32 fwd+bwd", kind, B, "fwd+bwd", "float32", t, tc=False)

    def peer(kind, B, mode, tf32=False, shape=(F, D)):
        set_tf32(tf32)
        h0, p, q = inputs(kind, B, torch.float32, 0, *shape)
        fn = (lambda: reference.dagfm_propagate(h0, p, q, kind))
        name = "reference eager float32"
        if mode == "compile":
            torch._dynamo.reset()
            cfn = torch.compile(reference.dagfm_propagate)
            try:
                with torch.no_grad():
                    cfn(h0, p, q, kind)
            except Exception as e:  # a peer that does not compile here is n/a, not a failure
                print(f"  torch.compile n/a: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                set_tf32(False)
                return None
            fn = (lambda: cfn(h0, p, q, kind))
            name = "torch.compile(reference) " + ("TF32" if tf32 else "float32")
        with torch.no_grad():
            t = time_fn(fn, rounds=5)
        set_tf32(False)
        return add(name, kind, B, "fwd", "tf32" if tf32 else "float32", t, tc=True if tf32 else False, shape=shape)

    def ratio(label, slow, fast):
        if slow is not None and fast is not None:
            print(f"  ratio {label}: {slow['ms'] / fast['ms']:.2f}x", flush=True)

    big = 16384 if args.quick else 65536
    if args.sweep:
        return sweep(args, big, rows, roof, env, fused_fwd, peer, ratio, lambda: ok)
    print("== kernel interaction, forward", flush=True)
    for B in (big, 1024):
        base = {}
        base["eager"] = peer("kernel", B, "eager")
        if not args.no_compile and B == big:
            base["compiled"] = peer("kernel", B, "compile")
            base["compiled_tf32"] = peer("kernel", B, "compile", tf32=True)
        exact = fused_fwd("kernel", B, "float32")  # register-blocked (v2)
        first = fused_fwd("kernel", B, "float32", variant="v0")
        ratio(f"v0/register-blocked kernel exact B={B}", first, exact)
        tf32 = fused_fwd("kernel", B, "tf32")
        ratio(f"16/32 rows per warp, tensor cores, tf32 B={B}", tf32, fused_fwd("kernel", B, "tf32", variant="tc32"))
        for dn in ("float16", "bfloat16"):
            tc16 = fused_fwd("kernel", B, dn, tc=True)
            ratio(f"16/32 rows per warp, tensor cores, {dn} B={B}", tc16,
                  fused_fwd("kernel", B, dn, tc=True, variant="tc32"))
            fused_fwd("kernel", B, dn, tc=False)
        for label, r in (("exact", exact), ("tf32", tf32)):
            for peer_name, pr in base.items():
                if r is not None and pr is not None:
                    print(f"  ratio {peer_name}/fused {label}: {pr['ms'] / r['ms']:.2f}x", flush=True)
    print("== kernel interaction, forward+backward (backward: cuBLAS products on the kept messages; v0 = "
          "the first kernels)", flush=True)
    eager = eager_train("kernel", big)
    for dn in ("float32", "tf32", "bfloat16", "float16"):
        r = fused_train("kernel", big, dn)
        ratio(f"eager/fused fwd+bwd kernel {dn}", eager, r)
    ratio("v0/default fwd+bwd kernel float32", fused_train("kernel", big, "float32", variant="v0"),
          next((r for r in rows if r["name"] == "fused float32 fwd+bwd" and r["kind"] == "kernel"), None))
    print("== inner / outer, forward+backward (backward: inner register-blocked, outer cuBLAS products; "
          "v0 = the first kernels)", flush=True)
    for kind in ("inner", "outer"):
        eager = eager_train(kind, big)
        fused = fused_train(kind, big, "float32")
        first = fused_train(kind, big, "float32", variant="v0")
        ratio(f"eager/fused fwd+bwd {kind}", eager, fused)
        ratio(f"v0/default fwd+bwd {kind}", first, fused)
    print("== inner / outer, forward (default path = register-blocked; v0 = the first kernels)", flush=True)
    for kind in ("inner", "outer"):
        for B in (big, 1024):
            eager = peer(kind, B, "eager")  # the compiled peer is in `python -m dagfm_ext bench`
            for dn in ("float32", "float16", "bfloat16"):
                fused = fused_fwd(kind, B, dn)
                first = fused_fwd(kind, B, dn, variant="v0")
                if dn == "float32":
                    ratio(f"eager/fused {kind} B={B}", eager, fused)
                    ratio(f"v0/register-blocked {kind} B={B}", first, fused)

    print("\n================ bench_tc summary (ms; floor = max(FLOPs/rate, min bytes/copy bw))")
    print(f"ceilings: copy {roof['copy_TBps']:.2f} TB/s, fp32 {roof['fp32_TFLOPs']:.0f}, tf32 {roof['tf32_TFLOPs']:.0f}, "
          f"bf16 {roof['bf16_TFLOPs']:.0f}, fp16 {roof['fp16_TFLOPs']:.0f} TFLOP/s")
    for r in rows:
        print(f"{r['name']:34s} {r['kind']:6s} B={r['B']:<6d} {r['pass']:7s} {r['ms']:9.4f}  floor {r['floor_ms']:8.4f}"
              f"  {100 * r['roofline_fraction']:5.1f}%")
    print("bench_tc:", "all fused results checked against float64" if ok else "SOME FUSED RESULTS WRONG")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "ceilings": roof, "rows": rows, "ok": ok}, f, indent=1)
    return 0 if ok else 1


VARIANT_ENV = ("DAGFM_CUDA_TENSOR_CORES", "DAGFM_CUDA_REGISTER_BLOCKING", "DAGFM_CUDA_RB_TILE", "DAGFM_CUDA_TC_ROWS")
SWEEP_F, SWEEP_D = (8, 23, 39), (8, 16, 32)


def sweep(args, B, rows, roof, env, fused_fwd, peer, ratio, ok) -> int:
    """Issue 4's tuning grid: inner and outer forward at F x D in {8, 23, 39} x {8, 16, 32} for
    every kernel variant (v0, register-blocked with 8 / 16 / 32 / 64 samples per tile, the
    planner's choice), float32, against eager; the kernel interaction exact (same variants) / TF32 /
    bf16. A variant whose tile does not fit falls back to the planner's choice or v0 (the row says
    so only through its time)."""
    print(f"== sweep, forward, B={B}", flush=True)
    best = []
    for f in SWEEP_F:
        for d in SWEEP_D:
            for kind in ("inner", "outer"):
                eager = peer(kind, B, "eager", shape=(f, d))
                got = {v: fused_fwd(kind, B, "float32", variant=v, shape=(f, d))
                       for v in ("v0", "rb8", "rb16", "rb32", "rb64", None)}
                ratio(f"eager/fused {kind} F={f} D={d}", eager, got[None])
                timed = {v: r["ms"] for v, r in got.items() if r is not None}
                if timed:
                    fastest = min(timed, key=timed.get)
                    best.append((kind, f, d, fastest or "default", timed[fastest],
                                 timed.get(None), eager["ms"] if eager else None))
            eager = peer("kernel", B, "eager", shape=(f, d))
            got = {v: fused_fwd("kernel", B, "float32", variant=v, shape=(f, d))
                   for v in ("v0", "rb16", "rb32", "rb64", None)}
            timed = {v: r["ms"] for v, r in got.items() if r is not None}
            if timed:
                fastest = min(timed, key=timed.get)
                best.append(("kernel", f, d, fastest or "default", timed[fastest], timed.get(None),
                             eager["ms"] if eager else None))
            for dn in ("tf32", "bfloat16"):
                fused_fwd("kernel", B, dn, shape=(f, d))
    print("\n================ sweep summary (ms, float32 forward; default = the planner's choice)")
    print(f"{'kind':6s} {'F':>3s} {'D':>3s}  {'fastest':8s} {'ms':>9s}  {'default ms':>10s}  {'eager ms':>9s}")
    for kind, f, d, v, t, t_def, t_eager in best:
        print(f"{kind:6s} {f:3d} {d:3d}  {v:8s} {t:9.4f}  {t_def if t_def is not None else float('nan'):10.4f}"
              f"  {t_eager if t_eager is not None else float('nan'):9.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "ceilings": roof, "rows": rows, "ok": ok(), "sweep_best": best}, fh, indent=1)
    print("bench_tc sweep:", "all fused results checked against float64" if ok() else "SOME FUSED RESULTS WRONG")
    return 0 if ok() else 1


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
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
