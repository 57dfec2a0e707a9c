"""What a request costs on the CPU: latency of the fused op and of whole models at serving batch sizes.

Three tables, each measured side by side in one run (variants interleaved, so that a noisy machine
disturbs them alike):

* the raw op forward (no grad) per interaction and batch size, on 1 thread and on the default
  number of threads;
* the whole DAGFM student forward (field mixing + propagation + readout), embedding lookup
  excluded and included, with the fused op vs the eager reference propagation vs the CrossNet
  teacher;
* large-batch throughput: the fused forward and forward+backward in useful (upper-triangle)
  FLOP/s as a fraction of the float32 matrix-product rate, the product timed in the same rounds
  and blocks of back-to-back calls as the ops.

Latencies are per call (median and 99th percentile over every timed call). Run it as
``dagfm-ext bench --latency`` (``--help`` for the options).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import functional, reference
from ..cost import useful_flops
from ..data import FeatureSchema, FieldEmbedding, FieldSpec
from ..modules import DAGFM
from ..teachers import CrossNet
from ..testing import make_inputs
from .timing import time_interleaved

__all__ = ["time_calls", "op_latency", "student_latency", "throughput", "main"]

INTERACTIONS = reference.INTERACTIONS


def time_calls(fns: Dict[str, Callable[[], object]], calls: int = 200, rounds: int = 10,
               warmup: int = 20, budget_s: float = 2.0) -> Dict[str, dict]:
    """Per-call seconds of each fn, interleaved in `rounds` blocks of calls: {name: {'median_s',
    'p99_s', 'n'}}. Up to `calls` calls per fn, fewer (at least `rounds`) for a fn so slow that
    they would take over `budget_s`.

    A block's calls run back to back, so the median is a call whose weights are still in cache
    from the previous one (a server repeating one model). The first call of each block follows the
    other fns' blocks, which may push its weights out of the core's caches: with blocks of more
    than 100 calls the p99 misses these calls, with fewer (the default 400 calls in 10 rounds) the
    p99 is one of them."""
    clock = time.perf_counter
    per_block = {}
    for name, fn in fns.items():
        t0 = clock()
        for _ in range(warmup):
            fn()
            if clock() - t0 > budget_s / 10:
                break
        t0 = clock()
        fn()
        n = min(calls, max(rounds, int(budget_s / max(clock() - t0, 1e-9))))
        per_block[name] = max(1, n // rounds)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, out = fns[name], samples[name]
            for _ in range(per_block[name]):
                t0 = clock()
                fn()
                out.append(clock() - t0)
    result = {}
    for name, xs in samples.items():
        xs.sort()
        result[name] = {"median_s": statistics.median(xs), "p99_s": xs[min(len(xs) - 1, int(0.99 * len(xs)))],
                        "n": len(xs)}
    return result


class _Threads:
    """Runs a callable with torch's intra-op thread count set to n (restored afterwards)."""

    def __init__(self, fn: Callable[[], object], n: int):
        self.fn, self.n = fn, n

    def __call__(self):
        before = torch.get_num_threads()
        torch.set_num_threads(self.n)
        try:
            return self.fn()
        finally:
            torch.set_num_threads(before)


def op_latency(batches: Sequence[int], interactions: Sequence[str], F: int, D: int, L: int,
               threads: Sequence[int], calls: int) -> List[dict]:
    """Raw fused forward (no grad) per interaction, batch and thread count."""
    rows = []
    for interaction in interactions:
        for B in batches:
            h0, p, q = make_inputs(interaction, B, F, D, L, dtype=torch.float32)
            fns = {n: _Threads(lambda: functional.dagfm_propagate(h0, p, q, interaction), n) for n in threads}
            with torch.no_grad():
                t = time_calls(fns, calls=calls)
            row = {"interaction": interaction, "batch": B}
            for n in threads:
                row[f"t{n}_median_us"] = t[n]["median_s"] * 1e6
                row[f"t{n}_p99_us"] = t[n]["p99_s"] * 1e6
            rows.append(row)
    return rows


def _embedding(F: int, D: int, vocab: int) -> FieldEmbedding:
    fields = [FieldSpec(f"f{j}", vocab={str(k): k + 1 for k in range(vocab - 1)}) for j in range(F)]
    return FieldEmbedding(FeatureSchema(fields), D).eval()


def student_latency(batches: Sequence[int], interactions: Sequence[str], F: int, D: int, L: int,
                    calls: int, vocab: int = 1000, seed: int = 0) -> List[dict]:
    """Whole forward per request of B candidates: DAGFM with the fused op, DAGFM with the eager
    reference propagation and the CrossNet teacher, each without and with the embedding lookup."""
    rows = []
    gen = torch.Generator().manual_seed(seed)
    embedding = _embedding(F, D, vocab)
    for interaction in interactions:
        torch.manual_seed(seed)
        student = DAGFM(F, D, L, interaction).eval()
        teacher = CrossNet(F, D, L).eval()

        def eager(emb, m=student):
            h0 = reference.field_mix(emb, m.connect_layer)
            s = reference.dagfm_propagate(h0, m.p, m.q, m.interaction)
            return m.linear(s.reshape(s.shape[0], -1)).squeeze(-1)

        models = {"fused": student, "eager": eager, "crossnet": teacher}
        for B in batches:
            ids = torch.randint(0, vocab, (B, F), generator=gen)
            emb = embedding(ids).detach()
            fns = {}
            for name, model in models.items():
                fns[name] = (lambda m=model: m(emb))
                fns[name + "+emb"] = (lambda m=model: m(embedding(ids)))
            with torch.no_grad():
                torch.testing.assert_close(student(emb), eager(emb), rtol=1e-4, atol=1e-5)
                t = time_calls(fns, calls=calls)
            row = {"interaction": interaction, "batch": B}
            for name, v in t.items():
                row[f"{name}_median_us"] = v["median_s"] * 1e6
                row[f"{name}_p99_us"] = v["p99_s"] * 1e6
            rows.append(row)
    return rows


def throughput(batch: int, interactions: Sequence[str], F: int, D: int, L: int, calls: int,
               matmul_n: int = 2048) -> dict:
    """Fused and eager forward / forward+backward at one large batch, in useful FLOP/s and as a
    fraction of the float32 matmul rate. The (matmul_n, matmul_n) product is timed in the same
    interleaved rounds and blocks of back-to-back calls as the ops (``time_interleaved``), so both
    sides of the fraction are measured the same way at the same moments."""
    a = torch.randn(matmul_n, matmul_n)
    b = torch.randn(matmul_n, matmul_n)
    rates = []
    rows = []
    for interaction in interactions:
        h0, p, q = make_inputs(interaction, batch, F, D, L, dtype=torch.float32, requires_grad=True)
        gs = torch.randn(batch, L + 1, F)
        args = [t for t in (h0, p, q) if t is not None]

        def fwd(op):
            def run():
                with torch.no_grad():
                    op(h0, p, q, interaction)
            return run

        def fwd_bwd(op):
            def run():
                torch.autograd.grad(op(h0, p, q, interaction), args, gs)
            return run

        ops = {"fused": functional.dagfm_propagate, "eager": reference.dagfm_propagate}
        fns = {f"{name} {kind}": make(op) for name, op in ops.items()
               for kind, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd))}
        fns["matmul"] = lambda: torch.mm(a, b)
        t = time_interleaved(fns, "cpu", rounds=max(3, calls), min_block_s=0.1)
        rates.append(2 * matmul_n ** 3 / t.pop("matmul")["median_s"])
        row = {"interaction": interaction, "batch": batch}
        for name, v in t.items():
            flops = useful_flops((batch, F, D, L), interaction, "fwd+bwd" if name.endswith("bwd") else "fwd")
            row[f"{name} ms"] = v["median_s"] * 1e3
            row[f"{name} GFLOP/s"] = flops / v["median_s"] / 1e9
        rows.append(row)
    rate = statistics.median(rates)
    for row in rows:
        for kind in ("fwd", "fwd+bwd"):
            row[f"fused {kind} / matmul"] = row[f"fused {kind} GFLOP/s"] * 1e9 / rate
            row[f"fused {kind} speedup vs eager"] = row[f"eager {kind} ms"] / row[f"fused {kind} ms"]
    return {"matmul_GFLOPs": rate / 1e9, "matmul_samples_GFLOPs": [r / 1e9 for r in rates], "rows": rows}


def environment() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": model,
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "kernel_isa": torch.ops.dagfm_ext.cpu_isa(), "torch": torch.__version__,
            "loadavg": load}


def _table(rows: List[dict], columns: Sequence[str], fmt: str = "{:.1f}") -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = ""
    for row in rows:
        cells = [fmt.format(row[c]) if isinstance(row[c], float) else str(row[c]) for c in columns]
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def format_report(env: dict, ops: List[dict], students: List[dict], thr: Optional[dict], threads) -> str:
    load = env["loadavg"]
    out = [f"Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, torch {env['torch']} "
           f"({env['torch_threads']} threads), kernels: {env['kernel_isa']}; {env['date']}; "
           f"load average before: {', '.join(f'{x:.2f}' for x in load) if load else 'n/a'}.\n"]
    if ops:
        cols = ["interaction", "batch"] + [f"t{n}_{k}_us" for n in threads for k in ("median", "p99")]
        out.append("Raw op forward, microseconds per call (tN = N threads):\n\n" + _table(ops, cols))
    if students:
        names = ["fused", "eager", "crossnet", "fused+emb", "eager+emb", "crossnet+emb"]
        out.append("Whole model forward per request, median (p99) microseconds; +emb includes the "
                   "embedding lookup:\n\n" + _table(
                       [{"interaction": r["interaction"], "batch": r["batch"],
                         **{n: f"{r[n + '_median_us']:.0f} ({r[n + '_p99_us']:.0f})" for n in names}}
                        for r in students], ["interaction", "batch"] + names))
    if thr:
        cols = ["interaction", "batch", "fused fwd ms", "fused fwd / matmul", "fused fwd speedup vs eager",
                "fused fwd+bwd ms", "fused fwd+bwd / matmul", "fused fwd+bwd speedup vs eager"]
        out.append(f"Large batch, float32 matmul rate {thr['matmul_GFLOPs']:.1f} GFLOP/s (median of "
                   f"{len(thr['matmul_samples_GFLOPs'])} measurements in this run):\n\n"
                   + _table(thr["rows"], cols, "{:.2f}"))
    return "\n".join(out)


def _ints(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--batches", type=_ints, default=[1, 16, 64, 256],
                        help="request sizes for the latency tables (default 1,16,64,256)")
    parser.add_argument("--op-batches", type=_ints, default=None,
                        help="batch sizes of the raw op table (default: --batches)")
    parser.add_argument("--interactions", default="inner,outer,kernel", help="comma-separated (default: all)")
    parser.add_argument("--shape", type=_ints, default=[39, 16, 3], metavar="F,D,L",
                        help="fields, embedding size, depth (default 39,16,3)")
    parser.add_argument("--threads", type=_ints, default=None,
                        help="thread counts for the raw op table (default: 1 and torch's default)")
    parser.add_argument("--calls", type=int, default=400, help="timed calls per variant (default 400)")
    parser.add_argument("--throughput-batch", type=int, default=4096,
                        help="batch of the throughput table; 0 skips it (default 4096)")
    parser.add_argument("--skip", default="", help="tables to skip: any of op,student,throughput")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    return parser


def run(args: argparse.Namespace) -> int:
    interactions = [x.strip() for x in args.interactions.split(",") if x.strip()]
    bad = [x for x in interactions if x not in INTERACTIONS]
    if bad:
        print(f"--interactions: expected some of {','.join(INTERACTIONS)}, got {','.join(bad)}", file=sys.stderr)
        return 2
    if len(args.shape) != 3:
        print(f"--shape: expected F,D,L, got {args.shape}", file=sys.stderr)
        return 2
    F, D, L = args.shape
    threads = args.threads or sorted({1, torch.get_num_threads()})
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    env = environment()
    ops = [] if "op" in skip else op_latency(args.op_batches or args.batches, interactions, F, D, L,
                                             threads, args.calls)
    students = [] if "student" in skip else student_latency(args.batches, interactions, F, D, L, args.calls)
    thr = None
    if "throughput" not in skip and args.throughput_batch > 0:
        thr = throughput(args.throughput_batch, interactions, F, D, L, calls=7)
    env["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(format_report(env, ops, students, thr, threads))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "op": ops, "student": students, "throughput": thr}, f, indent=1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dagfm-ext bench --latency", description=__doc__.split("\n\n")[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
