"""A background thread that runs an iterator ahead of its consumer (batches for the training
step, parsed chunks for the preprocessing). Needs no torch: pinning calls the tensors' method."""
from __future__ import annotations

import queue
import threading

__all__ = ["Prefetcher"]


class Prefetcher:
    """Iterates ``batches`` in a background thread, up to ``depth`` batches ahead, so that batch
    assembly overlaps the training step; ``pin`` puts the tensors in page-locked memory (for
    ``.to(cuda, non_blocking=True)``). The order is that of ``batches``; an exception raised
    there is raised here."""

    _DONE = object()

    def __init__(self, batches, depth: int = 2, pin: bool = False):
        if depth < 1:
            raise ValueError(f"depth: expected >= 1, got {depth}")
        self._source, self._pin = batches, pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="dagfm-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for batch in self._source:
                if self._pin:
                    batch = tuple(t.pin_memory() for t in batch)
                if not self._put(batch):
                    return
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            self._put(e)

    def __iter__(self):
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
