"""Speedup comparison: the fused op against ``reference`` in eager mode and ``torch.compile(reference)``.

Run it as ``dagfm-ext bench`` (or ``python -m dagfm_ext bench`` / ``python -m dagfm_ext.bench``)::

    dagfm-ext bench --quick --device cpu --json out.json --plot out.png   # smoke test, < 3 min on 2 cores
    dagfm-ext bench --device cpu --json cpu.json --plot speedup_cpu.png   # full CPU table
    dagfm-ext bench --core                                                 # B=4096 F=39 D=16 L=3 fp32 CPU

Every figure is a ratio measured side by side in one run, on the same inputs. For each device, shape
(B, F, D, L), interaction and pass (``fwd``: forward under no_grad; ``fwd+bwd``: forward plus
``torch.autograd.grad`` of the states for h0, p and q, i.e. a training step of the op), it times

* ``fused``    -- ``dagfm_ext.dagfm_propagate`` (looked up at call time, so a monkeypatched op is what runs),
* ``eager``    -- ``dagfm_ext.reference.dagfm_propagate`` in eager mode,
* ``compiled`` -- ``torch.compile(reference, dynamic=False)``, compile time excluded,
* ``graphs``   -- CUDA only, at serving sizes: ``torch.compile(reference, mode="reduce-overhead")``.

Correctness comes first (``correctness``): a wrong or crashing op gives a ``FAILED`` row with no
times and exit status 1. Timing is interleaved (``timing``); the useful FLOPs and minimal bytes come
from ``dagfm_ext.cost`` and are set against the copy bandwidth and matmul rate measured in the same
run (``roofline``).

The modules: ``arguments`` (options and shape presets), ``harness`` (the run), ``case`` (one row),
``ops`` (the implementations and one pass of each), ``correctness``, ``peers`` (torch.compile and
CUDA graphs), ``timing``, ``roofline``, ``student_teacher``, ``report`` (tables, environment, JSON)
and ``plot``.
"""
from __future__ import annotations

from ..cost import PASSES, min_bytes, useful_flops
from ..reference import INTERACTIONS
from .arguments import CORE_SHAPES, DTYPES, add_arguments, default_shapes, parse_shapes
from .case import run_case
from .correctness import case_inputs, check_fused, compare_outputs, reference_outputs
from .harness import main
from .ops import fused_op, make_step, reference_op, run_pass
from .peers import compile_peer
from .roofline import measure_roofline, roofline_time
from .timing import time_interleaved

__all__ = ["add_arguments", "main", "parse_shapes", "default_shapes", "CORE_SHAPES", "DTYPES", "INTERACTIONS",
           "PASSES", "useful_flops", "min_bytes", "case_inputs", "check_fused", "compare_outputs",
           "reference_outputs", "fused_op", "reference_op", "run_pass", "make_step", "compile_peer", "run_case",
           "time_interleaved", "measure_roofline", "roofline_time"]
