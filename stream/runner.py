"""The stream loop: newest frame from the source, through the pipeline, out to every sink."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from regseg import metrics, spatial
from regseg.clock import now_ns
from regseg.stream.pipeline import Pipeline
from regseg.stream.source import Source
from regseg.stream.stats import StreamStats
from regseg.types import LESION, PROSTATE, Result

TRE_POINTS = 2000  # prostate pixels sampled per frame for TRE: plenty for a mean in mm


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
) -> tuple[StreamStats, int]:
    """Run until ``max_frames`` results, the source finishing, or ``stop`` being set.

    Returns the collected stats and the number of frames the hand-off skipped.
    """
    stats = StreamStats()
    stop = stop or threading.Event()
    tty = hasattr(status_stream, "isatty") and status_stream.isatty()
    next_status = now_ns() + int(status_every_s * 1e9)
    source.start()
    try:
        while not stop.is_set() and (max_frames is None or stats.frames < max_frames):
            frame = source.slot.get(timeout=0.25)
            if frame is None:
                if source.slot.closed or source.finished:
                    break
                continue
            result = pipeline(frame)
            for sink in sinks:
                sink.submit(result)
            done = now_ns()
            stats.add(result.timings_ms, (done - frame.acquired_ns) / 1e6, done,
                      flagged=result.flagged)
            if frame.truth is not None:
                stats.add_accuracy(*frame_accuracy(pipeline, result))
            if on_result is not None:
                on_result(result)
            if status_every_s > 0 and done >= next_status:
                line = stats.status_line(source.slot.skipped)
                status_stream.write(("\r" + line) if tty else (line + "\n"))
                status_stream.flush()
                next_status = done + int(status_every_s * 1e9)
    finally:
        source.stop()
        for sink in sinks:
            sink.close()
        if tty and status_every_s > 0:
            status_stream.write("\n")
    return stats, source.slot.skipped
