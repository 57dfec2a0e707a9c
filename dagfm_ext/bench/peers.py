"""The compiled peers of the fused op: ``torch.compile(reference)`` and, on CUDA at serving
sizes, the same with CUDA graphs (mode="reduce-overhead").

Compile time is kept out of the timings: the first calls compile (their seconds go to the report),
and the result is checked like the fused op's. A peer that fails to compile, or compiles to a
wrong answer, is reported as n/a with the reason rather than timed.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import torch

from .. import reference
from .correctness import compare_outputs
from .ops import make_step, output_names, run_pass
from .report import first_line
from .timing import sync

__all__ = ["compile_peer"]


def compile_peer(mode: Optional[str], h0, p, q, grad_states, interaction: str, pass_: str, refs, dtype,
                 device) -> Tuple[Optional[Callable], dict]:
    """Compile the reference, check it; returns (timed step or None, info dict)."""
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
                run_pass(op, h0, p, q, grad_states, interaction, pass_)
            torch.compiler.cudagraph_mark_step_begin()
        outs = run_pass(op, h0, p, q, grad_states, interaction, pass_)
        outs = tuple(o.clone() for o in outs)
        sync(device)
        info["compile_s"] = time.perf_counter() - t0
    except Exception as exc:  # compile failures are reported as n/a with the reason, never a crash
        info["error"] = first_line(exc)
        return None, info
    check = compare_outputs(outs, refs[0], refs[1], output_names(q, pass_), dtype)
    if not check["ok"]:
        info["error"] = f"wrong result, not timed ({check['detail']})"
        return None, info
    return make_step(op, h0, p, q, grad_states, interaction, pass_, mark_step=mode == "reduce-overhead"), info
