"""Atomic file writes: a reader (or a run resumed after a kill) sees the old file or the new one,
never a torn one. The data goes to a temporary file in the same directory, is fsync'ed, then
``os.replace`` swaps it in."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save"]


def atomic_write(path, writer: Callable[[BinaryIO], object]) -> None:
    """Call ``writer(f)`` on a binary file that becomes ``path`` only once it is complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj, path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
