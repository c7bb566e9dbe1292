"""The stream loop: newest frame from the source, through the pipeline, out to every sink."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from regseg import metrics, spatial
from regseg.clock import now_ns
from regseg.stream.gate import FrameGate
from regseg.stream.igtl.wire import RateLimitedLog
from regseg.stream.pipeline import RING_POLL_S, Pipeline
from regseg.stream.source import Source
from regseg.stream.stats import StreamStats
from regseg.types import LESION, PROSTATE, Frame, Result

log = logging.getLogger(__name__)

TRE_POINTS = 2000  # prostate pixels sampled per frame for TRE: plenty for a mean in mm
#: While frames are in flight (GPU ring), how long to wait for a new frame before checking for
#: finished ones: the most a finished Result waits. 0.25 ms against a frame period of >= 2 ms.
#: (A Pipeline says its own, ``poll_interval_s``; this is for pipelines that do not.)
POLL_S = RING_POLL_S


class Sink(Protocol):
    """Takes Results without blocking the pipeline (each sink drops its own backlog)."""

    def submit(self, result: Result) -> None: ...

    def close(self) -> None: ...


def frame_accuracy(pipeline: Pipeline, result: Result) -> tuple[dict[str, float], dict[str, float]]:
    """Dice per label and TRE (tracked vs registered) for a frame whose ground truth is known."""
    truth = result.frame.truth
    dice = {
        "prostate": metrics.dice(result.labels, truth.labels, PROSTATE),
        "lesion": metrics.dice(result.labels, truth.labels, LESION),
        # the MRI labels through the registration: what the registration alone achieves
        "registered_prostate": metrics.dice(result.warped_labels, truth.labels, PROSTATE),
    }
    ji = np.argwhere(truth.labels > 0)
    if len(ji) == 0:
        return dice, {}
    ji = ji[np.linspace(0, len(ji) - 1, min(TRE_POINTS, len(ji))).astype(int)]
    points = ji[:, ::-1].astype(np.float64)  # (i, j) = (column, row)
    tre = {
        "tracked": metrics.tre_mm(pipeline.plane(result.frame), truth.image_to_mri, points),
        "registered": metrics.tre_mm(spatial.invert(result.mri_to_image), truth.image_to_mri,
                                     points),
    }
    if truth.displacement_px is not None:  # against the moved tissue; the published map's field
        ij = ji[:, ::-1]
        tre["tracked_tissue"] = metrics.tissue_tre_mm(
            pipeline.plane(result.frame), truth.image_to_mri, truth.displacement_px, ij)
        tre["registered_tissue"] = metrics.tissue_tre_mm(
            spatial.invert(result.mri_to_image), truth.image_to_mri, truth.displacement_px, ij,
            result.ddf)
    return dice, tre


def run_stream(
    source: Source,
    pipeline: Pipeline,
    sinks: Sequence[Sink] = (),
    *,
    max_frames: int | None = None,
    status_every_s: float = 1.0,
    stop: threading.Event | None = None,
    on_result: Callable[[Result], None] | None = None,
    status_stream=sys.stderr,
    gate: Callable[[Frame], Frame | None] | None = None,
    status_extra: Callable[[], str] | None = None,
    stats: StreamStats | None = None,
) -> tuple[StreamStats, int]:
    """Run until ``max_frames`` results, the source finishing, or ``stop`` being set.

    Frames go through ``pipeline.submit``; on a GPU several may be in flight, so frame N+1
    uploads while N computes. Overlap must not cost latency (a ring only hands a frame back when
    its slot is needed again): while frames are in flight the loop waits for the next frame in
    steps of :data:`POLL_S` and collects finished ones between steps (``poll``), so a Result is
    published at most ``POLL_S`` after its download ends, whether or not another frame comes.
    On the CPU ``submit`` returns the frame's own Result and nothing is ever in flight.

    Every frame passes ``gate`` first (default: a :class:`~regseg.stream.gate.FrameGate` with the
    default limits): it returns the frame to process or None to drop it. A frame on which the
    pipeline (or the accuracy check) still raises costs that frame only: it is counted in
    ``stats.failed``, logged (at most once every 5 s) and the loop goes on. A sink that raises is
    counted the same way (``stats.sink_errors``); the other sinks still get the result.

    ``stats``: collect into this StreamStats (read live from other threads, e.g. regseg-serve's
    control endpoint); default a new one.

    Returns the collected stats and the number of frames the hand-off skipped.
    """
    gate = gate if gate is not None else FrameGate()
    stats = stats if stats is not None else StreamStats()
    errors = RateLimitedLog(log)

    def failed(where: str, exc: Exception) -> None:
        stats.failed += 1
        errors.warning(where, f"frame lost: {where} raised {type(exc).__name__}: {exc} "
                       f"({stats.failed} frames lost so far); the stream goes on")

    def guarded(step: Callable[[], list[Result]], where: str) -> list[Result]:
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - one bad frame must not end the session
            failed(where, exc)
            return []
    stop = stop or threading.Event()
    tty = hasattr(status_stream, "isatty") and status_stream.isatty()
    next_status = now_ns() + int(status_every_s * 1e9)

    def publish(results: Sequence[Result]) -> None:
        nonlocal next_status
        for result in results:
            for sink in sinks:
                try:
                    sink.submit(result)
                except Exception as exc:  # noqa: BLE001 - the other sinks still get it
                    stats.sink_errors += 1
                    errors.warning(f"sink {type(sink).__name__}",
                                   f"{type(sink).__name__}.submit raised "
                                   f"{type(exc).__name__}: {exc}; result not sent there")
            done = now_ns()
            stats.add(result.timings_ms, (done - result.frame.acquired_ns) / 1e6, done,
                      flagged=result.flagged)
            stats.add_trust(result.error_mm, result.flags,
                            getattr(result, "correction", "registered"),
                            getattr(result, "labels_source", "network"),
                            getattr(result, "sweep_pending", None))
            if result.frame.truth is not None:
                try:
                    stats.add_accuracy(*frame_accuracy(pipeline, result))
                except Exception as exc:  # noqa: BLE001
                    errors.warning("accuracy", f"accuracy of frame {result.frame.seq} not "
                                   f"measured: {type(exc).__name__}: {exc}")
            if on_result is not None:
                on_result(result)
            if status_every_s > 0 and done >= next_status:
                line = stats.status_line(source.slot.skipped)
                if status_extra is not None:  # e.g. registration changes from the network
                    line += status_extra()
                status_stream.write(("\r" + line) if tty else (line + "\n"))
                status_stream.flush()
                next_status = done + int(status_every_s * 1e9)

    def wanted() -> bool:
        in_flight = pipeline.in_flight
        return max_frames is None or stats.frames + in_flight < max_frames

    # GPU ring: POLL_S; CPU overlap (a worker thread): its own, coarser step (Pipeline)
    poll_s = getattr(pipeline, "poll_interval_s", POLL_S)
    source.start()
    try:
        while not stop.is_set() and wanted():
            busy = pipeline.in_flight > 0
            if busy and not getattr(pipeline, "accepting", True):
                # CPU overlap: a frame taken now would wait for the worker and age; take the
                # newest once it can start (the source keeps replacing it meanwhile)
                time.sleep(poll_s)
                publish(guarded(pipeline.poll, "pipeline.poll"))
                continue
            frame = source.slot.get(timeout=poll_s if busy else 0.25)
            if frame is None:
                if busy:
                    publish(guarded(pipeline.poll, "pipeline.poll"))
                if source.slot.closed or source.finished:
                    break
                continue
            frame = gate(frame)
            if frame is not None:
                publish(guarded(lambda f=frame: pipeline.submit(f), "pipeline"))
            publish(guarded(pipeline.poll, "pipeline.poll"))
        publish(guarded(pipeline.flush, "pipeline.flush"))
        for _ in range(pipeline.in_flight):  # a failed frame ends a flush early (CPU overlap)
            publish(guarded(pipeline.flush, "pipeline.flush"))
    finally:
        if hasattr(pipeline, "close"):  # the CPU overlap's worker thread, if any
            pipeline.close()
        source.stop()
        for sink in sinks:
            sink.close()
        if tty and status_every_s > 0:
            status_stream.write("\n")
    return stats, source.slot.skipped
