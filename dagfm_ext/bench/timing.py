"""Interleaved timing: every implementation of a case is timed in the same rounds.

Each function is warmed up, then timed in blocks of n calls (n chosen so a block lasts about
``min_block_s``); the blocks are interleaved round-robin, rotating the order each round, so a slow
drift of a shared machine hits all implementations alike. The figure is the median of the per-call
block times. CPU blocks use ``time.perf_counter``; CUDA blocks use events after a synchronize.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List

import torch

__all__ = ["sync", "time_block", "time_interleaved", "median_seconds"]


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Callable, n: int, device) -> float:
    """Seconds per call of ``fn`` over a block of ``n`` calls."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def time_interleaved(fns: Dict[str, Callable], device="cpu", rounds: int = 7, min_block_s: float = 0.1,
                     warmup: int = 2) -> Dict[str, dict]:
    """Median seconds per call of each fn, timed in interleaved blocks: {name: {'median_s', 'samples_s', 'n'}}."""
    names = list(fns)
    per_call: Dict[str, float] = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        sync(device)
        per_call[name] = time_block(fns[name], 1, device)
    n = {name: max(1, min(1000, int(math.ceil(min_block_s / max(per_call[name], 1e-7))))) for name in names}
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(time_block(fns[name], n[name], device))
    return {name: {"median_s": statistics.median(samples[name]), "samples_s": samples[name], "n": n[name]}
            for name in names}


def median_seconds(fn: Callable, device="cpu", rounds: int = 7, min_block_s: float = 0.05) -> float:
    """Median seconds per call of one function on its own."""
    return time_interleaved({"fn": fn}, device, rounds=rounds, min_block_s=min_block_s)["fn"]["median_s"]
