"""A bad frame costs that frame, never the process: the gate in front of the pipeline, and the
runner going on when a frame still fails inside it."""

from __future__ import annotations

import io
import logging
from dataclasses import replace

import numpy as np
import pytest

from regseg import spatial
from regseg.clock import now_ns
from regseg.geometry import FrameLimits
from regseg.stream.gate import FrameGate
from regseg.stream.runner import run_stream
from regseg.stream.slot import LatestSlot
from regseg.types import Frame, Result


class FeedingSlot(LatestSlot):
    """A slot that takes the next frame from a list whenever it is asked for one and holds none:
    every frame reaches the runner, none is skipped, and the list's end closes the slot."""

    def __init__(self, frames) -> None:
        super().__init__()
        self.frames = list(frames)

    def get(self, timeout=None):
        if not self.ready and not self.closed:
            if self.frames:
                self.put(self.frames.pop(0))
            else:
                self.close()
        return super().get(timeout)


class ListSource:
    knows_truth = False
    finished = False

    def __init__(self, frames) -> None:
        self.slot = FeedingSlot(frames)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.slot.close()

    def stats(self) -> dict:
        return {}


class InvertingPipeline:
    """Stands in for Pipeline (whose internals other work is changing): like its ``_finish`` it
    inverts the tracked plane, which raised LinAlgError and ended the process on a singular pose.
    An untracked frame gets a fixed plane, as ``untracked_plane`` gives."""

    in_flight = 0

    def plane(self, frame):
        if frame.image_to_reference is None:
            return np.diag([0.3, 0.3, 0.3, 1.0])
        return np.eye(4) @ frame.image_to_reference

    def submit(self, frame):
        mri_to_image = spatial.invert(self.plane(frame))
        labels = np.zeros(frame.pixels.shape, np.uint8)
        return [Result(frame=frame, mri_to_image=mri_to_image, warped_labels=labels,
                       labels=labels, overlay=np.zeros((*labels.shape, 3), np.uint8),
                       quality=1.0, flagged=False, timings_ms={"model": 1.0})]

    def poll(self):
        return []

    def flush(self):
        return []


@pytest.fixture(scope="module")
def frames():
    return [Frame(seq=n, acquired_ns=now_ns(), pixels=np.full((48, 64), n, np.uint8),
                  spacing_mm=(0.3, 0.3), image_to_reference=np.diag([0.3, 0.3, 0.3, 1.0]))
            for n in range(6)]


def _run(pipeline, frames, gate=None):
    seen = []
    stats, skipped = run_stream(ListSource(frames), pipeline, status_every_s=0,
                                status_stream=io.StringIO(), on_result=seen.append, gate=gate)
    return stats, skipped, seen


def _bad_poses(pose: np.ndarray) -> list[np.ndarray]:
    zero_column = pose.copy()
    zero_column[:3, 0] = 0
    parallel = pose.copy()
    parallel[:3, 1] = pose[:3, 0]
    zero_normal = pose.copy()
    zero_normal[:3, 2] = 0
    nan = pose.copy()
    nan[0, 3] = np.nan
    return [zero_column, parallel, zero_normal, nan]


def test_degenerate_poses_do_not_crash_and_cost_no_good_frame(frames, caplog):
    """Before the gate, LinAlgError from spatial.invert ended the process on these poses."""
    bad = [replace(frames[1], seq=100 + n, image_to_reference=m)
           for n, m in enumerate(_bad_poses(frames[1].image_to_reference))]
    huge = replace(frames[2], seq=200, pixels=np.zeros((64, 65), np.uint8))
    with pytest.raises(np.linalg.LinAlgError):  # what the pipeline does with one, ungated
        InvertingPipeline().submit(bad[0])
    stream = [frames[0], *bad, frames[3], huge, frames[4]]
    gate = FrameGate(FrameLimits(max_pixels=64 * 64))
    with caplog.at_level(logging.WARNING):
        stats, skipped, seen = _run(InvertingPipeline(), stream, gate)
    assert skipped == 0
    # the bad-pose frames go on untracked; the oversized one is dropped; the good ones all pass
    assert [r.frame.seq for r in seen] == [0, 100, 101, 102, 103, 3, 4]
    assert all(r.frame.image_to_reference is None for r in seen[1:5])
    assert seen[0].frame.image_to_reference is not None
    assert stats.failed == 0 and stats.frames == 7
    assert gate.stats()["poses_refused"] == 4
    assert gate.stats()["refused_frames"]["too_large"] == 1
    assert gate.stats()["passed"] == 3
    assert "ImageToReference" in caplog.text and "65x64" in caplog.text


class Raising:
    """A pipeline that fails on chosen frames, as a bug or an unforeseen input inside would."""

    def __init__(self, pipeline, bad_seqs) -> None:
        self.pipeline, self.bad = pipeline, set(bad_seqs)
        self.in_flight = 0

    def submit(self, frame):
        if frame.seq in self.bad:
            raise np.linalg.LinAlgError("Singular matrix")
        return self.pipeline.submit(frame)

    def plane(self, frame):
        return self.pipeline.plane(frame)

    def poll(self):
        return []

    def flush(self):
        return []


def test_a_frame_failing_inside_the_pipeline_costs_exactly_that_frame(frames, caplog):
    with caplog.at_level(logging.WARNING):
        stats, skipped, seen = _run(Raising(InvertingPipeline(), {2, 4}), frames)
    assert skipped == 0
    assert [r.frame.seq for r in seen] == [0, 1, 3, 5]
    assert stats.failed == 2 and stats.summary()["failed_frames"] == 2
    assert "LinAlgError: Singular matrix" in caplog.text
    assert caplog.text.count("frame lost") == 1  # rate-limited: the second is held back


def test_a_raising_sink_costs_neither_the_frame_nor_the_other_sinks(frames):

    class Broken:
        def submit(self, result):
            raise OSError("disk full")

        def close(self):
            pass

    class Keeping:
        def __init__(self):
            self.got = []

        def submit(self, result):
            self.got.append(result.frame.seq)

        def close(self):
            pass

    keeping = Keeping()
    stats, _ = run_stream(ListSource(frames[:3]), InvertingPipeline(), [Broken(), keeping],
                          status_every_s=0, status_stream=io.StringIO())
    assert keeping.got == [0, 1, 2] and stats.frames == 3 and stats.sink_errors == 3


def test_igtl_images_with_degenerate_matrices_pass_the_gate_from_a_real_socket(pyigtl_server):
    """IMAGE messages over OpenIGTLink whose matrix is singular or degenerate (parallel i/j axes,
    zero normal) and one larger than the frame limit: the stream survives, each is counted."""
    import threading
    import time

    import pyigtl

    from regseg.stream.igtl.source import IgtlSource

    good = np.diag([0.3, 0.3, 0.3, 1.0])
    parallel = good.copy()
    parallel[:3, 1] = good[:3, 0]
    zero_normal = good.copy()
    zero_normal[:3, 2] = 0
    sends = [(good, 48), (parallel, 48), (good, 48), (zero_normal, 48), (good, 80), (good, 48)]
    gate = FrameGate(FrameLimits(max_pixels=64 * 64))
    source = IgtlSource("127.0.0.1", pyigtl_server.port, transform_device=None)
    seen: list = []
    stop = threading.Event()
    runner = threading.Thread(target=lambda: seen.append(run_stream(
        source, InvertingPipeline(), status_every_s=0, status_stream=io.StringIO(), stop=stop,
        gate=gate)))
    runner.start()
    try:
        assert source.connected.wait(10)
        for n, (matrix, size) in enumerate(sends):
            pixels = np.full((1, size, size), n, np.uint8)
            pyigtl_server.send_message(pyigtl.ImageMessage(pixels, matrix, "ras", 1.7e9 + n,
                                                           "Image_Reference"), wait=False)
            time.sleep(0.3)  # one at a time: the newest-wins slot skips none
        time.sleep(0.5)
    finally:
        stop.set()
        runner.join(timeout=20)
    stats, skipped = seen[0]
    assert skipped == 0 and stats.failed == 0
    assert stats.frames == 5  # 3 good + 2 with a refused pose (processed untracked)
    assert gate.stats()["poses_refused"] == 2
    assert gate.stats()["refused_frames"]["too_large"] == 1
