"""Atomic file writes: a reader (or a run resumed after a kill) sees the old file or the new one,
never a torn one. The data goes to a temporary file in the same directory, is fsync'ed, then
``os.replace`` swaps it in.

The temporary file is ``NAME.PID.RANDOM.tmp``: a process killed mid-write leaves it behind, and
the next write of NAME removes those whose process no longer runs."""
from __future__ import annotations

import errno
import glob
import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, TextIO

import torch

__all__ = ["make_dirs", "atomic_write", "atomic_write_text", "atomic_write_stream", "atomic_torch_save",
           "remove_stale_temps"]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive under another user, or not a pid: leave it alone
    return True


def remove_stale_temps(path) -> None:
    """Remove the temporary files of writes of ``path`` by processes that no longer run."""
    path = Path(path)
    for tmp in glob.glob(glob.escape(str(path)) + ".*.tmp"):
        pid = Path(tmp).name[len(path.name) + 1:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _file_ancestor(path: Path):
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def make_dirs(path, needed_for=None) -> None:
    """``mkdir -p path`` (a folder ``needed_for`` some file); an ancestor that is a file is an
    error naming it."""
    path = Path(path)
    blocker = _file_ancestor(path / "x")
    if blocker is not None:
        what = f"{needed_for} cannot be written" if needed_for is not None else f"{path} cannot be created"
        raise NotADirectoryError(errno.ENOTDIR, f"is a file, so {what}", str(blocker))
    path.mkdir(parents=True, exist_ok=True)


def atomic_write(path, writer: Callable[[BinaryIO], object]) -> None:
    """Call ``writer(f)`` on a binary file that becomes ``path`` only once it is complete."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "expected a file path, got a directory", str(path))
    if not path.parent.is_dir():
        blocker = _file_ancestor(path)
        if blocker is not None:
            raise NotADirectoryError(errno.ENOTDIR, f"is a file, so {path} cannot be written", str(blocker))
        raise FileNotFoundError(errno.ENOENT, f"no such directory to write {path.name} in", str(path.parent))
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp")
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


def atomic_write_stream(path, writer: Callable[[TextIO], object]) -> None:
    """``atomic_write`` for a writer of UTF-8 text."""
    def write(f: BinaryIO) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer(text)
        text.flush()
        text.detach()  # the binary file stays open for atomic_write's fsync
    atomic_write(path, write)


def atomic_torch_save(obj, path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))
