"""Training precision: float32, TF32 matmuls, or bfloat16 / float16 mixed precision.

``fp32``  exact float32 everywhere (the default).
``tf32``  float32 tensors, TF32 tensor-core matmuls on CUDA (torch's "high" float32 matmul
          precision; the fused op's kernel interaction follows the same setting). On CPU it
          changes nothing.
``bf16``  forward and loss under ``torch.autocast`` with bfloat16 (CUDA and CPU); parameters,
          gradients and optimizer state stay float32.
``fp16``  the same with float16 and a ``GradScaler`` against gradient underflow; CUDA only (CPU
          autocast has no float16 support worth training with: use bf16 there).
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import torch

__all__ = ["PRECISIONS", "Precision", "check_precision", "add_precision_argument"]

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name: str, device: torch.device | str) -> str:
    """``name`` if it is a precision this device can train in; else a ValueError saying why."""
    if name not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {name!r}")
    device_type = torch.device(device).type
    if name == "fp16" and device_type != "cuda":
        raise ValueError(f"precision: 'fp16' needs a CUDA device (got device {device_type!r}); "
                         "use 'bf16' for mixed precision on the CPU")
    if device_type not in ("cpu", "cuda") and name in _AUTOCAST_DTYPES:
        raise ValueError(f"precision: {name!r} is supported on cpu and cuda, got device {device_type!r}")
    return name


def add_precision_argument(parser: argparse.ArgumentParser, default: str = "fp32") -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help="fp32; tf32 (TF32 matmuls on CUDA); bf16 or fp16 mixed precision "
                             "(fp16: CUDA only, with loss scaling) (default: %(default)s)")


class Precision:
    """What one training run needs for its precision: the forward context and the step."""

    def __init__(self, name: str, device: torch.device | str):
        self.name = check_precision(name, device)
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=name == "fp16")

    @contextlib.contextmanager
    def _matmul(self) -> Iterator[None]:
        if self.name != "tf32":
            yield
            return
        previous = torch.get_float32_matmul_precision()
        cudnn = torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
            torch.backends.cudnn.allow_tf32 = cudnn

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Around a forward and its loss (training and evaluation alike)."""
        dtype = _AUTOCAST_DTYPES.get(self.name)
        with self._matmul(), torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None):
            yield

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """loss.backward() and optimizer.step(), through the GradScaler for fp16."""
        with self._matmul():
            self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
