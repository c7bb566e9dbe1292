"""The Source protocol, and the simulated-scanner source for ``--demo`` and ``sim://``."""

from __future__ import annotations

import threading
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-source", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.slot.close()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def stats(self) -> dict:
        return {"kind": "sim", "frames": self.frames}

    def _run(self) -> None:
        t0 = now_ns()
        period_ns = int(1e9 / self.fps) if self.fps > 0 else 0
        n = 0
        while not self._stop.is_set() and (self.max_frames is None or n < self.max_frames):
            if period_ns:
                wait_ns = t0 + n * period_ns - now_ns()
                if wait_ns > 0 and self._stop.wait(wait_ns / 1e9):
                    break
            frame = self.scanner.frame(self.start_index + n)
            self.slot.put(replace(frame, acquired_ns=now_ns()))
            self.frames += 1
            n += 1
        self.slot.close()

