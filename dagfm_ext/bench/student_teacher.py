"""Student vs teacher: the whole DAGFM forward (fused op) against the CrossNet teacher's forward,
and the same DAGFM with the eager reference propagation, so the table shows what distilling into the
student buys at serving time."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import reference
from ..testing import make_inputs
from .correctness import compare_outputs
from .report import first_line
from .timing import time_interleaved

__all__ = ["run_student_teacher"]


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _row_head(device, dtype, B, F, D, L, interaction) -> dict:
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "batch": B, "num_fields": F,
            "embed_dim": D, "depth": L, "interaction": interaction, "teacher": f"CrossNet(depth={L})"}


def _one_row(DAGFM, CrossNet, device, dtype, B, F, D, L, interaction, opts) -> dict:
    row = _row_head(device, dtype, B, F, D, L, interaction)
    torch.manual_seed(opts.seed)
    student = DAGFM(F, D, L, interaction).to(device=device, dtype=dtype).eval()
    teacher = CrossNet(F, D, L).to(device=device, dtype=dtype).eval()
    emb = make_inputs(interaction, B, F, D, 1, dtype, device, opts.seed)[0]

    def student_eager(m=student, x=emb):
        s = reference.dagfm_propagate(reference.field_mix(x, m.connect_layer), m.p, m.q, m.interaction)
        return m.linear(s.reshape(s.shape[0], -1)).squeeze(-1)

    with torch.no_grad():
        got, want = student(emb), student_eager()
        m64 = DAGFM(F, D, L, interaction).to(device=device, dtype=torch.float64).eval()
        m64.load_state_dict({k: v.to(torch.float64) for k, v in student.state_dict().items()})
        h64 = reference.field_mix(emb.double(), m64.connect_layer)
        s64 = reference.dagfm_propagate(h64, m64.p, m64.q, interaction)
        want64 = m64.linear(s64.reshape(B, -1)).squeeze(-1)
    check = compare_outputs((got,), (want64,), (want,), ["logits"], dtype)
    row["correctness"] = check
    if not check["ok"]:
        row["status"], row["error"] = "FAILED", check["detail"]
        return row
    t = time_interleaved({"student_fused": _no_grad(lambda: student(emb)),
                          "student_eager": _no_grad(student_eager),
                          "teacher": _no_grad(lambda: teacher(emb))},
                         device, rounds=opts.rounds, min_block_s=opts.min_block_s,
                         warmup=getattr(opts, "warmup", 2))
    for k, v in t.items():
        row[f"{k}_ms"] = v["median_s"] * 1e3
    row["teacher_over_student_fused"] = t["teacher"]["median_s"] / t["student_fused"]["median_s"]
    row["teacher_over_student_eager"] = t["teacher"]["median_s"] / t["student_eager"]["median_s"]
    row["status"] = "ok"
    return row


def run_student_teacher(device: str, dtype, batches: Sequence[int], F: int, D: int, L: int,
                        interactions: Sequence[str], opts) -> Tuple[List[dict], Optional[str]]:
    """DAGFM (fused op) forward vs the CrossNet teacher's forward (and the same DAGFM with the eager
    reference propagation). Returns (rows, skip message)."""
    try:
        from ..modules import DAGFM
        from ..teachers import CrossNet
    except Exception as exc:
        return [], f"student vs teacher rows skipped: dagfm_ext.modules.DAGFM / dagfm_ext.teachers.CrossNet " \
                   f"not available ({first_line(exc)})"
    rows = []
    for interaction in interactions:
        for B in batches:
            try:
                rows.append(_one_row(DAGFM, CrossNet, device, dtype, B, F, D, L, interaction, opts))
            except Exception as exc:
                rows.append(dict(_row_head(device, dtype, B, F, D, L, interaction), status="error",
                                 error=first_line(exc)))
    return rows, None
