"""The machine's ceilings, measured in the same run as the op: copy bandwidth and matmul rates.

The roofline time of a case is ``max(FLOPs / rate, min bytes / bandwidth)``. The bandwidth is
``2 * bytes / time`` of a large ``Tensor.copy_``; the rate is that of a square matrix product
(TF32 off unless asked for), a measured lower bound of the FMA peak, so the fraction of the roofline
a case reaches is an upper bound.
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch

from .timing import time_interleaved

__all__ = ["measure_copy_bandwidth", "measure_matmul_rate", "measure_roofline", "roofline_time"]


def measure_copy_bandwidth(device, numel: int, quick: bool = False) -> Tuple[float, int]:
    """(bytes/s, bytes moved per copy) of a float32 ``Tensor.copy_`` of ``numel`` elements."""
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    res = time_interleaved({"copy": lambda: dst.copy_(src)}, device, rounds=5 if quick else 9,
                           min_block_s=0.02 if quick else 0.05)
    moved = 2 * src.numel() * src.element_size()
    return moved / res["copy"]["median_s"], moved


@contextlib.contextmanager
def _tf32(device, allow: bool):
    if torch.device(device).type != "cuda":
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def measure_matmul_rate(device, dtype, n: int, quick: bool = False, tf32: bool = False) -> float:
    """FLOP/s of an (n, n) @ (n, n) product in ``dtype`` on ``device``."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    with _tf32(device, tf32):
        res = time_interleaved({"mm": lambda: torch.mm(a, b)}, device, rounds=5 if quick else 9,
                               min_block_s=0.05 if quick else 0.2)
    return 2 * n ** 3 / res["mm"]["median_s"]


def measure_roofline(device, dtype, quick: bool) -> dict:
    """Copy bandwidth and matrix-product FLOP rate measured now on ``device``, for ``dtype``'s table."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    rate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out: dict = {"device": str(dev)}
    numel = (1 << 28 if not quick else 1 << 26) if cuda else (1 << 25 if not quick else 1 << 23)
    bandwidth, out["copy_bytes"] = measure_copy_bandwidth(dev, numel, quick)
    out["copy_GBps"] = bandwidth / 1e9
    n = (8192 if not quick else 4096) if cuda else (2048 if not quick else 1024)
    out["matmul_n"] = n
    out["matmul_dtype"] = str(rate_dtype).replace("torch.", "")
    out["fp_GFLOPs"] = measure_matmul_rate(dev, rate_dtype, n, quick) / 1e9
    out["note"] = ("copy bandwidth = 2*bytes/time of Tensor.copy_; FP rate = square matmul"
                   + (" with TF32 off" if cuda else "") + " (a measured lower bound of the FMA peak)")
    return out


def roofline_time(flops: float, nbytes: float, flop_rate: float, bandwidth: float) -> Tuple[float, str]:
    """(seconds, 'compute' or 'memory'): the lower bound of a case's time and what sets it."""
    compute, memory = flops / flop_rate, nbytes / bandwidth
    return max(compute, memory), "compute" if compute >= memory else "memory"
