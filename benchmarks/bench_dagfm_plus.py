"""DAGFM+ on the CPU: the fused op against the einsum recurrence it replaced, side by side.

    python benchmarks/bench_dagfm_plus.py [--batch 4096 --fields 39 --dim 16 --depth 3 --repeats 15]

Times the whole ``DAGFMPlus`` (field mixing, propagation, MLP) forward and forward+backward in
float32, each interaction with the fused ops (``field_mix``, ``dagfm_propagate_with_sum``) and with
the eager forms (``dagfm_ext.reference``: a batched matmul, one einsum per layer under autograd),
interleaved in one process; prints medians, the speedups and the load average. ``--bf16`` adds the
eager recurrence in bfloat16 (the only 16-bit CPU path there is), the measurement behind the CPU
autocast rule (dagfm_ext/autocast.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dagfm_ext import reference
from dagfm_ext.modules import DAGFMPlus


def eager_forward(model: DAGFMPlus, emb: torch.Tensor) -> torch.Tensor:
    h0 = reference.field_mix(emb, model.connect_layer)
    z = reference.dagfm_propagate_with_sum(h0, model.p, model.q, model.interaction)[1]
    return model.mlp(z.reshape(z.shape[0], -1)).squeeze(-1)


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(kind: str, args) -> dict:
    torch.manual_seed(0)
    model = DAGFMPlus(args.fields, args.dim, args.depth, kind)
    emb = torch.randn(args.batch, args.fields, args.dim)
    paths = {"fused": model, "eager": lambda x: eager_forward(model, x)}

    def forward(run, x=emb):
        with torch.no_grad():
            run(x)

    def train(run):
        model.zero_grad(set_to_none=True)
        run(emb).sum().backward()

    out = {}
    for name, run in paths.items():
        out[f"{name} fwd"] = timed(lambda: forward(run), args.repeats)
        out[f"{name} fwd+bwd"] = timed(lambda: train(run), args.repeats)
    if args.bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["fused autocast-bf16 fwd"] = timed(lambda: forward(model), args.repeats)
        m16 = DAGFMPlus(args.fields, args.dim, args.depth, kind).bfloat16()
        e16 = emb.bfloat16()
        out["eager bf16 fwd"] = timed(lambda: forward(lambda x: eager_forward(m16, x), e16), args.repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--fields", type=int, default=39)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--kinds", default="inner,outer,kernel")
    parser.add_argument("--bf16", action="store_true", help="also time the bfloat16 eager recurrence")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"DAGFMPlus B={args.batch} F={args.fields} D={args.dim} L={args.depth}, float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (before)")
    print(f"{'interaction':12}{'pass':10}{'eager ms':>10}{'fused ms':>10}{'speedup':>9}")
    for kind in args.kinds.split(","):
        r = measure(kind, args)
        for pass_ in ("fwd", "fwd+bwd"):
            e, f = r[f"eager {pass_}"], r[f"fused {pass_}"]
            print(f"{kind:12}{pass_:10}{e * 1e3:10.1f}{f * 1e3:10.1f}{e / f:8.2f}x")
        if args.bf16:
            print(f"{kind:12}{'fwd':10}  eager bf16 {r['eager bf16 fwd'] * 1e3:.1f} ms, fused under "
                  f"autocast(bf16) {r['fused autocast-bf16 fwd'] * 1e3:.1f} ms")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (after)")


if __name__ == "__main__":
    main()
