"""One case of the table: a shape, an interaction and a pass on one device.

The fused op is checked first; only a correct op is timed, side by side with the eager reference
and its compiled peers, and its time is set against the cost model and the measured roofline.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..cost import min_bytes, useful_flops
from .arguments import Shape
from .correctness import case_inputs, check_fused, reference_outputs
from .ops import fused_op, make_step, reference_op
from .peers import compile_peer
from .report import first_line
from .roofline import roofline_time
from .timing import time_interleaved

__all__ = ["case_row", "run_case"]


def case_row(shape: Shape, interaction: str, pass_: str, device: str, dtype) -> dict:
    """The fields that name a case in the report."""
    B, F, D, L = shape
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "shape": f"{B}:{F}:{D}:{L}",
            "batch": B, "num_fields": F, "embed_dim": D, "depth": L, "interaction": interaction, "pass": pass_}


def _timed_peers(opts, shape, inputs, refs, interaction, pass_, dtype, device):
    """Steps of the fused op, the eager reference and the compiled peers that passed their check."""
    h0, p, q, gs = inputs
    fns = {"fused": make_step(fused_op, h0, p, q, gs, interaction, pass_),
           "eager": make_step(reference_op, h0, p, q, gs, interaction, pass_)}
    peers: Dict[str, dict] = {}
    if opts.no_compile:
        peers["compiled"] = {"error": "skipped (--no-compile)"}
    else:
        step, peers["compiled"] = compile_peer(None, h0, p, q, gs, interaction, pass_, refs, dtype, device)
        if step is not None:
            fns["compiled"] = step
    if torch.device(device).type == "cuda" and not opts.no_graphs and shape[0] <= opts.graphs_max_batch:
        if opts.no_compile:
            peers["graphs"] = {"error": "skipped (--no-compile)"}
        else:
            step, peers["graphs"] = compile_peer("reduce-overhead", h0, p, q, gs, interaction, pass_, refs,
                                                 dtype, device)
            if step is not None:
                fns["graphs"] = step
    return fns, peers


def run_case(shape: Shape, interaction: str, pass_: str, device: str, dtype, opts, roof: Optional[dict]) -> dict:
    """Check the fused op, then time fused / eager / compiled (/ graphs) side by side; one result row."""
    row = case_row(shape, interaction, pass_, device, dtype)
    torch._dynamo.reset()
    inputs = case_inputs(shape, interaction, device, dtype, opts.seed, requires_grad=pass_ != "fwd")
    refs = reference_outputs(*inputs, interaction, pass_, dtype)
    check = check_fused(fused_op, shape, interaction, pass_, device, dtype, refs=refs, inputs=inputs)
    row["correctness"] = check
    if not check["ok"]:
        row["status"] = "FAILED"
        row["error"] = check["detail"]
        return row

    fns, peers = _timed_peers(opts, shape, inputs, refs, interaction, pass_, dtype, device)
    try:
        timings = time_interleaved(fns, device, rounds=opts.rounds, min_block_s=opts.min_block_s,
                                   warmup=getattr(opts, "warmup", 2))
    except Exception as exc:
        row["status"] = "error"
        row["error"] = f"timing failed: {first_line(exc)}"
        return row

    row["status"] = "ok"
    row["peers"] = peers
    row["timings"] = {k: {"median_ms": v["median_s"] * 1e3, "samples_ms": [s * 1e3 for s in v["samples_s"]],
                          "calls_per_block": v["n"]} for k, v in timings.items()}
    fused_s = timings["fused"]["median_s"]
    for impl in ("fused", "eager", "compiled", "graphs"):
        row[f"{impl}_ms"] = timings[impl]["median_s"] * 1e3 if impl in timings else None
        if impl != "fused":
            row[f"speedup_vs_{impl}"] = (timings[impl]["median_s"] / fused_s) if impl in timings else None
            if impl in peers and "error" in peers[impl]:
                row[f"{impl}_error"] = peers[impl]["error"]
    flops = useful_flops(shape, interaction, pass_)
    nbytes = min_bytes(shape, interaction, pass_, torch.empty((), dtype=dtype).element_size())
    row["flops"] = flops
    row["min_bytes"] = nbytes
    row["fused_GFLOPs"] = flops / fused_s / 1e9
    row["eager_GFLOPs"] = flops / timings["eager"]["median_s"] / 1e9
    if roof:
        t_roof, bound = roofline_time(flops, nbytes, roof["fp_GFLOPs"] * 1e9, roof["copy_GBps"] * 1e9)
        row["roofline_ms"] = t_roof * 1e3
        row["roofline_fraction"] = t_roof / fused_s
        row["roofline_bound"] = bound
    return row
