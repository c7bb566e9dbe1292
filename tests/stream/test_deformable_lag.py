"""--deformable async: the deformable stage's network one frame late on a worker thread
(regseg.stream.deformable_lag). Each frame is warped through its own published plane and the
previous frame's displacement; the first frame, a new frame size and a view change run in order;
``lag`` is the same arithmetic in order and gives the same Results as ``async`` when each frame
waits for the worker."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

from regseg.stream.build import (
    build_default_capture,
    build_deformable,
    build_engine,
    build_pipeline,
)
from regseg.stream.deformable_lag import DEFORMABLE_MODES, DeformableLagged, in_order
from regseg.stream.lag_worker import WORKER_NICE


@pytest.fixture(autouse=True)
def _threads_on(monkeypatch):
    """This module runs the worker thread (the rest of the suite runs async in order)."""
    monkeypatch.setenv("REGSEG_LC2_IN_ORDER", "0")


@pytest.fixture(scope="module")
def family_a():
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import SimulatedScanner
    from regseg.stream.context import build_context

    phantom = make_phantom(3101)  # a calibration phantom (never an evaluation one)
    scanner = SimulatedScanner(phantom, seed=3)  # with its default tracking error
    return build_context(phantom.mri, phantom.labels), [scanner.frame(i) for i in range(6)]


@pytest.fixture(scope="module")
def engine():
    return build_engine(backend="eager", threads=1)


def _run(context, engine, frames, mode):
    deformable = build_deformable(context, backend="eager", threads=1, mode=mode)
    pipeline = build_pipeline(context, engine, deformable=deformable, lc2="on",
                              capture=build_default_capture(backend="eager", threads=1))
    results = []
    for frame in frames:
        results.append(pipeline(frame))
        if mode == "async":
            deformable.wait()
    worker = deformable._worker.thread if mode == "async" else None
    pipeline.close()
    return results, worker


def test_each_frame_is_warped_through_the_previous_frames_displacement(family_a, engine):
    context, frames = family_a
    on, _ = _run(context, engine, frames, "on")
    lag, _ = _run(context, engine, frames, "lag")
    done, worker = _run(context, engine, frames, "async")
    assert worker is not None and not worker.is_alive()  # Pipeline.close ended it
    # the planes do not depend on the deformable stage; the first frame runs in order
    for a, b in zip(on, lag, strict=True):
        assert np.array_equal(a.mri_to_image, b.mri_to_image)
    assert np.array_equal(lag[0].ddf, on[0].ddf)
    assert np.array_equal(lag[0].warped_labels, on[0].warped_labels)
    stage = build_deformable(context, backend="eager", threads=1)
    moved = 0
    for k in range(1, len(frames)):
        assert np.array_equal(lag[k].ddf, on[k - 1].ddf)  # the previous frame's prediction
        plane = np.linalg.inv(lag[k].mri_to_image)
        assert np.array_equal(lag[k].warped_labels,
                              stage.warp(plane, torch.from_numpy(on[k - 1].ddf)[None]))
        moved += not np.array_equal(lag[k].warped_labels, on[k].warped_labels)
        assert lag[k].timings_ms["deformable_age"] > 0
        assert "deformable_net" in lag[k].timings_ms
    assert moved >= 1  # the lag is visible: the test can tell the modes apart
    for a, b in zip(lag, done, strict=True):  # async, waited for, is lag to the bit
        assert np.array_equal(a.ddf, b.ddf)
        assert np.array_equal(a.warped_labels, b.warped_labels)
        assert np.array_equal(a.labels, b.labels) and a.flags == b.flags


class _Stage:
    """A stand-in stage: the displacement is the call's number; the labels show which
    displacement each frame was warped through."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls, self.threads, self.nice, self.fail_on = 0, [], [], fail_on
        self.weights, self.engine, self.context, self.size = "stand-in", None, None, (8, 8)

    def field(self, pixels, plane):
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        if hasattr(os, "getpriority"):
            self.nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if self.calls == self.fail_on:
            raise RuntimeError("stand-in network failed")
        return torch.full((1, 2, *pixels.shape), float(self.calls))

    def warp(self, plane, ddf):
        return np.full(ddf.shape[-2:], int(ddf[0, 0, 0, 0]), np.uint8)


def _plane(shift_mm: float = 0.0) -> np.ndarray:
    plane = np.diag([0.2, 0.2, 1.0, 1.0])
    plane[0, 3] = shift_mm
    return plane


def test_a_new_size_or_a_view_change_runs_in_order():
    stage = _Stage()
    lagged = DeformableLagged(stage, asynchronous=False)
    pixels = np.zeros((10, 12), np.uint8)
    labels, ddf = lagged(pixels, _plane())  # the first frame: its own prediction
    assert labels[0, 0] == 1 and ddf[0, 0, 0] == 1 and stage.calls == 1
    labels, _ = lagged(pixels, _plane(1.0))  # 1 mm on: the previous one
    assert labels[0, 0] == 1 and stage.calls == 2
    labels, _ = lagged(pixels, _plane(7.0))  # 6 mm from where call 2 was made: in order
    assert labels[0, 0] == 3 and stage.calls == 3
    labels, _ = lagged(np.zeros((10, 14), np.uint8), _plane(7.0))  # a new frame size
    assert labels[0, 0] == 4 and labels.shape == (10, 14)


def test_a_failure_on_the_worker_fails_the_next_frame_only():
    stage = _Stage(fail_on=2)
    lagged = DeformableLagged(stage, asynchronous=True)
    pixels = np.zeros((10, 12), np.uint8)
    try:
        lagged(pixels, _plane())  # in order (call 1); call 2 goes to the worker and fails
        lagged.wait()
        labels, _ = lagged(pixels, _plane())  # took call 1's; the worker's call 2 raised
        assert labels[0, 0] == 1
        lagged.wait()
        with pytest.raises(RuntimeError, match="stand-in network failed"):
            lagged(pixels, _plane())
        labels, _ = lagged(pixels, _plane())  # nothing to take over: in order again
        assert labels[0, 0] == 3
        assert "regseg-deformable" in stage.threads
        if sys.platform.startswith("linux") and stage.nice:
            worker = [n for t, n in zip(stage.threads, stage.nice, strict=True)
                      if t == "regseg-deformable"]
            assert worker and min(worker) >= WORKER_NICE > 0
    finally:
        lagged.close()
    assert lagged._worker.thread is None


def test_an_older_prediction_never_replaces_a_newer_one():
    stage = _Stage()
    lagged = DeformableLagged(stage, asynchronous=False)
    pixels = np.zeros((4, 4), np.uint8)
    lagged._run(pixels, _plane(), 200)
    lagged._run(pixels, _plane(), 100)  # a slow worker finishing an older frame
    assert lagged._take().handed_ns == 200 and stage.calls == 2


def test_modes_and_bad_values(family_a, monkeypatch):
    context, _ = family_a
    assert DEFORMABLE_MODES == ("on", "off", "async")
    assert in_order("async") == "lag" and in_order("on") == "on" and in_order("off") == "off"
    assert build_deformable(context, backend="eager", mode="off") is None
    lagged = build_deformable(context, backend="eager", mode="async")
    assert isinstance(lagged, DeformableLagged) and lagged.asynchronous
    assert lagged.engine is lagged.stage.engine and lagged.weights == lagged.stage.weights
    monkeypatch.setenv("REGSEG_LC2_IN_ORDER", "1")  # what the rest of the suite runs
    assert not build_deformable(context, backend="eager", mode="async").asynchronous
    with pytest.raises(ValueError, match="'sometimes'"):
        build_deformable(context, backend="eager", mode="sometimes")


def test_the_command_line_takes_async_and_names_a_bad_mode(capsys):
    from regseg.stream.cli_parser import build_parser

    parser = build_parser()
    args = parser.parse_args(["--demo", "--deformable", "async"])
    assert args.deformable == "async"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--demo", "--deformable", "later"])
    assert exit_info.value.code == 2
    assert "--deformable" in capsys.readouterr().err


def test_a_serve_session_runs_its_stage_one_frame_late():
    """regseg-serve's sessions take the same key; the network calls go through the shared
    batcher from the session's worker thread."""
    from regseg.stream.serve.config import ServeConfig
    from regseg.stream.serve.server import ServeSessions

    config = ServeConfig(engine={"device": "cpu", "backend": "eager"}, control=None)
    sessions = ServeSessions(config, {"backend": "eager", "device": torch.device("cpu"),
                                      "threads": 1})
    try:
        spec = sessions.check({"name": "a", "source": "sim://1", "fps": 10,
                               "deformable": "async", "refine-iterations": 1}, "test")
        session = sessions.add(spec)
        deadline = time.monotonic() + 120
        while session.stats.frames < 3:
            assert time.monotonic() < deadline, "the session published fewer than 3 frames"
            time.sleep(0.1)
        assert isinstance(session.pipeline.deformable, DeformableLagged)
        assert session.pipeline.deformable.asynchronous
    finally:
        sessions.close()


def test_a_stale_displacement_is_not_carried(monkeypatch):
    """A worker that stalled for longer than MAX_AGE_MS: the frame runs in order (async only)."""
    from regseg.stream import lag_worker

    stage = _Stage()
    lagged = DeformableLagged(stage, asynchronous=True)
    pixels = np.zeros((10, 12), np.uint8)
    try:
        lagged(pixels, _plane())  # in order: call 1
        lagged.wait()
        clock = lag_worker.now_ns()
        monkeypatch.setattr(lag_worker, "now_ns", lambda: clock)  # fresh: carried over
        labels, _ = lagged(pixels, _plane())
        assert labels[0, 0] == 1  # call 1's, carried; frame 2 went to the worker (call 2)
        lagged.wait()
        assert stage.calls == 2
        later = clock + int((lag_worker.MAX_AGE_MS + 1) * 1e6)
        monkeypatch.setattr(lag_worker, "now_ns", lambda: later)  # the worker stalled
        labels, _ = lagged(pixels, _plane())
        assert labels[0, 0] == 3 and stage.calls == 3  # not call 2's: its own, made in order
    finally:
        lagged.close()
