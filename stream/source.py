"""The Source protocol, the thread every source runs on, and the simulated source (``--demo``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Protocol

from regseg.clock import now_ns
from regseg.stream.slot import LatestSlot
from regseg.types import Frame


class Source(Protocol):
    """Puts Frames into ``slot`` from its own thread between start() and stop()."""

    slot: LatestSlot[Frame]
    knows_truth: bool

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def finished(self) -> bool: ...

    def stats(self) -> dict: ...


class SourceThread:
    """A daemon thread and the Event that asks it to end, for sources and simulated senders.

    The thread's loop checks ``stopping`` and waits on it (:meth:`wait_until`, :meth:`paced`), so
    stop() cuts every wait short: no sleep polling, no drift (each wait runs to its own deadline).
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=target, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float, wake: Callable[[], None] | None = None) -> None:
        """Set ``stopping``, call ``wake`` (to unblock a read or an accept), join within
        ``timeout`` s."""
        self.stopping.set()
        if wake is not None:
            wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def finished(self) -> bool:
        """True once the thread has run and ended."""
        return self._thread.ident is not None and not self._thread.is_alive()

    def wait_until(self, due_ns: int) -> int | None:
        """Wait until ``due_ns`` (``regseg.clock.now_ns()``); None if stop() came first, else
        how late the call came, ns (0 when early enough to wait)."""
        wait_ns = due_ns - now_ns()
        if wait_ns > 0 and self.stopping.wait(wait_ns / 1e9):
            return None
        return max(-wait_ns, 0)

    def paced(self, period_ns: int, t0_ns: int, count: int | None) -> Iterator[tuple[int, int]]:
        """(n, late_ns) for n = 0, 1, ..., each at t0_ns + n * period_ns (``period_ns`` 0: flat
        out, late_ns 0), until ``count`` (None: no end) or stop()."""
        n = 0
        while not self.stopping.is_set() and (count is None or n < count):
            late_ns = self.wait_until(t0_ns + n * period_ns) if period_ns else 0
            if late_ns is None:
                return
            yield n, late_ns
            n += 1


class SimSource:
    """Frames of a simulated scanner session, paced at ``fps`` (flat out when ``fps <= 0``).

    Pacing waits on an Event with a deadline per frame (no sleep polling, no drift accumulation).
    ``acquired_ns`` is stamped when the frame is handed over, as a receiving source would.
    """

    knows_truth = True

    def __init__(self, scanner, slot: LatestSlot[Frame] | None = None, *, fps: float = 30.0,
                 max_frames: int | None = None, start_index: int = 0) -> None:
        self.scanner = scanner
        self.slot = slot if slot is not None else LatestSlot()
        self.fps = fps
        self.max_frames = max_frames
        self.start_index = start_index
        self.frames = 0
        self._thread = SourceThread(self._run, "sim-source")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._thread.stop(timeout)
        self.slot.close()

    @property
    def finished(self) -> bool:
        return self._thread.finished

    def stats(self) -> dict:
        return {"kind": "sim", "frames": self.frames}

    def _run(self) -> None:
        t0 = now_ns()
        period_ns = int(1e9 / self.fps) if self.fps > 0 else 0
        for n, _ in self._thread.paced(period_ns, t0, self.max_frames):
            frame = self.scanner.frame(self.start_index + n)
            self.slot.put(replace(frame, acquired_ns=now_ns()))
            self.frames += 1
        self.slot.close()
