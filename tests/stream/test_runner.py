"""run_stream with frames in flight: overlap when frames wait, never results held back."""

from __future__ import annotations

import io
import threading
import time
from types import SimpleNamespace

from regseg.clock import now_ns
from regseg.stream.runner import run_stream
from regseg.stream.slot import LatestSlot


class ScriptedSource:
    """Puts frames at given delays (s, from start), then finishes."""

    knows_truth = False

    def __init__(self, delays: list[float]) -> None:
        self.slot: LatestSlot = LatestSlot()
        self.delays = delays
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()

    def _run(self) -> None:
        t0 = time.monotonic()
        for n, delay in enumerate(self.delays):
            if self._stop.wait(max(0.0, t0 + delay - time.monotonic())):
                break
            self.slot.put(SimpleNamespace(index=n, acquired_ns=now_ns(), truth=None))
        self.slot.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.slot.close()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()


class RingLikePipeline:
    """Behaves as the CUDA ring does: a frame finishes ``work_s`` after it was submitted, a
    full ring (``slots``) returns its oldest frame on submit, poll() never waits, flush() does."""

    def __init__(self, work_s: float, slots: int = 3) -> None:
        self.work_s, self.slots = work_s, slots
        self.queue: list[tuple[float, object]] = []  # (ready time, frame)
        self.max_in_flight = 0
        self.finished_at: dict[int, float] = {}

    @property
    def in_flight(self) -> int:
        return len(self.queue)

    def _result(self, ready: float, frame) -> SimpleNamespace:
        self.finished_at[frame.index] = ready
        return SimpleNamespace(frame=frame, timings_ms={"model": self.work_s * 1e3},
                               flagged=False, error_mm=1.0, flags=())

    def submit(self, frame) -> list:
        done = []
        if len(self.queue) == self.slots:
            ready, old = self.queue.pop(0)
            time.sleep(max(0.0, ready - time.monotonic()))
            done.append(self._result(ready, old))
        start = max([time.monotonic()] + [r for r, _ in self.queue[-1:]])  # one compute stream
        self.queue.append((start + self.work_s, frame))
        self.max_in_flight = max(self.max_in_flight, len(self.queue))
        return done

    def poll(self) -> list:
        done = []
        while self.queue and self.queue[0][0] <= time.monotonic():
            done.append(self._result(*self.queue.pop(0)))
        return done

    def flush(self) -> list:
        done = []
        while self.queue:
            ready, frame = self.queue.pop(0)
            time.sleep(max(0.0, ready - time.monotonic()))
            done.append(self._result(ready, frame))
        return done


def published(source, pipeline, **kwargs) -> list[tuple[int, float]]:
    seen: list[tuple[int, float]] = []
    run_stream(source, pipeline, status_every_s=0, status_stream=io.StringIO(),
               on_result=lambda r: seen.append((r.frame.index, time.monotonic())),
               gate=lambda frame: frame, **kwargs)  # placeholder frames: no FrameGate
    return seen


def test_sparse_frames_are_published_before_the_next_arrives():
    # 3 frames 0.3 s apart, 20 ms of work each: a ring that only returns a frame when the next
    # one is pushed would hold each result ~0.3 s; the runner must publish within the work time.
    pipeline = RingLikePipeline(work_s=0.02)
    seen = published(ScriptedSource([0.0, 0.3, 0.6]), pipeline)
    assert [i for i, _ in seen] == [0, 1, 2]
    for index, at in seen:
        assert at - pipeline.finished_at[index] < 0.05, (index, at - pipeline.finished_at[index])
    assert pipeline.max_in_flight == 1


def test_waiting_frames_overlap_and_max_frames_is_exact():
    # Frames every 3 ms, 10 ms of work: a frame is always waiting in the slot, so the runner keeps
    # several in flight; exactly max_frames results, in order, none lost in flight.
    pipeline = RingLikePipeline(work_s=0.01)
    seen = published(ScriptedSource([0.003 * n for n in range(200)]), pipeline, max_frames=12)
    indices = [i for i, _ in seen]
    assert len(indices) == 12
    assert indices == sorted(indices)
    assert pipeline.max_in_flight >= 2
    assert pipeline.in_flight == 0


def test_results_in_flight_when_the_source_ends_are_flushed():
    pipeline = RingLikePipeline(work_s=0.05)
    seen = published(ScriptedSource([0.0, 0.001, 0.002]), pipeline)
    assert len(seen) >= 1 and pipeline.in_flight == 0
    assert seen[-1][0] == 2  # the newest frame always comes out
