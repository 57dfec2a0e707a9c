"""The ``dagfm-ext bench`` options, the shape presets, and their validation."""
from __future__ import annotations

import argparse
from typing import List, Sequence, Tuple

import torch

from ..cost import PASSES
from ..reference import INTERACTIONS

__all__ = ["Shape", "CORE_SHAPES", "DTYPES", "parse_shapes", "default_shapes", "add_arguments",
           "resolve_devices", "parse_choices"]

Shape = Tuple[int, int, int, int]  # (B, F, D, L)

# Criteo-like F=39 D=16 L=3 over a range of batch sizes (the plot's x axis), plus Avazu-like F=23
# and a small F=8, so one run shows how the speedup moves with the batch and the field count.
_CPU_FULL: List[Shape] = [(256, 39, 16, 3), (1024, 39, 16, 3), (4096, 39, 16, 3), (16384, 39, 16, 3),
                          (4096, 23, 16, 3), (4096, 8, 16, 3)]
_CPU_QUICK: List[Shape] = [(128, 39, 16, 3), (512, 39, 16, 3)]
_CUDA_FULL: List[Shape] = [(1024, 39, 16, 3), (8192, 39, 16, 3), (65536, 39, 16, 3),
                           (65536, 23, 16, 3), (65536, 8, 16, 3)]
_CUDA_QUICK: List[Shape] = [(1024, 39, 16, 3), (8192, 39, 16, 3)]
# --core: one Criteo-sized training batch, the figure to compare between builds and machines.
CORE_SHAPES: List[Shape] = [(4096, 39, 16, 3)]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def parse_shapes(text: str | Sequence[str]) -> List[Shape]:
    """'B:F:D:L' items separated by commas or spaces (or a list of such strings) -> [(B, F, D, L), ...]."""
    items = text if isinstance(text, (list, tuple)) else [text]
    out: List[Shape] = []
    for chunk in items:
        for tok in str(chunk).replace(",", " ").split():
            parts = tok.split(":")
            if len(parts) != 4:
                raise ValueError(f"--shapes: expected B:F:D:L (e.g. 4096:39:16:3), got {tok!r}")
            try:
                b, f, d, l = (int(x) for x in parts)
            except ValueError:
                raise ValueError(f"--shapes: expected four integers B:F:D:L, got {tok!r}") from None
            if b < 1 or f < 1 or d < 1 or l < 1:
                raise ValueError(f"--shapes: B, F, D, L must be positive, got {tok!r}")
            out.append((b, f, d, l))
    if not out:
        raise ValueError("--shapes: no shape given")
    return out


def default_shapes(device: str, quick: bool) -> List[Shape]:
    if device.startswith("cuda"):
        return list(_CUDA_QUICK if quick else _CUDA_FULL)
    return list(_CPU_QUICK if quick else _CPU_FULL)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the bench options to ``parser`` (the CLI's ``bench`` subparser or a standalone parser)."""
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or a comma list; 'auto' = cpu plus cuda when available "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype of the inputs and weights (default: %(default)s)")
    parser.add_argument("--interactions", default=",".join(INTERACTIONS),
                        help="comma list of interaction types (default: %(default)s)")
    parser.add_argument("--passes", default=",".join(PASSES),
                        help="comma list of passes: fwd (no grad), fwd+bwd (default: %(default)s)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="B:F:D:L",
                        help="shapes to run, e.g. '1024:39:16:3 4096:39:16:3' (default: a per-device set; "
                             "see --quick)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="small shapes and short timing (the CI smoke test; < 3 min on 2 CPU cores)")
    mode.add_argument("--core", action="store_true",
                      help="the one-shape table to compare builds or machines: B=4096 F=39 D=16 L=3, "
                           "float32, CPU, all interactions and passes, no student rows")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's default)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile peers (cells read n/a)")
    parser.add_argument("--no-graphs", action="store_true",
                        help="skip the CUDA-graph peer (torch.compile mode='reduce-overhead')")
    parser.add_argument("--graphs-max-batch", type=int, default=8192,
                        help="largest batch ('serving size') for the CUDA-graph peer (default: %(default)s)")
    parser.add_argument("--no-student", action="store_true", help="skip the student vs teacher rows")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds per implementation (default: 7, --quick: 3)")
    parser.add_argument("--min-block-ms", type=float, default=None,
                        help="target duration of one timed block of calls (default: 100, --quick: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                        help="write every figure and the environment to PATH")
    parser.add_argument("--plot", dest="plot_path", default=None, metavar="PATH",
                        help="write a PNG of speedup vs batch size per interaction type to PATH "
                             "(needs matplotlib: pip install dagfm_ext[plot])")
    return parser


def resolve_devices(spec: str) -> List[str]:
    if spec == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devs = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devs:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise ValueError(f"--device: unknown device {d!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device: {d!r} requested but CUDA is not available")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected cpu or cuda, got {d!r}")
    return devs


def parse_choices(option: str, text: str, allowed: Sequence[str]) -> List[str]:
    """A non-empty comma list of ``allowed`` values, or a ValueError naming ``option``."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    if not chosen or any(s not in allowed for s in chosen):
        raise ValueError(f"{option}: expected a comma list of {tuple(allowed)}, got {text!r}")
    return chosen
