"""``--seg-fallback mri`` (regseg.stream.seg_prior): after the error estimate failed its own check
on the stream, frames no image-based flag doubts publish the registered MRI labels as their
labels; before a verdict, after a pass and on doubted frames nothing changes, and what the flags
judge (the network's own labels) never does."""

from __future__ import annotations

import numpy as np
import pytest

from regseg.stream.build import build_default_capture, build_engine, build_pipeline
from regseg.stream.cli import main
from regseg.stream.seg_prior import (
    SEG_FALLBACK_DEFAULT,
    fallback_applies,
    prior_applies,
    seg_fallback_mode,
)
from regseg.stream.serve.config import SESSION_KEYS
from regseg.stream.stats import StreamStats, format_summary
from regseg.stream.zmq_sink import result_header


class _Verdict:
    """An estimate check whose verdict is fixed (the real one's is tested in
    tests/stream/test_estimate_check.py): it takes nothing in and flags nothing."""

    def __init__(self, status: str) -> None:
        self.status = status

    def enter(self, *args, **kwargs):
        return ()

    def info(self):
        return {"status": self.status}


def test_the_fallback_applies_only_after_a_failed_check_and_where_gated_would_pool():
    assert fallback_applies("mri", "failed", ())
    assert fallback_applies("mri", "failed", ("error_estimate",))
    assert fallback_applies("mri", "failed", ("estimate_unverified", "error_estimate"))
    for status in ("passed", "pending 3/12", None):
        assert not fallback_applies("mri", status, ())
    assert not fallback_applies(None, "failed", ())  # off
    for flag in ("lc2_unsupported", "jump", "out_of_plane", "disagreement", "no_gland"):
        assert not fallback_applies("mri", "failed", (flag,))
        # the same frames the gated prior leaves alone
        assert prior_applies("gated", (flag,)) == fallback_applies("mri", "failed", (flag,))
    assert SEG_FALLBACK_DEFAULT in ("mri", "off")
    assert seg_fallback_mode("off") is None and seg_fallback_mode("mri") == "mri"
    with pytest.raises(ValueError, match=r"seg_fallback 'maybe': expected one of \('mri', 'off'\)"):
        seg_fallback_mode("maybe")
    assert "seg-fallback" in SESSION_KEYS


@pytest.fixture(scope="module")
def case(tracked_still):
    return tracked_still(3103, 5, (100, 104, 108))  # a calibration phantom, not an evaluation one


def _pipeline(case, fallback, status):
    context, _ = case
    pipeline = build_pipeline(context, build_engine(backend="eager", threads=1), deformable=None,
                              lc2="off", resegment="on", seg_fallback=fallback,
                              capture=build_default_capture(backend="eager", threads=1))
    if status is not None:
        pipeline.quality.self_check = _Verdict(status)
    return pipeline


def test_after_a_failed_check_the_registered_labels_are_published_and_the_checks_unchanged(case):
    _, frames = case
    off, failed = _pipeline(case, "off", "failed"), _pipeline(case, "mri", "failed")
    passed, pending = _pipeline(case, "mri", "passed"), _pipeline(case, "mri", "pending 2/12")
    stats = StreamStats()
    for frame in frames:
        a, b = off(frame), failed(frame)
        assert b.estimate_check == "failed" and b.flags == a.flags and not set(b.flags) - {
            "error_estimate"}  # frames of the training scanner at their true plane
        assert b.labels_source == "mri" and a.labels_source == "network+mri"
        assert np.array_equal(b.labels, b.warped_labels) and b.labels is not b.warped_labels
        assert (b.labels > 0).sum() > 1000
        # what the checks judged is the network's: the same as without the fallback
        assert b.quality == pytest.approx(a.quality) and b.error_mm == pytest.approx(a.error_mm)
        assert np.array_equal(a.mri_to_image, b.mri_to_image)
        assert np.array_equal(a.warped_labels, b.warped_labels)
        assert result_header(b)["labels_source"] == "mri"
        stats.add_trust(b.error_mm, b.flags, b.correction, b.labels_source)
        # a pass or no verdict yet: the gated prior as before
        for other in (passed(frame), pending(frame)):
            assert other.labels_source == "network+mri"
            assert np.array_equal(other.labels, a.labels)
    assert stats.summary()["labels_source"] == {"mri": len(frames)}
    assert f"published labels (frames): mri {len(frames)}" in format_summary(stats.summary())


def test_a_doubted_frame_keeps_the_networks_labels(case, monkeypatch):
    _, frames = case
    off, failed = _pipeline(case, "off", "failed"), _pipeline(case, "mri", "failed")
    for pipeline in (off, failed):  # an image-based check doubts every frame
        monkeypatch.setattr(pipeline, "quality_threshold", 1.01)  # agreement < 1.01: disagreement
    a, b = off(frames[0]), failed(frames[0])
    assert "disagreement" in b.flags and b.flags == a.flags
    assert a.labels_source == b.labels_source == "network"
    assert np.array_equal(a.labels, b.labels)


def test_the_fallback_needs_the_estimate_check(case, capsys):
    context, _ = case
    engine = build_engine(backend="eager", threads=1)
    with pytest.raises(ValueError, match="seg_fallback mri needs the estimate check"):
        build_pipeline(context, engine, deformable=None, lc2="off", seg_fallback="mri",
                       estimate_check="off")
    assert main(["--demo", "--seg-fallback", "mri", "--estimate-check", "off"]) == 2
    err = capsys.readouterr().err
    assert "--seg-fallback mri with --estimate-check off" in err and "Traceback" not in err
