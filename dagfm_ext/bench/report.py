"""What a run prints and stores: the Markdown tables, the environment of the run, the JSON file."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from typing import List, Optional, Sequence

import torch

__all__ = ["first_line", "fmt_ms", "fmt_load", "format_table", "format_student_table", "environment",
           "loadavg", "write_json"]

_PASS_LABEL = {"fwd": "fwd no-grad", "fwd+bwd": "fwd+bwd"}


def first_line(exc: BaseException) -> str:
    """An exception as one short line for a table cell."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def fmt_ms(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if v < 1 else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def _fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_load(v) -> str:
    return "n/a" if not v else "/".join(f"{x:.2f}" for x in v)


def _shape_str(r) -> str:
    return f"{r['batch']}x{r['num_fields']}x{r['embed_dim']}x{r['depth']}"


def _failed_cells(r: dict, width: int) -> List[str]:
    label = "FAILED" if r["status"] == "FAILED" else "ERROR"
    return [f"**{label}**: {r.get('error', '')}"] + [""] * width


def format_table(rows: List[dict], device: str, roof: Optional[dict]) -> str:
    cuda = device.startswith("cuda")
    impls = ["fused", "eager", "compiled"] + (["graphs"] if cuda else [])
    head = ["shape BxFxDxL", "interaction", "pass"] + [f"{i} ms" for i in impls]
    head += [f"vs {i}" for i in impls[1:]] + ["fused GFLOP/s", "roofline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes: List[str] = []
    for r in rows:
        cells = [_shape_str(r), r["interaction"], _PASS_LABEL.get(r["pass"], r["pass"])]
        if r["status"] != "ok":
            lines.append("| " + " | ".join(cells + _failed_cells(r, len(head) - 4)) + " |")
            continue
        for impl in impls:
            v = r.get(f"{impl}_ms")
            cell = fmt_ms(v)
            err = r.get(f"{impl}_error")
            if v is None and err:
                if err not in notes:
                    notes.append(err)
                cell = f"n/a [{notes.index(err) + 1}]"
            cells.append(cell)
        cells += [_fmt_x(r.get(f"speedup_vs_{i}")) for i in impls[1:]]
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
            cells += _failed_cells(r, 4)
        else:
            cells += [fmt_ms(r["student_fused_ms"]), fmt_ms(r["student_eager_ms"]), fmt_ms(r["teacher_ms"]),
                      _fmt_x(r["teacher_over_student_fused"]), _fmt_x(r["teacher_over_student_eager"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nForward, no grad, whole model (field mixing + propagation + readout); "
                               "teacher/student > 1 means the student is faster.")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def _git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        res = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        commit = res.stdout.strip()
        return commit if res.returncode == 0 and len(commit) == 40 else None
    except Exception:
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
        "loadavg_start": loadavg(),
        "devices": {},
    }
    try:
        import dagfm_ext
        env["dagfm_ext_version"] = getattr(dagfm_ext, "__version__", None)
        env["build_info"] = {k: str(v) for k, v in dagfm_ext.build_info().items()}
    except Exception as exc:
        env["build_info"] = f"unavailable ({first_line(exc)})"
    env["git_commit"] = _git_commit()
    for d in devices:
        if d.startswith("cuda"):
            env["devices"][d] = {"name": torch.cuda.get_device_name(torch.device(d)),
                                 "cuda": torch.version.cuda}
        else:
            env["devices"][d] = {"name": env["cpu_model"], "threads": torch.get_num_threads()}
    return env


def write_json(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
