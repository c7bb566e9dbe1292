"""A frame's second half on a worker thread, so that two CPU cores work on two frames at once.

On the CPU the live chain runs in order on one thread, and the default chain's two halves cost
about the same: the affine half (reslice, AlignSegNet calls, segmentation, temporal filter) and
the host half (deformable stage, quality, overlay). :class:`HostWorker` runs the host halves on
one thread, in submission order, while the caller starts the next frame's affine half. Their
heavy parts (ONNX Runtime, torch, OpenCV) release the GIL, so on two cores they overlap.

Order and state: the affine half keeps the only state carried from frame to frame (the capture's
temporal filter), so it stays on the caller's thread in frame order; the host halves run one at a
time, in order, on the worker. At most ``depth`` halves wait for the worker: :meth:`submit` blocks
beyond that, so a slow host half delays the next frame (the source keeps the newest) rather than
growing a queue, and latency stays bounded.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

#: ``regseg-stream --overlap``'s default (bench/results/cpu_overlap_predeclared.md decides it).
OVERLAP_DEFAULT = "off"

#: Host halves that may wait for the worker (the one running not counted): one keeps both cores
#: busy; more would only add latency.
DEPTH = 1


class HostWorker:
    """Runs jobs (zero-argument callables) on one thread, in order; their results come back in
    order from :meth:`done` / :meth:`wait`. A job that raises costs its own result only: the
    exception comes out of :meth:`done` in that job's place."""

    def __init__(self, depth: int = DEPTH, name: str = "regseg-host-half") -> None:
        if depth < 1:
            raise ValueError(f"depth={depth}: at least 1 expected")
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._finished: collections.deque[tuple[Any, BaseException | None]] = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0  # submitted, not yet taken out by done()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Jobs submitted whose results (or errors) have not been taken out yet."""
        with self._cond:
            return self._pending

    @property
    def accepting(self) -> bool:
        """No job waits for the thread (the one running, if any, does not count): a job
        submitted now starts as soon as the running one ends."""
        return self._jobs.empty()

    def submit(self, job: Callable[[], Any]) -> None:
        """Queue ``job``; blocks while ``depth`` jobs already wait."""
        if not self._thread.is_alive():
            raise RuntimeError("HostWorker is closed")
        with self._cond:
            self._pending += 1
        self._jobs.put(job)

    def done(self) -> list[Any]:
        """Finished results, oldest first, without waiting. If the oldest finished job raised,
        its exception is raised instead (and that job is taken out); results behind it stay for
        the next call."""
        with self._cond:
            out: list[Any] = []
            while self._finished:
                result, error = self._finished[0]
                if error is not None:
                    if out:  # the results before it first
                        break
                    self._finished.popleft()
                    self._pending -= 1
                    raise error
                self._finished.popleft()
                self._pending -= 1
                out.append(result)
            return out

    def wait(self, timeout: float | None = None) -> list[Any]:
        """Wait until every submitted job has finished (or ``timeout`` s), then :meth:`done`."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._finished) >= self._pending, timeout)
        return self.done()

    def close(self, timeout: float = 5.0) -> None:
        """Let the queued jobs finish, then stop the thread (results not taken out are dropped)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                item = (job(), None)
            except Exception as exc:  # noqa: BLE001 - costs this frame only; raised in done()
                item = (None, exc)
            with self._cond:
                self._finished.append(item)
                self._cond.notify_all()
