"""--estimate-check: the error estimate checked against a known displacement on the stream's own
frames (regseg.stream.estimate_check)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regseg.stream.estimate_check import (
    CHECK_FRAMES,
    EstimateCheck,
    build_estimate_check,
)


@pytest.fixture(scope="module")
def case():
    """(context, frames) of calibration phantom 3100 (never an evaluation one), plain scanner
    without tracking error: each frame's true plane is known."""
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner
    from regseg.stream.context import build_context

    phantom = make_phantom(3100)
    cfg = ScannerConfig(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
                        out_of_plane_mm=0.0)
    scanner = SimulatedScanner(phantom, cfg, seed=2)
    frames = [scanner.frame(i) for i in range(30, 30 + 4 * (CHECK_FRAMES + 2), 4)]
    return build_context(phantom.mri, phantom.labels), frames


class Blind:
    """An estimator that does not read the images: the same answer for every plane (what a
    scanner the network does not read looks like, in the limit)."""

    def __init__(self, real) -> None:
        self.context = real.context
        self._real = real

    def inputs(self, pixels, image_to_mri, warped_labels):
        return self._real.inputs(pixels, image_to_mri, warped_labels)

    def estimate_mm(self, x):
        return torch.full((x.shape[0],), 2.0)

    def __call__(self, pixels, image_to_mri, warped_labels):
        return 2.0


def _spacing(frame):
    return tuple(float(s) for s in frame.spacing_mm)


def test_the_shipped_estimate_passes_on_its_own_scanner_and_a_blind_one_fails(case):
    from regseg.stream.quality import ErrorEstimator

    context, frames = case
    real = ErrorEstimator(context)
    check = EstimateCheck()
    statuses = []
    for f in frames[:CHECK_FRAMES]:
        assert check.enter(real, f.pixels, f.truth.image_to_mri, _spacing(f), True) == ()
        statuses.append(check.status)
    assert statuses[0] == f"pending 1/{CHECK_FRAMES}"
    assert statuses[-1] == "passed" and check.rank >= 0.95  # measured 1.0 here
    assert check.info()["median_gap_mm"] > 1.0

    blind = EstimateCheck()
    for f in frames[:CHECK_FRAMES - 1]:
        assert blind.enter(Blind(real), f.pixels, f.truth.image_to_mri, _spacing(f), True) == ()
    assert blind.status == f"pending {CHECK_FRAMES - 1}/{CHECK_FRAMES}"
    f = frames[CHECK_FRAMES - 1]
    assert blind.enter(Blind(real), f.pixels, f.truth.image_to_mri, _spacing(f), True) == (
        "estimate_unverified",)
    assert blind.status == "failed" and blind.rank == 0.5  # all ties
    # the verdict stays: later frames are flagged without being estimated again
    f = frames[-1]
    assert blind.enter(None, f.pixels, f.truth.image_to_mri, _spacing(f), True) == (
        "estimate_unverified",)
    # inform: the same verdict, no flag
    inform = EstimateCheck(flag=False)
    for f in frames[:CHECK_FRAMES]:
        assert inform.enter(Blind(real), f.pixels, f.truth.image_to_mri, _spacing(f), True) == ()
    assert inform.status == "failed"


def test_frames_without_a_pose_content_or_gland_in_view_do_not_count(case):
    from regseg.stream.quality import ErrorEstimator

    context, frames = case
    real = ErrorEstimator(context)
    check = EstimateCheck(frames=2)
    f = frames[0]
    check.enter(real, f.pixels, f.truth.image_to_mri, _spacing(f), False)  # untracked / blank
    assert check.status == "pending 0/2"
    away = f.truth.image_to_mri.copy()
    away[:3, 3] += 200.0  # the plane far outside the MRI: no gland in view
    check.enter(real, f.pixels, away, _spacing(f), True)
    assert check.status == "pending 0/2" and np.isnan(check.rank)


def test_only_frames_no_other_check_doubts_are_taken_in(case):
    """A frame an image-based check doubts (its registration may be far off, so displaced planes
    are no farther from the truth) is not taken in; the estimate's own flag does not keep a frame
    out; the check's flag leaves the registered-labels prior on, as the estimate's does."""
    from regseg.stream.quality import QualityCheck
    from regseg.stream.seg_prior import prior_applies

    context, frames = case
    quality = QualityCheck(context)
    quality.self_check = EstimateCheck(frames=2)
    f = frames[0]
    for doubt in ("lc2_unsupported", "jump", "disagreement", "out_of_plane", "no_gland"):
        flags, status = quality.self_checked(f.pixels, f.truth.image_to_mri, _spacing(f),
                                             ("error_estimate", doubt))
        assert status == "pending 0/2" and flags == ("error_estimate", doubt)
    flags, status = quality.self_checked(f.pixels, f.truth.image_to_mri, _spacing(f),
                                         ("error_estimate",))
    assert status == "pending 1/2" and flags == ("error_estimate",)
    quality.self_check = None
    assert quality.self_checked(f.pixels, f.truth.image_to_mri, _spacing(f), ()) == ((), None)
    assert prior_applies("gated", ("estimate_unverified",))
    assert prior_applies("gated", ("error_estimate", "estimate_unverified"))
    assert not prior_applies("gated", ("estimate_unverified", "jump"))


def test_modes_and_settings_are_checked():
    assert build_estimate_check("off") is None
    assert build_estimate_check("on").flag and not build_estimate_check("inform").flag
    with pytest.raises(ValueError, match="estimate_check 'strict'"):
        build_estimate_check("strict")
    with pytest.raises(ValueError, match="frames"):
        EstimateCheck(frames=0)
    with pytest.raises(ValueError, match="shift_mm"):
        EstimateCheck(shift_mm=float("nan"))
    with pytest.raises(ValueError, match="min_rank"):
        EstimateCheck(min_rank=1.5)


def test_the_pipeline_reports_the_status_and_flags_after_a_failed_verdict(case):
    """Default pipeline: the status on the Result, the ZeroMQ header and the OpenIGTLink metadata;
    with ``on`` a failed verdict flags every later frame, with ``inform`` (the default) it
    is reported only; ``off`` says nothing."""
    from regseg.stream.build import build_engine, build_pipeline
    from regseg.stream.igtl.sink import trust_metadata
    from regseg.stream.quality import FLAG_REASONS
    from regseg.stream.zmq_sink import result_header

    assert "estimate_unverified" in FLAG_REASONS
    context, frames = case
    engine = build_engine(backend="eager", threads=1)
    pipeline = build_pipeline(context, engine, deformable=None, lc2="off")
    first = pipeline(frames[0])
    assert first.estimate_check == f"pending 1/{CHECK_FRAMES}"
    assert "estimate_unverified" not in first.flags
    assert result_header(first)["estimate_check"] == first.estimate_check
    assert trust_metadata(first)["EstimateCheck"] == first.estimate_check

    blinded = build_pipeline(context, engine, deformable=None, lc2="off", estimate_check="on")
    blinded.quality.estimator = Blind(blinded.quality.estimator)
    results = [blinded(f) for f in frames]
    assert [r.estimate_check for r in results[:CHECK_FRAMES - 1]] == [
        f"pending {k}/{CHECK_FRAMES}" for k in range(1, CHECK_FRAMES)]
    assert all("estimate_unverified" not in r.flags for r in results[:CHECK_FRAMES - 1])
    assert all(r.estimate_check == "failed" and "estimate_unverified" in r.flags
               and r.flagged for r in results[CHECK_FRAMES - 1:])
    assert blinded.quality.self_check.info()["status"] == "failed"

    # inform (the default): the same verdict, reported, and no frame flagged for it
    informed = build_pipeline(context, engine, deformable=None, lc2="off")
    informed.quality.estimator = Blind(informed.quality.estimator)
    results = [informed(f) for f in frames]
    assert results[-1].estimate_check == "failed"
    assert not any("estimate_unverified" in r.flags for r in results)

    off = build_pipeline(context, engine, deformable=None, lc2="off", estimate_check="off")
    result = off(frames[0])
    assert result.estimate_check is None and result_header(result)["estimate_check"] is None
    assert "EstimateCheck" not in trust_metadata(result)


def test_the_cli_reports_the_verdict_in_its_summary(tmp_path, capsys):
    """The demo (family A, the scanner the estimate was trained on): passed, in --stats-json
    and in the printed summary; the parser takes the modes."""
    import json

    from regseg.stream.cli import main
    from regseg.stream.cli_parser import build_parser
    from regseg.stream.estimate_check import ESTIMATE_CHECK_DEFAULT

    assert build_parser().parse_args(["--demo"]).estimate_check == ESTIMATE_CHECK_DEFAULT
    assert build_parser().parse_args(["--demo", "--estimate-check", "inform"]).estimate_check \
        == "inform"
    stats_path = tmp_path / "stats.json"
    code = main(["--demo", "--serve", "none", "--zmq", "none", "--device", "cpu", "--quiet",
                 "--threads", "1", "--backend", "eager", "--max-frames", "30",
                 "--stats-json", str(stats_path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    info = json.loads(stats_path.read_text())["estimate_check"]
    assert info["status"] == "passed" and info["frames"] == CHECK_FRAMES
    assert info["rank"] >= info["min_rank"]
    assert "error estimate's own check: passed" in out.out


def test_the_summary_says_when_every_later_frame_is_flagged():
    from regseg.stream.stats import format_summary

    base = {"frames": 0, "skipped": 0, "flagged": 0, "fps": None}
    info = {"status": "failed", "flag": True, "frames": 12, "min_rank": 0.85, "rank": 0.6}
    text = format_summary({**base, "estimate_check": info})
    assert ("error estimate's own check: failed: 0.60 of displaced planes estimated worse, "
            "0.85 needed, 12 frames; every later frame flagged estimate_unverified") in text
    assert "every later frame" not in format_summary(
        {**base, "estimate_check": {**info, "flag": False}})
    assert "own check" not in format_summary({**base, "estimate_check": "off"})


def test_the_overlay_says_when_the_estimate_failed_its_check():
    """An unflagged frame's corner estimate carries the failed check (more text), not a pass or
    a pending check; a flagged frame keeps only its UNVERIFIED mark."""
    from regseg.stream.overlay import compose_overlay

    pixels = np.full((256, 256), 40, np.uint8)
    empty = np.zeros_like(pixels)

    def bright(rgb):  # text pixels in the bottom corner
        return int((rgb[220:, :].min(axis=-1) > 150).sum())

    plain = bright(compose_overlay(pixels, empty, empty, error_mm=1.2))
    assert plain > 20
    assert bright(compose_overlay(pixels, empty, empty, error_mm=1.2,
                                  estimate_check="passed")) == plain
    assert bright(compose_overlay(pixels, empty, empty, error_mm=1.2,
                                  estimate_check="pending 3/12")) == plain
    assert bright(compose_overlay(pixels, empty, empty, error_mm=1.2,
                                  estimate_check="failed")) > plain + 20
    assert bright(compose_overlay(pixels, empty, empty, flags=("estimate_unverified",),
                                  error_mm=1.2, estimate_check="failed")) == 0
