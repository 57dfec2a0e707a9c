"""pytest-benchmark microbenchmarks of the fused op: options and parametrisation.

    pytest benchmarks/                      # small default set (CPU: about a minute on 2 cores)
    pytest benchmarks/ --full               # the shapes of `dagfm-ext bench` on every available device
    pytest benchmarks/ --bench-device cuda --bench-dtype float64 --benchmark-max-time 2
"""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("dagfm_ext benchmarks")
    group.addoption("--full", action="store_true", default=False,
                    help="run the shapes of `dagfm-ext bench` instead of the small default set")
    group.addoption("--bench-device", default="auto",
                    help="cpu, cuda, or auto (cpu plus cuda when available; default)")
    group.addoption("--bench-dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                    help="dtype of inputs and weights (default float32)")
    group.addoption("--bench-interactions", default="inner,outer,kernel",
                    help="comma list of interaction types (default: all three)")


def pytest_configure(config):
    # emitted by torch's own modules when inductor is imported; not ours to fix
    config.addinivalue_line("filterwarnings",
                            "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _devices(spec: str):
    if spec == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [d.strip() for d in spec.split(",") if d.strip()]


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    from dagfm_ext import bench  # imported here: collecting the options must not load the extension

    cfg = metafunc.config
    full = cfg.getoption("--full")
    dtype = cfg.getoption("--bench-dtype")
    interactions = [s.strip() for s in cfg.getoption("--bench-interactions").split(",") if s.strip()]
    cases, ids = [], []
    for device in _devices(cfg.getoption("--bench-device")):
        if device.startswith("cuda") and not torch.cuda.is_available():
            continue
        cuda = device.startswith("cuda")
        shapes = bench.default_shapes(device, quick=False) if full else [(8192, 39, 16, 3) if cuda
                                                                          else (512, 39, 16, 3)]
        for shape in shapes:
            for interaction in interactions:
                for pass_ in bench.PASSES:
                    impls = ["fused", "eager", "compiled"]
                    if cuda and shape[0] <= 8192:
                        impls.append("graphs")  # torch.compile(mode="reduce-overhead"): the serving-size peer
                    # impl varies fastest, so the float64 reference of a case is computed once (see the cache)
                    for impl in impls:
                        cases.append((device, dtype, shape, interaction, pass_, impl))
                        ids.append(f"{device}-{dtype}-{'x'.join(map(str, shape))}-{interaction}-{pass_}-{impl}")
    metafunc.parametrize("bench_case", cases, ids=ids)
