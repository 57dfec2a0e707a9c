"""Serving the DAGFM student on CPU, side by side in one process: encoded rows -> logits, whole student
(embedding lookup with per-field offsets, field mixing, propagation, readout), F=39 (13 integer and 26
categorical Criteo-like fields), D=16, L=3, float32. Engines, all on the same weights and rows:

* ``ort ours``      -- onnxruntime on the graph of ``dagfm_ext.onnx_export`` (``dagfm-ext export --onnx``);
* ``ort naive``     -- onnxruntime on ``torch.onnx.export`` of the eager student (plain einsums over
  the masked weights, as ``dagfm_ext.reference`` writes them);
* ``eager``         -- that eager student in PyTorch;
* ``fused``         -- the package's student in PyTorch (the fused ``dagfm_ext`` op);
* ``aoti``          -- with ``--aoti``: the AOTInductor package of ``dagfm-ext export --aoti``
  (compiled for this CPU; compile time excluded).

Every engine's logits are checked against ``fused`` first. Latency is per call (one batch), over
interleaved rounds so that load changes hit every engine alike; rows/s = B / mean latency. With
``--threads 1 --cpu-time`` each call is timed by the calling thread's CPU time, which other jobs on
a shared machine disturb much less than wall time.

    python scripts/bench_serving.py [--threads 2] [--batches 1,64,1024] [--aoti] [--append benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dagfm_ext import reference
from dagfm_ext.data import FeatureSchema, FieldEmbedding, FieldSpec
from dagfm_ext.modules import DAGFM
from dagfm_ext.onnx_export import export_onnx
from dagfm_ext.onnx_scorer import OnnxStudent
from dagfm_ext.serving import Scorer, export_student

ENGINES = ("ort ours", "ort naive", "eager", "fused", "aoti")


class EagerStudent(nn.Module):
    """The student with the plain-PyTorch propagation instead of the fused op."""

    def __init__(self, student: DAGFM):
        super().__init__()
        self.student = student

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        m = self.student
        states = reference.dagfm_propagate(m.mixed(emb), m.p, m.q, m.interaction)
        return m.linear(states.reshape(states.shape[0], -1)).squeeze(-1)


def criteo_like_schema(vocab: int) -> FeatureSchema:
    kinds = [(f"I{k}", "integer") for k in range(1, 14)] + [(f"C{k}", "categorical") for k in range(1, 27)]
    return FeatureSchema([FieldSpec(n, kind=k, vocab={str(v): v for v in range(1, vocab + 1)}) for n, k in kinds])


def ort_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def engines_for(interaction: str, schema: FeatureSchema, args, work: Path) -> dict:
    """name -> callable(numpy int64 rows) -> numpy logits."""
    torch.manual_seed(0)
    embedding = FieldEmbedding(schema, args.embed_dim).eval()
    student = DAGFM(schema.num_fields, args.embed_dim, args.depth, interaction).eval()
    with torch.no_grad():
        student.connect_layer.add_(0.1 * torch.randn_like(student.connect_layer))
    fused, eager = Scorer(embedding, student).eval(), Scorer(embedding, EagerStudent(student)).eval()

    def torch_engine(module):
        def run(x):
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()
        return run

    export_onnx(embedding, student, schema, work / f"{interaction}.onnx")
    out = {"ort ours": OnnxStudent(work / f"{interaction}.onnx", threads=args.threads)}
    buf = io.BytesIO()
    example = torch.zeros(2, schema.num_slots, dtype=torch.long)
    torch.onnx.export(eager, (example,), buf, dynamo=False, opset_version=17, input_names=["slots"],
                      output_names=["logit"], dynamic_axes={"slots": {0: "batch"}, "logit": {0: "batch"}})
    naive = ort_session(buf.getvalue(), args.threads)
    out["ort naive"] = lambda x: naive.run(["logit"], {"slots": x})[0]
    out["eager"], out["fused"] = torch_engine(eager), torch_engine(fused)
    if args.aoti:
        package = work / f"{interaction}.aoti.pt2"
        export_student(embedding, student, schema, work / f"{interaction}.pt2", aoti_output=package)
        out["aoti"] = torch_engine(torch._inductor.aoti_load_package(str(package)))
    return out


def measure(engines: dict, x: np.ndarray, rounds: int, seconds: float, clock=time.perf_counter) -> dict:
    """Per-call times (s) of every engine by ``clock``, interleaved: each round gives each engine its
    share of ``seconds`` of wall time."""
    for fn in engines.values():  # warm-up
        for _ in range(3):
            fn(x)
    lat = {name: [] for name in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            stop = time.perf_counter() + seconds / rounds
            while True:
                t0 = clock()
                fn(x)
                lat[name].append(clock() - t0)
                if time.perf_counter() >= stop and len(lat[name]) >= 3:
                    break
    return lat


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return "unknown CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine (default: 2)")
    p.add_argument("--batches", default="1,64,1024", help="batch sizes (default: 1,64,1024)")
    p.add_argument("--interactions", default="inner,outer,kernel")
    p.add_argument("--embed-dim", type=int, default=16)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--vocab", type=int, default=10000, help="ids per field (default: 10000)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per engine and batch size (default: 2)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time each call by the calling thread's CPU time instead of wall time (needs --threads 1: "
                        "every engine then runs on the calling thread); less sensitive to other jobs on the machine")
    p.add_argument("--aoti", action="store_true", help="also the AOTInductor package (compiles one per interaction)")
    p.add_argument("--append", metavar="FILE", help="append the table as a section of this markdown file")
    args = p.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        p.error("--cpu-time: expected --threads 1 (other threads' CPU time would not be counted)")
    batches = [int(b) for b in args.batches.split(",")]
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    import onnxruntime
    schema = criteo_like_schema(args.vocab)
    rng = np.random.default_rng(0)
    load_start, started = os.getloadavg(), time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for interaction in args.interactions.split(","):
            engines = engines_for(interaction, schema, args, Path(tmp))
            for B in batches:
                x = rng.integers(0, args.vocab + 1, size=(B, schema.num_slots)).astype(np.int64)
                want = engines["fused"](x)
                for name, fn in engines.items():
                    err = float(np.abs(fn(x) - want).max())
                    if err > 1e-4:
                        raise SystemExit(f"{name} {interaction} B={B}: logits differ from the fused student "
                                         f"by {err:.2e}")
                lat = measure(engines, x, args.rounds, args.seconds, clock)
                for name, values in lat.items():
                    v = np.asarray(values)
                    rows.append((interaction, B, name, B / v.mean(), np.percentile(v, 50) * 1e3,
                                 np.percentile(v, 99) * 1e3, len(v)))
                by = {r[2]: r for r in rows if r[0] == interaction and r[1] == B}
                print(f"{interaction} B={B}: " + ", ".join(f"{n} {r[4]:.3f} ms" for n, r in by.items()),
                      file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/bench_serving.py", *(argv or sys.argv[1:])])
    start = datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"`{command}`, started {start}, {cpu_model()} ({os.cpu_count()} logical CPUs), threads per "
             f"engine: {args.threads}, {'CPU time of the calling thread' if args.cpu_time else 'wall time'} per call, "
             f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; load average "
             f"{load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; {time.time() - started:.0f} s.", "",
             "| interaction | B | engine | rows/s | p50 ms | p99 ms | calls | p50 / ort ours |",
             "|---|---|---|---|---|---|---|---|"]
    p50_ours = {(r[0], r[1]): r[4] for r in rows if r[2] == "ort ours"}
    for interaction, B, name, rate, p50, p99, n in rows:
        ratio = "" if name == "ort ours" else f"{p50 / p50_ours[(interaction, B)]:.2f}x"
        lines.append(f"| {interaction} | {B} | {name} | {rate:,.0f} | {p50:.3f} | {p99:.3f} | {n} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n## Serving on CPU: onnxruntime, PyTorch, AOTInductor (F=39, D=16, L=3, whole student)\n\n")
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
