"""--lc2 async: LC2 one frame late on a worker thread (regseg.stream.lc2_lag). Each frame takes the
previous frame's move; the first is refined in order; ``lag`` is the same in order, and gives the
same Results as ``async`` when each frame waits for the worker."""

from __future__ import annotations

import math
import os
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from regseg.lc2 import in_plane_move
from regseg.stream.build import build_default_capture, build_engine, build_pipeline
from regseg.stream.lag_worker import WORKER_NICE
from regseg.stream.lc2_lag import LAG_MODES, Lc2Lagged
from regseg.stream.lc2_stage import BENCH_MODES, LC2_MODES, Lc2Stage, build_lc2


@pytest.fixture(scope="module")
def family_b():
    from regseg.sim.family_b.anatomy import make_case
    from regseg.sim.family_b.session import Session
    from regseg.stream.context import build_context

    case = make_case(5161)  # a diagnosis case (never an evaluation one)
    session = Session(case, seed=5161 * 7 + 3)
    return build_context(case.mri, case.labels), [session.frame(k) for k in range(6)]


@pytest.fixture(autouse=True)
def _threads_on(monkeypatch):
    """This module runs the worker thread (the rest of the suite runs async in order)."""
    monkeypatch.setenv("REGSEG_LC2_IN_ORDER", "0")


def _run(context, frames, mode):
    pipeline = build_pipeline(context, build_engine(backend="eager", threads=1), deformable=None,
                              lc2=mode, capture=build_default_capture(backend="eager", threads=1))
    results = []
    for frame in frames:
        results.append(pipeline(frame))
        if mode == "async":
            pipeline.lc2.wait()
    worker = pipeline.lc2._worker.thread if mode == "async" else None
    pipeline.close()
    return results, worker


def test_each_frame_takes_the_previous_frames_move(family_b):
    context, frames = family_b
    on, _ = _run(context, frames, "on")
    lag, _ = _run(context, frames, "lag")
    done, worker = _run(context, frames, "async")
    assert worker is not None and not worker.is_alive()  # Pipeline.close ended it
    # the first frame is refined in order, as `on` does
    assert np.array_equal(lag[0].mri_to_image, on[0].mri_to_image)
    moved = 0
    for k in range(1, len(frames)):
        # what frame k reports is frame k-1's refinement
        assert lag[k].lc2_significance == pytest.approx(on[k - 1].lc2_significance)
        prev = on[k - 1].lc2_move_mm
        assert (math.isnan(lag[k].lc2_move_mm) if math.isnan(prev)
                else lag[k].lc2_move_mm == pytest.approx(prev))
        moved += not math.isnan(prev)
        # async, each frame waiting for the worker, is lag to the bit
        assert np.array_equal(done[k].mri_to_image, lag[k].mri_to_image)
        assert np.array_equal(done[k].labels, lag[k].labels) and done[k].flags == lag[k].flags
    assert moved >= 3  # the case's refinements apply: the test compares real moves
    # the stats say how old the applied move is and what its search cost (off the frame's path)
    assert all("lc2_age" in r.timings_ms and r.timings_ms["lc2_search"] > 0 for r in done)
    assert all(r.timings_ms["lc2_age"] >= r.timings_ms["lc2_search"] for r in done[1:])
    assert not any("lc2_age" in r.timings_ms for r in on)
    # one frame late is not the same plane as on time (the networks' plane moves per frame)
    assert any(not np.allclose(lag[k].mri_to_image, on[k].mri_to_image)
               for k in range(1, len(frames)))


class _Stage:
    """A stand-in Lc2Stage: each search moves 1 mm along columns, or raises when told to."""

    warm, config = False, SimpleNamespace(min_significance=1.5)

    def __init__(self) -> None:
        self.calls, self.threads, self.fail, self.nice = 0, [], False, []

    def unsupported(self, significance):
        return significance < 1.5

    def centre_ij(self, plane):
        return np.array([10.0, 12.0])

    moved = Lc2Stage.moved  # the real arithmetic of applying a move, about centre_ij above

    def search(self, pixels, plane, *, tracked=None, held=None):
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        if hasattr(os, "getpriority"):
            self.nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if self.fail:
            raise ValueError(f"lc2: search {self.calls} failed")
        return SimpleNamespace(shift_mm=(1.0, 0.0), rotation_deg=0.0, move_mm=1.0,
                               significance=2.0 + self.calls, applied=True)


def _plane(spacing=0.5):
    plane = np.eye(4)
    plane[0, 0] = plane[1, 1] = spacing
    return plane


def test_the_move_is_applied_to_this_frames_plane_and_the_worker_runs_it():
    stage = _Stage()
    lagged = Lc2Lagged(stage, asynchronous=True)
    pixels = np.zeros((20, 30), np.uint8)
    out, move, sig = lagged(pixels, _plane())
    assert stage.threads == ["MainThread"] and sig == 3.0 and move == 1.0  # in order, once
    other = _plane()
    other[:3, 3] = [2.0, -1.0, 0.5]  # the next frame's network plane: the same view, moved
    out, move, sig = lagged(pixels, other)
    expected = other @ in_plane_move(np.array([1.0, 0.0]), 0.0, np.array([10.0, 12.0]),
                                     (0.5, 0.5))
    assert np.allclose(out, expected) and np.allclose(out[:3, 3] - other[:3, 3], [1.0, 0, 0])
    assert sig == 3.0  # the first frame's refinement, applied to the second
    lagged.wait()
    assert stage.threads[1:] == ["regseg-lc2"] and lagged(pixels, other)[2] == 4.0
    if sys.platform.startswith("linux"):  # the worker yields to the frame's path when busy
        assert stage.nice[1] == max(stage.nice[0], WORKER_NICE) and WORKER_NICE > 0
    lagged.close()
    assert lagged._worker.thread is None


def test_a_move_is_not_carried_to_another_view():
    """After a jump of the probe, dropped frames or a new registration (the network's plane more
    than VIEW_CHANGE_MM from the one the move was found on) the frame is refined in order."""
    from regseg.stream.lag_worker import VIEW_CHANGE_MM, view_change_mm

    stage = _Stage()
    lagged = Lc2Lagged(stage, asynchronous=True)
    pixels = np.zeros((20, 30), np.uint8)
    lagged(pixels, _plane())
    near, far, turned = _plane(), _plane(), _plane()
    near[:3, 3] = [3.0, 3.0, 0.0]
    far[:3, 3] = [0.0, 0.0, 6.0]  # out of plane: the corners move 6 mm
    turned[:3, :2] = [[0.5 * np.cos(0.5), 0.0], [0.0, 0.5], [0.5 * np.sin(0.5), 0.0]]  # tilted
    assert view_change_mm(_plane(), near, (20, 30)) < VIEW_CHANGE_MM
    assert view_change_mm(_plane(), far, (20, 30)) == pytest.approx(6.0)
    assert view_change_mm(_plane(), turned, (20, 30)) > VIEW_CHANGE_MM  # 14.5 mm x 0.5 rad
    lagged(pixels, near)
    lagged.wait()
    assert stage.threads == ["MainThread", "regseg-lc2"]  # carried over, next one on the worker
    for plane in (far, turned):
        calls = stage.calls
        _, _, sig = lagged(pixels, plane)
        # refined in order: this frame's own search, whose significance it reports
        assert stage.threads[-1] == "MainThread" and sig == 2.0 + calls + 1
        lagged.wait()
    lagged.close()


def test_a_failed_refinement_fails_the_next_frame_then_the_one_after_starts_over():
    stage = _Stage()
    lagged = Lc2Lagged(stage, asynchronous=True)
    pixels = np.zeros((20, 30), np.uint8)
    lagged(pixels, _plane())
    stage.fail = True
    lagged(pixels, _plane())  # its own move is the first frame's; its refinement fails
    lagged.wait()
    with pytest.raises(ValueError, match="search 2 failed"):
        lagged(pixels, _plane())
    stage.fail = False
    out, move, sig = lagged(pixels, _plane())  # nothing to take over: in order again
    assert stage.threads[-1] == "MainThread" and sig == 2.0 + stage.calls
    lagged.close()


def test_a_new_frame_size_is_refined_in_order():
    stage = _Stage()
    lagged = Lc2Lagged(stage, asynchronous=False)
    lagged(np.zeros((20, 30), np.uint8), _plane())
    lagged(np.zeros((20, 30), np.uint8), _plane())
    calls = stage.calls
    _, _, sig = lagged(np.zeros((24, 30), np.uint8), _plane())
    # the stale move (another size) is not applied: this frame's own refinement is, and the
    # lagged refinement of the frame is that same search (no second one)
    assert stage.calls == calls + 1 and sig == 2.0 + stage.calls


def test_modes(family_b, monkeypatch):
    context, _ = family_b
    assert "async" in LC2_MODES and "lag" not in LC2_MODES  # lag: a bench mode
    assert set(LAG_MODES) == {"async", "lag"} and not set(BENCH_MODES) & set(LAG_MODES)
    assert build_lc2(context, "async").asynchronous and not build_lc2(context, "lag").asynchronous
    monkeypatch.setenv("REGSEG_LC2_IN_ORDER", "1")  # what the rest of the suite runs
    assert not build_lc2(context, "async").asynchronous
    with pytest.raises(ValueError, match="warm stage"):
        Lc2Lagged(Lc2Stage(context, warm=True), asynchronous=True)


def test_a_bad_nice_value_is_named_and_the_default_used(monkeypatch, caplog):
    from regseg.stream.lag_worker import NICE_DEFAULT, worker_nice

    for raw in ("ten", "-3", "40"):
        monkeypatch.setenv("REGSEG_LC2_NICE", raw)
        assert worker_nice() == NICE_DEFAULT
        assert f"REGSEG_LC2_NICE='{raw}'" in caplog.text and "0-19" in caplog.text
    monkeypatch.setenv("REGSEG_LC2_NICE", "5")
    assert worker_nice() == 5
    monkeypatch.delenv("REGSEG_LC2_NICE")
    assert worker_nice() == NICE_DEFAULT


def test_the_cli_takes_it():
    from regseg.stream.cli_parser import build_parser

    assert build_parser().parse_args(["--demo", "--lc2", "async"]).lc2 == "async"
