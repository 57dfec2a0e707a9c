"""The run: validate the options, then for each device measure the roofline, run every case and the
student-vs-teacher rows, and print / store the tables. Exit status 0: every check passed;
1: a correctness failure or an error in some row; 2: bad arguments."""
from __future__ import annotations

import argparse
import sys
import time
from typing import List

import torch

from ..cost import PASSES
from ..reference import INTERACTIONS
from .arguments import CORE_SHAPES, DTYPES, default_shapes, parse_choices, parse_shapes, resolve_devices
from .case import case_row, run_case
from .plot import require_matplotlib, write_plot
from .report import (environment, first_line, fmt_load, fmt_ms, format_student_table, format_table, loadavg,
                     write_json)
from .roofline import measure_roofline
from .student_teacher import run_student_teacher

__all__ = ["main"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    """Run the comparison described by ``args`` (from ``add_arguments``). 0: all checks passed; 1: a
    correctness failure or error; 2: bad arguments."""
    try:
        devices = resolve_devices(args.device)
        interactions = parse_choices("--interactions", args.interactions, INTERACTIONS)
        passes = parse_choices("--passes", args.passes, PASSES)
        dtype = DTYPES[args.dtype]
        shapes_arg = parse_shapes(args.shapes) if args.shapes else None
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads: expected a positive int, got {args.threads}")
        if args.plot_path:
            require_matplotlib()  # before the run, not after its minutes
    except ValueError as exc:
        print(f"dagfm-ext bench: error: {exc}", file=sys.stderr)
        return 2
    if args.core:
        devices, dtype, interactions = ["cpu"], torch.float32, list(INTERACTIONS)
        shapes_arg = shapes_arg or list(CORE_SHAPES)
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


def _device_cases(args, device, shapes, interactions, passes, dtype, roof) -> List[dict]:
    rows = []
    for shape in shapes:
        for interaction in interactions:
            for pass_ in passes:
                t0 = time.perf_counter()
                try:
                    row = run_case(shape, interaction, pass_, device, dtype, args, roof)
                except Exception as exc:  # never let one case kill the table
                    row = dict(case_row(shape, interaction, pass_, device, dtype), status="error",
                               error=first_line(exc))
                row["case_wall_s"] = time.perf_counter() - t0
                rows.append(row)
                _log(f"[bench] {device} {row['shape']} {interaction:6s} {pass_:7s} "
                     + (f"fused {fmt_ms(row['fused_ms'])} ms  eager {fmt_ms(row['eager_ms'])} ms  "
                        f"compiled {fmt_ms(row['compiled_ms'])} ms" if row["status"] == "ok"
                        else f"{row['status']}: {row.get('error')}")
                     + f"  ({row['case_wall_s']:.1f}s)")
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    return rows


def _student_rows(args, device, shapes, interactions, dtype, report, tables) -> bool:
    """Append the student-vs-teacher table for ``device``; True when a row failed."""
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
        return False
    report["student_teacher"].extend(st_rows)
    tables.append(f"#### Student vs teacher on {device}: DAGFM (fused op) vs CrossNet, forward\n\n"
                  + format_student_table(st_rows))
    return any(r["status"] != "ok" for r in st_rows)


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
            report["messages"].append(f"{device}: roofline measurement failed: {first_line(exc)}")
        report["roofline"][device] = roof
        rows = _device_cases(args, device, shapes, interactions, passes, dtype, roof)
        failed |= any(r["status"] != "ok" for r in rows)
        report["results"].extend(rows)
        title = (f"### {device} ({env['devices'][device]['name']}), {report['dtype']}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads")
        tables.append(title + "\n\n" + format_table(rows, device, roof))
        if not args.no_student:
            failed |= _student_rows(args, device, shapes, interactions, dtype, report, tables)

    env["loadavg_end"] = loadavg()
    env["wall_s"] = time.perf_counter() - t_start
    report["ok"] = not failed
    print("\n\n".join(tables))
    for m in report["messages"]:
        print(f"\nnote: {m}")
    print(f"\n{env['date']} | {env['cpu_model']} ({env['cpu_count']} cores) | loadavg start "
          f"{fmt_load(env['loadavg_start'])} end {fmt_load(env['loadavg_end'])} | {env['wall_s']:.0f} s | "
          f"command: {env['command']}")
    if failed:
        print("\nbench: CORRECTNESS FAILURE or error in at least one row (see FAILED/ERROR above); no time is "
              "reported for those rows.")
    if args.plot_path:
        write_plot(report["results"], args.plot_path)
    if args.json_path:
        write_json(report, args.json_path)
    return 1 if failed else 0
