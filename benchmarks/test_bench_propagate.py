"""Microbenchmarks: ``dagfm_ext.dagfm_propagate`` (fused) vs ``reference`` eager vs ``torch.compile(reference)``.

Each benchmark first checks its implementation against the float64 reference on the very inputs it times
(values, and gradients for fwd+bwd): a fast wrong answer fails the test before anything is timed.
Benchmarks of one case share a pytest-benchmark group, so the table compares the implementations directly::

    pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

CUDA steps end with a synchronize, so wall-clock rounds measure the finished work. The speedup table with
GFLOP/s and roofline fractions is ``dagfm-ext bench`` (the dagfm_ext.bench package); this suite is for tracking
regressions with pytest-benchmark's storage and compare tools (``--benchmark-autosave``, ``--benchmark-compare``).
"""
from __future__ import annotations

import pytest
import torch

from dagfm_ext import bench


# The inputs and float64 reference of the current case, kept while its implementations run (one entry only,
# so memory stays bounded for the large shapes).
_cache: dict = {}


def _case_data(device, dtype, shape, interaction, pass_):
    key = (device, dtype, shape, interaction, pass_)
    if key not in _cache:
        _cache.clear()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        inputs = bench.case_inputs(shape, interaction, device, dtype, seed=0, requires_grad=pass_ != "fwd")
        refs = bench.reference_outputs(*inputs, interaction, pass_, dtype)
        _cache[key] = (inputs, refs)
    return _cache[key]


def test_propagate(benchmark, bench_case):
    device, dtype_name, shape, interaction, pass_, impl = bench_case
    dtype = bench.DTYPES[dtype_name]
    inputs, refs = _case_data(device, dtype, shape, interaction, pass_)
    h0, p, q, gs = inputs

    if impl == "fused":
        check = bench.check_fused(bench.fused_op, shape, interaction, pass_, device, dtype, refs=refs, inputs=inputs)
        if not check["ok"]:
            pytest.fail(f"fused op is wrong, not timed: {check['detail']}")
        step = bench.make_step(bench.fused_op, h0, p, q, gs, interaction, pass_)
    elif impl == "eager":
        step = bench.make_step(bench.reference_op, h0, p, q, gs, interaction, pass_)
    else:
        torch._dynamo.reset()
        mode = "reduce-overhead" if impl == "graphs" else None
        step, info = bench.compile_peer(mode, h0, p, q, gs, interaction, pass_, refs, dtype, device)
        if step is None:  # compile failed on this machine (or gave a wrong result): n/a, with the reason
            pytest.skip(f"torch.compile ({info['mode']}) n/a: {info['error']}")

    if device.startswith("cuda"):
        inner = step

        def step():
            out = inner()
            torch.cuda.synchronize()
            return out

    step()  # warm-up (caches, allocator); compile already happened above
    B, F, D, L = shape
    benchmark.group = f"{device} {dtype_name} B={B} F={F} D={D} L={L} {interaction} {pass_}"
    flops = bench.useful_flops(shape, interaction, pass_)
    benchmark.extra_info.update({"impl": impl, "interaction": interaction, "pass": pass_, "shape": list(shape),
                                 "device": device, "dtype": dtype_name, "useful_flops": flops})
    benchmark(step)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["useful_GFLOPs_at_median"] = flops / benchmark.stats.stats.median / 1e9
