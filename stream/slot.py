"""The one-slot hand-off between a source thread and the pipeline: the latest item wins."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds only the newest item: put() never blocks, get() waits on a condition, skips counted.

    Guidance needs the newest frame, not every frame: a producer that outruns the consumer
    overwrites the waiting item and ``skipped`` counts each overwrite.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._has_item = False
        self._closed = False
        self.put_count = 0
        self.skipped = 0

    def put(self, item: T) -> None:
        """Store ``item``, replacing (and counting) any item not yet taken."""
        with self._cond:
            if self._has_item:
                self.skipped += 1
            self._item, self._has_item = item, True
            self.put_count += 1
            self._cond.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """Take the newest item, waiting up to ``timeout`` s; None on timeout or closed + empty."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._has_item or self._closed, timeout=timeout):
                return None
            if not self._has_item:
                return None
            item, self._item, self._has_item = self._item, None, False
            return item

    @property
    def ready(self) -> bool:
        """Whether an item is waiting (a get() now would not block)."""
        with self._cond:
            return self._has_item

    def close(self) -> None:
        """Wake every waiter; later get() calls return what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
