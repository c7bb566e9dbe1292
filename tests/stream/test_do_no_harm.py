"""Do no harm (regseg.stream.do_no_harm): a registration estimated worse than tracking is not
published; one estimated better is; the choice reaches the Result, the ZeroMQ header and stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regseg.engines.fusion import FusionEngine
from regseg.errors import InputError
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import ScannerConfig, SimulatedScanner
from regseg.stream.capture import warp_labels
from regseg.stream.context import build_context
from regseg.stream.do_no_harm import CorrectionGate, build_gate
from regseg.stream.pipeline import Pipeline
from regseg.stream.quality import ErrorEstimator
from regseg.stream.stats import StreamStats
from regseg.stream.zmq_sink import result_header

# Held-out family-A phantom (never trained on by AlignSegNet or QualityNet).
SEED = 1002
# gate arguments where the estimates are monkeypatched: estimator, pixels, tracked, registered
STUB = (None, np.zeros((8, 8), np.uint8), np.eye(4), np.eye(4))


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(1)
    phantom = make_phantom(SEED)
    exact = ScannerConfig(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
                          out_of_plane_mm=0.0)
    scanner = SimulatedScanner(phantom, exact, seed=SEED)
    frames = [scanner.frame(k * 60) for k in range(4)]
    return build_context(phantom.mri, phantom.labels), frames


def in_plane_shift(plane: np.ndarray, mm: float) -> np.ndarray:
    """``plane`` moved by ``mm`` along its own column axis (an in-plane misalignment)."""
    moved = plane.copy()
    axis = plane[:3, 0] / np.linalg.norm(plane[:3, 0])
    moved[:3, 3] += mm * axis
    return moved


class WrongEngine:
    """A FusionEngine whose registration is always 0.3 (normalised) off along x: ~8 mm."""

    def __init__(self, engine: FusionEngine) -> None:
        self.engine = engine
        self.size, self.device = engine.size, engine.device

    def __call__(self, trus, mri, mri_labels):
        out = dict(self.engine(trus, mri, mri_labels))
        theta = out["theta"].clone()
        theta[..., 0, 2] += 0.3
        out["theta"] = theta
        return out


def test_gate_prefers_the_alignment_estimated_better(case):
    context, frames = case
    estimator = ErrorEstimator(context)
    for frame in frames[:3]:
        true = frame.truth.image_to_mri
        wrong = in_plane_shift(true, 8.0)
        est_true, est_wrong = CorrectionGate.estimates(estimator, frame.pixels, true, wrong)
        assert est_wrong > est_true + 1.0, (est_true, est_wrong)
        assert CorrectionGate(0.0)(estimator, frame.pixels, true, wrong).correction == "tracked"
        assert CorrectionGate(0.0)(estimator, frame.pixels, wrong, true).correction == \
            "registered"


def test_a_wrong_registration_is_not_published(case):
    context, frames = case
    engine = WrongEngine(FusionEngine("alignsegnet", backend="eager"))
    gated = Pipeline(context, engine, do_no_harm=CorrectionGate(0.0))
    plain = Pipeline(context, engine)
    stats = StreamStats()
    for frame in frames:
        result = gated(frame)
        tracked = gated.plane(frame)
        assert result.correction == "tracked"
        assert result.error_registered_mm > result.error_tracked_mm
        np.testing.assert_allclose(np.linalg.inv(result.mri_to_image), tracked, atol=1e-6)
        np.testing.assert_array_equal(result.warped_labels,
                                      warp_labels(context, tracked, frame.pixels.shape))
        assert "do_no_harm" in result.timings_ms
        header = result_header(result)
        assert header["correction"] == "tracked"
        assert header["error_tracked_mm"] == pytest.approx(result.error_tracked_mm)
        stats.add_trust(result.error_mm, result.flags, result.correction)
        # without the gate the same chain publishes its wrong registration
        shifted = plain(frame)
        assert shifted.correction == "registered" and math.isnan(shifted.error_tracked_mm)
        assert not np.allclose(np.linalg.inv(shifted.mri_to_image), tracked, atol=1.0)
    assert stats.summary()["corrections"] == {"tracked": len(frames)}


def test_the_deformable_stage_refines_the_published_tracked_plane(case):
    from regseg.stream.deformable import DeformableStage

    context, frames = case
    stage = DeformableStage(context, "plcreg2d", backend="eager")
    engine = WrongEngine(FusionEngine("alignsegnet", backend="eager"))
    for gate, deformed in ((CorrectionGate(0.0), True),
                           (CorrectionGate(0.0, deformable_on_tracked=False), False)):
        result = Pipeline(context, engine, deformable=stage, do_no_harm=gate)(frames[1])
        plane = np.linalg.inv(result.mri_to_image)
        assert result.correction == "tracked"
        if deformed:
            labels, ddf = stage(frames[1].pixels, plane)
            np.testing.assert_array_equal(result.warped_labels, labels)
            np.testing.assert_allclose(result.ddf, ddf, atol=1e-5)
        else:
            assert result.ddf is None and "deformable" not in result.timings_ms
            np.testing.assert_array_equal(result.warped_labels,
                                          warp_labels(context, plane, frames[1].pixels.shape))


def test_a_good_registration_is_published(case):
    context, frames = case
    gated = Pipeline(context, FusionEngine("alignsegnet", backend="eager"),
                     do_no_harm=CorrectionGate(0.0))
    results = []
    for frame in frames:  # tracking 6 mm off along the frame's own column axis
        true = frame.truth.image_to_mri
        gated.set_reference_to_mri(in_plane_shift(true, 6.0) @ np.linalg.inv(true))
        results.append(gated(frame))
    assert sum(r.correction == "registered" for r in results) >= 3, [
        (r.error_tracked_mm, r.error_registered_mm) for r in results]
    for r in results:
        if r.correction == "registered":
            assert r.error_registered_mm < r.error_tracked_mm
            assert not np.allclose(np.linalg.inv(r.mri_to_image), gated.plane(r.frame), atol=0.5)


def test_cli_flag_parses_and_defaults():
    from regseg.stream.cli_parser import build_parser
    from regseg.stream.do_no_harm import DO_NO_HARM_DEFAULT, MARGIN_MM

    args = build_parser().parse_args(["--demo"])
    assert (args.do_no_harm, args.do_no_harm_margin_mm) == (DO_NO_HARM_DEFAULT, MARGIN_MM)
    args = build_parser().parse_args(["--demo", "--do-no-harm", "on-skip-deformable",
                                      "--do-no-harm-margin-mm", "0.5"])
    assert (args.do_no_harm, args.do_no_harm_margin_mm) == ("on-skip-deformable", 0.5)


def test_window_takes_the_median_and_resets(monkeypatch):
    # estimate differences tracked - registered: +2, +2, -2, -2, then +2 after a filter reset
    gains = iter([(3.0, 1.0), (3.0, 1.0), (1.0, 3.0), (1.0, 3.0), (3.0, 1.0)])
    monkeypatch.setattr(CorrectionGate, "estimates", staticmethod(lambda *a: next(gains)))
    gate = CorrectionGate(0.5, window=3)
    picks = [gate(*STUB).correction for _ in range(4)]
    # one frame estimated worse does not flip the choice (median of 2, 2, -2); two do
    assert picks == ["registered", "registered", "registered", "tracked"]
    # without the reset the median of -2, -2, 2 would keep tracked
    assert gate(*STUB, continues=False).correction == "registered"
    assert gate.counts == {"registered": 4, "tracked": 1}


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="window"):
        CorrectionGate(0.0, window=0)
    with pytest.raises(InputError, match="margin"):
        CorrectionGate(math.nan)
    with pytest.raises(InputError, match="--do-no-harm"):
        build_gate("maybe")
    assert build_gate("off") is None
    assert build_gate("on", 0.25).deformable_on_tracked
    assert not build_gate("on-skip-deformable").deformable_on_tracked


def test_tracked_must_pass_keeps_the_registration_where_tracking_looks_bad(monkeypatch):
    # tracked estimated 3 mm, registered 3.5 mm: not better by the margin, so tracked ...
    monkeypatch.setattr(CorrectionGate, "estimates", staticmethod(lambda *a: (3.0, 3.5)))
    assert CorrectionGate(0.5)(*STUB, tracked_max_mm=1.5).correction == \
        "tracked"
    # ... unless tracked must pass the flag's threshold itself and does not
    strict = CorrectionGate(0.5, tracked_must_pass=True)
    assert strict(*STUB, tracked_max_mm=1.5).correction == "registered"
    assert strict(*STUB, tracked_max_mm=3.0).correction == "tracked"


def test_lowest_threshold_is_the_lowest_calibrated(case):
    from regseg.stream.quality import QualityCheck, QualityConfig

    check = QualityCheck(case[0])
    by_chain = check.estimator.calibration.get("by_chain") or {}
    lowest = min([check.threshold_mm, *(c["threshold_mm"] for c in by_chain.values())])
    assert check.lowest_threshold_mm == pytest.approx(lowest)
    assert check.lowest_threshold_mm <= check.threshold_mm
    explicit = QualityCheck(case[0], QualityConfig(error_threshold_mm=9.0))
    assert explicit.lowest_threshold_mm == 9.0  # an explicit threshold stays as given


def test_pairs_are_built_as_the_error_estimator_builds_its_input(case):
    from regseg.stream.do_no_harm import plane_pairs

    context, frames = case
    estimator = ErrorEstimator(context)
    frame = frames[2]
    planes_ = [frame.truth.image_to_mri, in_plane_shift(frame.truth.image_to_mri, 5.0)]
    x = plane_pairs(estimator, frame.pixels, planes_)
    assert x.shape == (2, 4, *estimator.size)
    for b, plane in enumerate(planes_):
        ref = estimator.inputs(frame.pixels, plane,
                               warp_labels(context, plane, frame.pixels.shape))[0]
        torch.testing.assert_close(x[b, :2], ref[:2], atol=1e-5, rtol=1e-5)  # TRUS, MRI
        # label maps: sampled on the net's grid here, resized from frame size there
        assert (x[b, 2:] == ref[2:]).float().mean() > 0.97
        assert x[b, 2].sum() > 100  # the gland is in view


def test_only_small_corrections_are_withheld(monkeypatch):
    from regseg.stream.do_no_harm import correction_mm

    monkeypatch.setattr(CorrectionGate, "estimates", staticmethod(lambda *a: (1.0, 1.0)))
    pixels = np.zeros((100, 80), np.uint8)
    plane = np.diag([0.2, 0.2, 1.0, 1.0])
    for mm, expected in ((2.0, "tracked"), (4.0, "registered")):
        moved = in_plane_shift(plane, mm)
        assert correction_mm(plane, moved, pixels.shape) == pytest.approx(mm)
        decision = CorrectionGate(0.5, max_correction_mm=3.0)(None, pixels, plane, moved)
        assert decision.correction == expected and decision.correction_mm == pytest.approx(mm)
    with pytest.raises(InputError, match="max correction"):
        CorrectionGate(0.5, max_correction_mm=0.0)


def test_the_temporal_filter_still_follows_the_registration(case):
    from regseg.stream.capture import Capture, TemporalFilter

    context, _ = case
    phantom = make_phantom(SEED)
    exact = ScannerConfig(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
                          out_of_plane_mm=0.0)
    scanner = SimulatedScanner(phantom, exact, seed=SEED)
    engine = WrongEngine(FusionEngine("alignsegnet", backend="eager"))
    capture = Capture(temporal=TemporalFilter())
    pipeline = Pipeline(context, engine, capture=capture, do_no_harm=CorrectionGate(0.0, 3))
    results = [pipeline(scanner.frame(k)) for k in range(4)]  # consecutive: no filter reset
    assert all(r.correction == "tracked" for r in results)
    assert math.isnan(results[0].jump_mm) and all(np.isfinite(r.jump_mm) for r in results[1:])
    # the filter holds the wrong registration's own correction (~0.3 normalised along x), not
    # the identity that was published
    filtered = capture.temporal._state.filtered
    assert abs(filtered[0, 2]) > 10.0  # pixels
    for r in results:
        np.testing.assert_allclose(np.linalg.inv(r.mri_to_image), pipeline.plane(r.frame),
                                   atol=1e-6)
