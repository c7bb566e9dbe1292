"""CPU overlap (--overlap): the worker keeps order and isolates failures, and an overlapped
Pipeline gives the same Results as the sequential one, through run_stream too."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from regseg.engines.fusion import FusionEngine
from regseg.models.registry import build_model
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.build import build_default_capture, build_deformable, build_pipeline
from regseg.stream.context import build_context
from regseg.stream.overlap import HostWorker
from regseg.stream.runner import run_stream
from regseg.stream.slot import LatestSlot

# --------------------------------------------------------------------------- the worker


def test_worker_keeps_order_and_a_failing_job_costs_only_itself():
    worker = HostWorker()
    try:
        def job(i):
            def run():
                time.sleep(0.002 * (i % 3))  # uneven work: order must still hold
                if i == 3:
                    raise ValueError("frame 3 is bad")
                return i
            return run
        for i in range(6):
            worker.submit(job(i))
        got = worker.wait(timeout=10)
        assert got == [0, 1, 2]  # the results before the failure first
        assert worker.in_flight == 3
        with pytest.raises(ValueError, match="frame 3"):
            worker.wait(timeout=10)
        assert worker.wait(timeout=10) == [4, 5]
        assert worker.in_flight == 0
    finally:
        worker.close()


def test_worker_accepting_and_bounded_queue():
    worker = HostWorker(depth=1)
    release = threading.Event()
    try:
        worker.submit(lambda: release.wait(10) and "first")
        deadline = time.monotonic() + 5
        while not worker.accepting and time.monotonic() < deadline:  # the thread took it
            time.sleep(0.001)
        assert worker.accepting
        worker.submit(lambda: "second")  # waits for the thread: not accepting any more
        assert not worker.accepting
        blocked = threading.Thread(target=worker.submit, args=(lambda: "third",))
        blocked.start()
        blocked.join(0.05)
        assert blocked.is_alive()  # a third would wait in the queue: submit blocks
        release.set()
        blocked.join(5)
        assert worker.wait(timeout=10) == ["first", "second", "third"]
    finally:
        release.set()
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(lambda: None)
    with pytest.raises(ValueError, match="depth"):
        HostWorker(depth=0)


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(0, spacing_mm=1.4)  # coarse: a fast case with the same geometry
    scanner = SimulatedScanner(phantom, seed=0)
    frames = [scanner.frame(i) for i in range(0, 12, 2)]
    context = build_context(phantom.mri, phantom.labels)
    torch.manual_seed(0)
    engine = FusionEngine(model=build_model("alignsegnet").eval())  # random: same either way
    return context, engine, frames


def _pipeline(case, overlap, deformable="on"):
    context, engine, _ = case
    # the CLI's default chain: refinement, temporal filter (state across frames), deformable
    # (lag: --deformable async's arithmetic in order, the stage's state carried across frames)
    return build_pipeline(context, engine,
                          deformable=build_deformable(context, backend="eager", mode=deformable),
                          capture=build_default_capture(backend="eager"), overlap=overlap)


def _same(a, b):
    assert a.frame.seq == b.frame.seq
    np.testing.assert_allclose(a.mri_to_image, b.mri_to_image, atol=1e-9)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.warped_labels, b.warped_labels)
    assert np.array_equal(a.overlay, b.overlay)
    np.testing.assert_allclose(a.ddf, b.ddf, atol=1e-6)
    assert a.flags == b.flags and a.jump_mm == pytest.approx(b.jump_mm, nan_ok=True)


@pytest.mark.parametrize("deformable", ["on", "lag"])
def test_overlapped_pipeline_equals_sequential(case, deformable):
    _, _, frames = case
    sequential = _pipeline(case, overlap=False, deformable=deformable)
    expected = [sequential.submit(f)[0] for f in frames]
    overlapped = _pipeline(case, overlap=True, deformable=deformable)
    got = []
    try:
        for f in frames:
            got += overlapped.submit(f)
            assert overlapped.in_flight <= 2  # one in the worker, at most one waiting
        while overlapped.in_flight:
            got += overlapped.flush()
    finally:
        overlapped.close()
    assert [r.frame.seq for r in got] == [f.seq for f in frames]
    for a, b in zip(got, expected, strict=True):
        _same(a, b)
    assert all("handoff" in r.timings_ms for r in got)
    assert all("handoff" not in r.timings_ms for r in expected)


class _ListSource:
    """Hands the frames to run_stream one at a time, each once the previous one was taken."""

    def __init__(self, frames):
        self.slot: LatestSlot = LatestSlot()
        self.frames = list(frames)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        for f in self.frames:
            self.slot.put(f)
            while self.slot.ready:
                time.sleep(0.001)
        self.slot.close()

    def start(self):
        self._thread.start()

    def stop(self):
        self._thread.join(timeout=30)
        self.slot.close()

    @property
    def finished(self):
        return not self._thread.is_alive()


def test_run_stream_with_overlap_publishes_every_frame_in_order_and_survives_a_bad_one(
        case, monkeypatch):
    _, _, frames = case
    pipeline = _pipeline(case, overlap=True)
    bad = frames[2].seq
    complete = pipeline._complete

    def failing(frame, *args, **kwargs):  # the host half of one frame raises
        if frame.seq == bad:
            raise RuntimeError("deformable stage failed")
        return complete(frame, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_complete", failing)
    seen = []
    stats, _ = run_stream(_ListSource(frames), pipeline, on_result=lambda r: seen.append(
        r.frame.seq), status_every_s=0)
    assert seen == [f.seq for f in frames if f.seq != bad]
    assert stats.failed == 1 and stats.frames == len(frames) - 1
    assert pipeline._worker is None  # run_stream closed the worker thread
