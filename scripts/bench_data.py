"""Data-path measurements on a Criteo-format file (see make_criteo_sample.py):

  1. pyarrow's bare read of the file into string columns (the floor the preprocessing is held to);
  2. the first preprocessing into an empty cache (rows/s, its ratio to 1, and its CPU less that of
     a child that only imports);
  3. the second run's time until the data is ready (cache hit);
  4. peak RSS of a `dagfm-ext preprocess` process (its own process, so nothing else is counted);
  5. one more first preprocessing in this process: wall, process CPU and the consuming thread's
     CPU (on an idle machine the wall is about the larger of that thread's serial work and the
     process CPU over the cores, so these say which one to shorten);
  6. a training-step profile on the cached data: the share of each step spent waiting for the batch.

    python scripts/bench_data.py --input criteo_1m.tsv [--steps 300] [--skip-profile]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch

import dagfm_ext
from dagfm_ext.data import FieldEmbedding, Prefetcher, load_criteo
from dagfm_ext.data.formats import CRITEO_CAT, CRITEO_INT
from dagfm_ext.modules import DAGFM


# The child reports its own peak (VmHWM belongs to its address space; a fork's copy of this
# parent, counted by rusage's maxrss, is not).
CHILD = """import sys
from dagfm_ext.cli import main
from dagfm_ext.data import datasets
rc = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
peak = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]
print('VmHWM_KiB', peak, file=sys.stderr)
sys.exit(rc)
"""


def bare_read(path: Path) -> tuple:
    """(wall s, CPU s) of pyarrow reading every column as strings."""
    names = ["label"] + CRITEO_INT + CRITEO_CAT
    t0, c0 = time.perf_counter(), time.process_time()
    pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=names),
                   parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                   convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                        strings_can_be_null=False))
    return time.perf_counter() - t0, time.process_time() - c0


def in_process(path: Path) -> dict:
    """Wall, process CPU and calling-thread CPU seconds of one preprocessing into an empty cache."""
    with tempfile.TemporaryDirectory() as cache:
        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        load_criteo(path, cache_dir=cache)
        return {"wall_s": time.perf_counter() - t0, "process_cpu_s": time.process_time() - c0,
                "main_thread_cpu_s": time.thread_time() - m0}


def child(args) -> dict:
    """Wall and CPU seconds, peak RSS (MiB) and stdout of `dagfm-ext ARGS` in a fresh process."""
    t0, c0 = time.perf_counter(), os.times()
    # `python -c` puts the working directory first on the path: run it where this process's
    # package lies, so the child measures the same package even when started from another checkout.
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(dagfm_ext.__file__).resolve().parents[1])
    out, err = proc.communicate()
    c1 = os.times()
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed with {proc.returncode}: {err[-2000:]}")
    peak = int(err.rsplit("VmHWM_KiB", 1)[1].split()[0]) / 1024
    cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu, "peak_rss_mib": peak, "says": out.strip().splitlines()[:1]}


def profile_steps(data, steps: int, batch_size: int, prefetch: bool) -> dict:
    torch.manual_seed(0)
    emb = FieldEmbedding(data.schema, 16)
    net = DAGFM(data.schema.num_fields, 16, 3, "inner")
    opt = torch.optim.Adam(list(emb.parameters()) + list(net.parameters()), lr=1e-3)

    def epochs():  # as the pipeline does: a new shuffle (and prefetch thread) every epoch
        for epoch in range(10**6):
            batches = data.batches("train", batch_size, shuffle=True, rng=np.random.default_rng([0, epoch]))
            yield from (Prefetcher(batches) if prefetch else batches)

    it = epochs()
    wait = compute = 0.0
    for step in range(steps + 10):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(emb(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if step >= 10:  # warm-up
            wait, compute = wait + t1 - t0, compute + t2 - t1
    return {"prefetch": prefetch, "steps": steps, "batch_size": batch_size, "wait_ms": 1e3 * wait / steps,
            "step_ms": 1e3 * (wait + compute) / steps, "wait_share": wait / (wait + compute)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True, help="Criteo-format TSV")
    p.add_argument("--steps", type=int, default=300, help="training steps to profile (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--skip-profile", action="store_true", help="only the preprocessing figures")
    args = p.parse_args(argv)
    rows = sum(1 for _ in open(args.input, "rb"))
    out = {"file": str(args.input), "rows": rows, "file_mib": args.input.stat().st_size / 2**20,
           "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(), "torch_threads": torch.get_num_threads()}
    out["imports_only"] = child([])  # the floor: torch, pyarrow and the package imported
    with tempfile.TemporaryDirectory() as cache:
        cmd = ["preprocess", "--dataset", f"criteo:{args.input}", "--cache-dir", cache, "--quiet"]
        out["bare_read_s"], out["bare_read_cpu_s"] = bare_read(args.input)
        out["first"] = child(cmd)
        # Less the imports' CPU (a child that only imports): the preprocessing's own.
        out["first"]["preprocess_cpu_s"] = out["first"]["cpu_s"] - out["imports_only"]["cpu_s"]
        # Without start-up; from the rows/s it prints (its seconds are rounded to 0.1 s).
        rate = float(re.search(r"\(([0-9,]+) rows/s\)", out["first"]["says"][0]).group(1).replace(",", ""))
        inner = rows / rate
        out["first"].update(preprocess_s=inner, rows_per_s=rate)
        out["ratio_to_bare_read"] = inner / out["bare_read_s"]
        out["second"] = child(cmd)
        t0 = time.perf_counter()
        data = load_criteo(args.input, cache_dir=cache)
        out["ready_in_process_s"] = time.perf_counter() - t0
        out["first_in_process"] = in_process(args.input)
        if not args.skip_profile:
            out["profile"] = [profile_steps(data, args.steps, args.batch_size, prefetch) for prefetch in (True, False)]
    out["load_avg_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
