"""One niced worker thread that runs the latest job handed to it: the engine of the stages that
run one frame late, off the frame's path (``--lc2 async``, :mod:`regseg.stream.lc2_lag`;
``--deformable async``, :mod:`regseg.stream.deformable_lag`).

A job handed over while the worker is busy waits; a newer one replaces it (the latest frame wins:
a frame not yet started is dropped, so the worker never falls behind the stream). The thread runs
with the stream's torch threads and at nice :data:`WORKER_NICE` (Linux; only ever raised): where
the cores are busy the frame's own stages go first, and the worker takes what is left.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import numpy as np

from regseg.clock import now_ns

log = logging.getLogger(__name__)

#: ``REGSEG_LC2_IN_ORDER=1``: the ``async`` stages run as ``lag`` (the same arithmetic in order),
#: for results that do not depend on timing (the test suite sets it; the tests of the threads lift
#: it)
IN_ORDER_ENV = "REGSEG_LC2_IN_ORDER"
#: The workers' nice value (Linux): when the cores are busy the frame's own stages go first
NICE_ENV, NICE_DEFAULT = "REGSEG_LC2_NICE", 10


def worker_nice() -> int:
    """``REGSEG_LC2_NICE`` (0-19), else :data:`NICE_DEFAULT`; a value that is not one is named in
    a warning and the default used (the stream does not stop for a tuning variable)."""
    raw = os.environ.get(NICE_ENV)
    if raw is None:
        return NICE_DEFAULT
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if 0 <= value <= 19:
        return value
    log.warning("%s=%r: expected a whole number 0-19 (a nice value); using %d", NICE_ENV, raw,
                NICE_DEFAULT)
    return NICE_DEFAULT


WORKER_NICE = worker_nice()
#: ``async``: an outcome whose frame was handed over longer ago than this is not carried to a frame,
#: which runs in order instead: a stalled worker never leaves the display on a stale correction
#: (at 30 fps the worker's outcomes are 1-3 frame periods old; ``lag`` runs in order, no age)
MAX_AGE_MS = 500.0


#: An outcome is carried to a frame only if the frame's plane is within this of the plane it was
#: found on (the largest displacement of a frame corner, mm; the temporal filter resets on a
#: tracked plane that moves > 5 mm between frames too): after a jump of the probe, a gap or a new
#: registration the frame is refined in order instead
VIEW_CHANGE_MM = 5.0


def view_change_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> float:
    """How far plane ``b`` is from plane ``a`` over a frame of ``shape``: the largest distance
    (mm) between where the two put a corner of the frame."""
    h, w = shape
    corners = np.array([[0, 0, 0, 1], [w - 1, 0, 0, 1], [0, h - 1, 0, 1], [w - 1, h - 1, 0, 1]],
                       np.float64).T
    return float(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0).max())


def asynchronous_allowed() -> bool:
    """Whether ``async`` runs its worker thread (not with ``REGSEG_LC2_IN_ORDER=1``)."""
    return os.environ.get(IN_ORDER_ENV, "0") != "1"


class LatestWorker:
    """Runs ``run(*job)`` for the latest job :meth:`submit`-ted, on a thread named ``name`` (made
    on first use; :meth:`close` ends it and a later submit starts a new one). ``run`` must not
    raise: it keeps its own outcome, error included, for the frame that reads it."""

    def __init__(self, run: Callable[..., None], name: str) -> None:
        self._run, self.name = run, name
        self._cond = threading.Condition()
        self._todo: tuple | None = None
        self.thread: threading.Thread | None = None
        self._closing, self._running = False, False
        self._threads: int | None = None

    def submit(self, job: tuple) -> None:
        import torch

        with self._cond:
            self._todo = job  # the latest frame wins: a frame not yet started is dropped
            if self.thread is None:
                self._closing = False
                self._threads = torch.get_num_threads()
                self.thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self.thread.start()
            self._cond.notify_all()

    def _loop(self) -> None:
        import torch

        if self._threads:
            torch.set_num_threads(self._threads)  # the stream's, not torch's per-thread default
        if WORKER_NICE and hasattr(os, "setpriority"):
            try:  # Linux: a thread's own nice value (only ever raised); the frame's path first
                tid = threading.get_native_id()
                if os.getpriority(os.PRIO_PROCESS, tid) < WORKER_NICE:
                    os.setpriority(os.PRIO_PROCESS, tid, WORKER_NICE)
            except OSError:
                pass
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._todo is not None or self._closing)
                if self._closing:
                    return
                job, self._todo, self._running = self._todo, None, True
            try:
                self._run(*job)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def wait(self, timeout: float = 10.0) -> None:
        """Until every job handed over is finished (tests; in order: at once)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._todo is None and not self._running, timeout):
                raise TimeoutError(f"{self.name}: the worker did not finish within {timeout} s")

    def close(self) -> None:
        """End the thread (a job not yet started is dropped; the one running finishes)."""
        with self._cond:
            thread, self.thread = self.thread, None
            self._closing, self._todo = True, None
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout=5.0)


class Lagged:
    """What a stage run one frame late keeps between frames (``--lc2 async``'s
    :class:`~regseg.stream.lc2_lag.Lc2Lagged`, ``--deformable async``'s
    :class:`~regseg.stream.deformable_lag.DeformableLagged`): the latest outcome, or the error that
    replaced it, handed from the worker to the next frame under a lock; the worker thread, which
    runs the subclass's ``_run`` (made on first use).

    An outcome carries ``shape`` and ``plane`` (the frame's size and the plane it was found on)
    and ``handed_ns`` (when its frame was handed over): an older frame's never replaces a newer
    one's (a worker finishing late after a frame that ran in order)."""

    asynchronous = False  # the subclass sets it: a worker thread, else in the call

    def __init__(self, name: str) -> None:
        self._kept = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._worker = LatestWorker(self._run, name)
        self._timings: dict[str, float] = {}

    def _run(self, *job) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def _next(self, job: tuple, shape: tuple[int, int], plane: np.ndarray):
        """The outcome a frame of ``shape`` on ``plane`` applies. The latest, if found on a frame
        of that shape whose plane is within :data:`VIEW_CHANGE_MM` of ``plane`` and
        (``asynchronous``) at most :data:`MAX_AGE_MS` old, once ``job`` (the frame's own run) is
        handed to the worker or run (``lag``); else ``job`` run in order and its own."""
        kept = self._take()
        if (kept is None or tuple(kept.shape) != tuple(shape)
                or view_change_mm(kept.plane, plane, shape) > VIEW_CHANGE_MM
                or (self.asynchronous and now_ns() - kept.handed_ns > MAX_AGE_MS * 1e6)):
            self._run(*job)
            return self._take()
        if self.asynchronous:
            self._worker.submit(job)
        else:
            self._run(*job)
        return kept

    def _take(self):
        """The latest outcome; raises what the last run raised (once)."""
        with self._lock:
            kept, error, self._error = self._kept, self._error, None
        if error is not None:
            raise error
        return kept

    def _last(self):
        """The latest outcome, without taking an error."""
        with self._lock:
            return self._kept

    def _keep(self, kept) -> None:
        with self._lock:
            if self._kept is None or self._kept.handed_ns <= kept.handed_ns:
                self._kept = kept

    def _fail(self, exc: BaseException) -> None:
        """A run raised: the next frame raises it; the one after runs in order."""
        with self._lock:
            self._kept, self._error = None, exc

    def timings(self) -> dict[str, float]:
        """The last call's extra per-frame timings (the subclass names them)."""
        return dict(self._timings)

    def wait(self, timeout: float = 10.0) -> None:
        """Until the worker has finished every frame handed to it (tests; ``lag``: at once)."""
        self._worker.wait(timeout)

    def close(self) -> None:
        """End the worker (a later call starts a new one); the last outcome is kept."""
        self._worker.close()
