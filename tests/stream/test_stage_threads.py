"""--stage-threads 2: the deformable stage on a worker thread beside the segmentation at the
published plane (regseg.stream.stage_threads) gives the same Results, bit for bit, as the stages
in order, on the CLI's default chain with the shipped networks, on both simulator families."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from regseg.stream.build import (
    build_default_capture,
    build_deformable,
    build_engine,
    build_pipeline,
)
from regseg.stream.stage_threads import (
    STAGE_THREADS_DEFAULT,
    StageThreads,
    build_stage_threads,
    deform_ahead,
)


@pytest.fixture(scope="module")
def engines():
    return build_engine(backend="eager", threads=1)


@pytest.fixture(scope="module")
def ort_engines():
    pytest.importorskip("onnxruntime", reason="the CLI's CPU backend (onnxrt) needs onnxruntime")
    return build_engine(backend="onnxrt", threads=1)


def _family_a():
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import SimulatedScanner
    from regseg.stream.context import build_context

    phantom = make_phantom(3101)  # a calibration phantom (never an evaluation one)
    scanner = SimulatedScanner(phantom, seed=3)  # with its default tracking error
    return build_context(phantom.mri, phantom.labels), [scanner.frame(i) for i in range(0, 40, 5)]


def _family_b():
    from regseg.sim.family_b.anatomy import make_case
    from regseg.sim.family_b.session import Session
    from regseg.stream.context import build_context

    case = make_case(5161)  # a diagnosis case (never an evaluation one)
    session = Session(case, seed=5161 * 7 + 3)
    return build_context(case.mri, case.labels), [session.frame(k * 150) for k in range(8)]


class _Recorded:
    """The deformable stage, recording which thread ran each call."""

    def __init__(self, stage) -> None:
        self.stage, self.threads = stage, []

    def __call__(self, pixels, image_to_mri):
        self.threads.append(threading.current_thread().name)
        return self.stage(pixels, image_to_mri)


def _pipeline(context, engine, threads, backend="eager", **options):
    deformable = _Recorded(build_deformable(context, backend=backend, threads=1))
    return build_pipeline(context, engine, deformable=deformable,
                          capture=build_default_capture(backend=backend, threads=1),
                          stage_threads=threads, **options)


@pytest.mark.parametrize("family, backend", [(_family_a, "eager"), (_family_b, "eager"),
                                             (_family_a, "onnxrt")],
                         ids=["A-eager", "B-eager", "A-onnxrt"])
def test_two_threads_give_the_same_results_as_in_order(request, family, backend):
    engines = request.getfixturevalue("engines" if backend == "eager" else "ort_engines")
    context, frames = family()
    in_order = _pipeline(context, engines, 1, backend)
    two = _pipeline(context, engines, 2, backend)
    try:
        for frame in frames:
            a, b = in_order(frame), two(frame)
            assert np.array_equal(a.mri_to_image, b.mri_to_image)
            assert np.array_equal(a.labels, b.labels)
            assert np.array_equal(a.warped_labels, b.warped_labels)
            assert np.array_equal(a.ddf, b.ddf)
            assert np.array_equal(a.overlay, b.overlay)
            assert a.flags == b.flags and a.labels_source == b.labels_source
            assert a.error_mm == b.error_mm and a.quality == pytest.approx(b.quality, nan_ok=True)
            assert "deformable_wait" in b.timings_ms and "deformable_wait" not in a.timings_ms
            assert b.timings_ms["deformable"] > 0
    finally:
        two.close()
    assert in_order.stage_threads is None
    assert set(in_order.deformable.threads) == {threading.current_thread().name}
    assert len(two.deformable.threads) == len(frames)
    assert all(name.startswith("regseg-stage") for name in two.deformable.threads)


def test_the_stage_runs_in_order_where_it_cannot_run_ahead(engines):
    context, frames = _family_a()
    for options in ({"do_no_harm": "on"}, {"overlap": True}, {"resegment": "off"}):
        pipeline = _pipeline(context, engines, 2, **options)
        try:
            assert deform_ahead(pipeline, frames[0].pixels, np.eye(4)) is None
        finally:
            pipeline.close()
    pipeline = _pipeline(context, engines, 2)
    assert deform_ahead(pipeline, frames[0].pixels, np.eye(4)) is not None  # it can run ahead
    pipeline.deformable = build_deformable(context, backend="eager", threads=1, mode="lag")
    assert deform_ahead(pipeline, frames[0].pixels, np.eye(4)) is None  # --deformable async
    pipeline.deformable = None
    assert deform_ahead(pipeline, frames[0].pixels, np.eye(4)) is None
    pipeline.close()


def test_a_failing_stage_fails_its_own_frame_only(engines):
    context, frames = _family_a()
    pipeline = _pipeline(context, engines, 2)
    stage = pipeline.deformable.stage
    bad = frames[1].seq

    def failing(pixels, image_to_mri):
        if threading.current_thread().name.startswith("regseg-stage") and failing.next_bad:
            failing.next_bad = False
            raise RuntimeError("deformable stage failed")
        return stage(pixels, image_to_mri)

    failing.next_bad = False
    pipeline.deformable.stage = failing
    try:
        for frame in frames[:3]:
            failing.next_bad = frame.seq == bad
            if frame.seq == bad:
                with pytest.raises(RuntimeError, match="deformable stage failed"):
                    pipeline(frame)
            else:
                assert pipeline(frame).ddf is not None
    finally:
        pipeline.close()
    assert pipeline.stage_threads._pool is None  # closed; a later frame starts a new worker


def test_stage_threads_choices():
    assert build_stage_threads(1) is None
    assert isinstance(build_stage_threads(2), StageThreads)
    assert STAGE_THREADS_DEFAULT in (1, 2)
    with pytest.raises(ValueError, match=r"stage_threads 3: expected one of \(1, 2\)"):
        build_stage_threads(3)
    worker = StageThreads()
    future = worker.ahead(lambda x: x + 1, 41)
    assert future.result()[0] == 42 and future.result()[1] >= 0.0
    worker.close()
    worker.close()  # twice is fine


def test_cli_refuses_a_bad_stage_threads_value(capsys):
    from regseg.stream.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--demo", "--stage-threads", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--stage-threads" in err and "3" in err and "choose from 1, 2" in err
