"""Where downloaded and preprocessed data is kept between runs, and the preprocessed-data cache.

An entry is a directory ``<cache>/preprocessed/<name>-<key>/`` holding ``x.int32`` (rows, slots),
``y.float32``, ``schema.json`` and ``meta.json`` (rows, split ranges, user field). The key hashes
the inputs' fingerprints (size, mtime, sha256 of the first and last MiB) and every option that
changes the encoding, so a changed file or option is preprocessed again. An entry is built in a
temporary directory, fsynced and renamed into place: a process killed while building leaves only
a ``.building-*`` directory, which no reader opens and a later build removes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

__all__ = ["cache_dir", "fingerprint", "entry_key", "CachedBuild", "flushed_while_written", "open_entry",
           "build_or_open"]

CACHE_VERSION = 2  # 2: derived fields carry their derivation in the schema
_EDGE = 1 << 20
_BUILDING = ".building-"


def cache_dir() -> Path:
    """``$DAGFM_EXT_CACHE``, else ``$XDG_CACHE_HOME/dagfm_ext``, else ``~/.cache/dagfm_ext``."""
    env = os.environ.get("DAGFM_EXT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dagfm_ext"


def fingerprint(path: Path) -> dict:
    """Size, mtime and a hash of the head and tail: cheap, and any edit or append changes it."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if st.st_size > _EDGE:
            f.seek(max(st.st_size - _EDGE, _EDGE))
            h.update(f.read(_EDGE))
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": h.hexdigest()}


def entry_key(paths: Sequence[Path], options: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "inputs": [fingerprint(p) for p in paths], "options": options},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_orphans(root: Path) -> None:
    """Build directories of processes that no longer run (killed mid-way)."""
    for d in root.glob(_BUILDING + "*"):
        try:
            pid = int(d.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass


@contextmanager
def flushed_while_written(*fds: int, period: float = 0.05) -> Iterator[None]:
    """While the block writes an entry's large files, a thread writes their dirty pages to disk
    every ``period`` s: the disk works while the data is still being made, and the closing fsync
    (``CachedBuild``) waits only for the last writes. The thread waits on the disk, not a core."""
    stop = threading.Event()

    def flush() -> None:
        while not stop.wait(period):
            for fd in fds:
                os.fdatasync(fd)

    flusher = threading.Thread(target=flush, name="cache-flush", daemon=True)
    flusher.start()
    try:
        yield
    finally:
        stop.set()
        flusher.join()


class CachedBuild:
    """``with CachedBuild(root, name) as tmp: ...write files into tmp...``; on success the
    directory is fsynced and renamed to ``root/name`` (kept if another process got there first)."""

    def __init__(self, root: Path, name: str):
        self.root, self.final = Path(root), Path(root) / name
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        _remove_orphans(self.root)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{_BUILDING}{self.final.name}-{os.getpid()}-", dir=self.root))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        # Together: the file system commits the concurrent fsyncs' metadata in one go.
        files = list(self.tmp.iterdir())
        with ThreadPoolExecutor(max_workers=max(1, len(files))) as pool:
            list(pool.map(_fsync_file, files))
        _fsync_dir(self.tmp)
        try:
            os.rename(self.tmp, self.final)
        except OSError:  # a concurrent build finished first: its entry is equivalent
            shutil.rmtree(self.tmp, ignore_errors=True)
        _fsync_dir(self.root)


def open_entry(path: Path, schema: Optional[dict] = None) -> Optional[dict]:
    """The metadata and memory-mapped arrays of a finished entry, or None if there is none.
    ``schema``: the entry's schema when the caller has just written it (no need to parse it back)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        rows, slots = meta["rows"], meta["num_slots"]
        x = np.memmap(path / "x.int32", np.int32, "r", shape=(rows, slots))
        y = np.memmap(path / "y.float32", np.float32, "r", shape=(rows,))
        if schema is None:
            schema = json.loads((path / "schema.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    meta.update(x=x, y=y, schema=schema)
    return meta


def build_or_open(root: Path, name: str, build: Callable[[Path], dict]) -> dict:
    """The entry ``root/name`` (plus its ``path`` and whether it was ``built`` now), building it
    with ``build(tmp_dir) -> meta`` if it is not there."""
    entry = open_entry(root / name)
    if entry is not None:
        return dict(entry, path=root / name, built=False)
    with CachedBuild(root, name) as tmp:
        meta = build(tmp)
        schema = meta.pop("schema")
        (tmp / "schema.json").write_text(json.dumps(schema))
        (tmp / "meta.json").write_text(json.dumps(meta))  # last: its presence marks a whole entry
    # The schema as written (an entry another process finished first holds the same one).
    entry = open_entry(root / name, schema=schema)
    if entry is None:
        raise RuntimeError(f"cache: the entry {root / name} could not be read back after it was written")
    return dict(entry, path=root / name, built=True)
