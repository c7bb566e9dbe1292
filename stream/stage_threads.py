"""A frame's two independent stages on two threads (``regseg-stream --stage-threads 2``; CPU).

Once a frame's plane is published (after ``--lc2`` and the temporal filter), two stages read it
and nothing else of each other: the segmentation at that plane (``--resegment``) and the
deformable stage. With ``--stage-threads 2`` the deformable stage starts on a worker thread as
the plane is known and the segmentation runs on the frame's own thread beside it; the frame then
waits for the worker. Both are ONNX Runtime and torch calls that release the GIL, so on two cores
they overlap. Unlike ``--overlap`` (two frames at once, which buys frames per second and costs
latency) this shortens one frame: what it buys is latency.

The outputs are the same, bit for bit, as in order (the same calls on the same inputs;
``tests/stream/test_stage_threads.py``). The stage's own time stays in ``deformable``; what the
frame waited for it after the segmentation is ``deformable_wait``.

Not ahead (the stage runs in order, as before): with ``--deformable async`` (its network has its
own worker; what is left on the frame's path is one label lookup), without ``--resegment`` or the
deformable stage, with ``--do-no-harm`` (its gate may publish the tracked plane instead, and the
stage runs on what is published), with ``--overlap`` (its worker already holds the second core)
and on CUDA (the device ring overlaps already).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from regseg.clock import now_ns

STAGE_THREADS_CHOICES = (1, 2)
#: ``--stage-threads``' default (bench/results/cpu_overlap_predeclared.md, addendum 1, decides it)
STAGE_THREADS_DEFAULT = 1


class StageThreads:
    """One worker thread that runs a stage ahead of the frame's own thread (made on first use,
    ended by :meth:`close`; a later :meth:`ahead` starts a new one)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def ahead(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Start ``fn(*args)`` on the worker; the Future's result is (``fn``'s result, its ms)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="regseg-stage")
            return self._pool.submit(_timed, fn, *args)

    def close(self) -> None:
        """End the worker (waits for a stage it is running)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = now_ns()
    out = fn(*args)
    return out, (now_ns() - start) / 1e6


def deform_ahead(pipeline: Any, pixels: Any, image_to_mri: Any) -> Future | None:
    """The pipeline's deformable stage for ``image_to_mri`` started on its stage thread, or None
    where it runs in order (see the module docstring)."""
    if (pipeline.stage_threads is None or pipeline.deformable is None or not pipeline.resegment
            or pipeline.do_no_harm is not None or pipeline.overlap
            or pipeline.device.type == "cuda"
            or hasattr(pipeline.deformable, "asynchronous")):  # --deformable async: on its own
        return None
    return pipeline.stage_threads.ahead(pipeline.deformable, pixels, image_to_mri)


def deformed(ahead: Future, timings: dict[str, float]) -> tuple[Any, dict[str, float]]:
    """The stage's result from ``ahead``, with ``deformable`` (its own ms) and
    ``deformable_wait`` (what the frame waited for it) added to ``timings``."""
    start = now_ns()
    out, own_ms = ahead.result()
    return out, {**timings, "deformable": own_ms,
                 "deformable_wait": (now_ns() - start) / 1e6}


def deform_now(pipeline: Any, pixels: Any, image_to_mri: Any, timings: dict[str, float]
               ) -> tuple[Any, dict[str, float]]:
    """The pipeline's deformable stage run in order, with ``deformable`` (its ms on the frame's
    path) and the stage's own :meth:`timings` (``--deformable async``'s) added to ``timings``."""
    start = now_ns()
    out = pipeline.deformable(pixels, image_to_mri)
    own = getattr(pipeline.deformable, "timings", None)
    return out, {**timings, "deformable": (now_ns() - start) / 1e6,
                 **(own() if callable(own) else {})}


def build_stage_threads(threads: int = STAGE_THREADS_DEFAULT) -> StageThreads | None:
    """``--stage-threads``' worker: None for 1 (in order)."""
    if threads not in STAGE_THREADS_CHOICES:
        raise ValueError(f"stage_threads {threads!r}: expected one of {STAGE_THREADS_CHOICES}")
    return StageThreads() if threads == 2 else None
