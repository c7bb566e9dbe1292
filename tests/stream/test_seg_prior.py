"""``--seg-prior on`` (regseg.stream.seg_prior): the segmentation's logits pooled with the MRI
labels through the registration, as experts; what is published changes, what the flags judge (the
network's own labels) does not."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from regseg.planes import model_grid_labels
from regseg.stream.build import build_default_capture, build_engine, build_pipeline
from regseg.stream.cli_parser import build_parser
from regseg.stream.quality import agreement
from regseg.stream.seg_prior import (
    SEG_PRIOR_DEFAULT,
    displaced_probability,
    fuse,
    prior_applies,
    prior_log_probs,
)
from regseg.stream.serve.config import SESSION_KEYS
from regseg.stream.stats import StreamStats, format_summary
from regseg.stream.zmq_sink import result_header
from regseg.types import LESION


def _labels(h=200, w=300):
    labels = np.zeros((h, w), np.uint8)
    labels[50:150, 60:240] = 1
    labels[80:110, 120:160] = LESION
    return labels


def test_a_straight_edge_is_blurred_to_the_normal_cdf_of_its_distance():
    mask = np.zeros((64, 200), bool)
    mask[:, 100:] = True  # the edge between columns 99 and 100
    spacing, sigma = (0.3, 0.2), 1.5
    p = displaced_probability(mask, spacing, sigma, eps=0.0)[32]
    for col in (90, 97, 99, 100, 103, 110):
        d_mm = (col - 99.5) * spacing[1]
        assert p[col] == pytest.approx(0.5 * (1 + math.erf(d_mm / sigma / math.sqrt(2))),
                                       abs=0.01)
    floored = displaced_probability(mask, spacing, sigma, eps=0.05)[32]
    assert floored.min() == pytest.approx(0.05, abs=1e-4)
    assert floored.max() == pytest.approx(0.95, abs=1e-4)


def test_the_prior_is_a_distribution_bounded_by_eps():
    labels = _labels()
    lp = prior_log_probs(labels, (64, 96), (0.25, 0.25), sigma_mm=1.5, eps=0.05)
    assert lp.shape == (3, 64, 96) and lp.dtype == np.float32
    assert np.allclose(np.exp(lp).sum(0), 1.0, atol=1e-5)
    odds = lp[1] - lp[0]  # prostate vs background: bounded either way
    assert odds.max() < math.log(0.95 * 0.95 / 0.05) + 1e-3
    assert odds.min() > math.log(0.05 * 0.95 / 0.95) - 1e-3
    grid = model_grid_labels(labels, (64, 96))
    assert (lp.argmax(0) == grid).mean() > 0.97  # alone, the prior is the MRI labels
    empty = prior_log_probs(np.zeros_like(labels), (64, 96), (0.25, 0.25))
    assert (empty.argmax(0) == 0).all()


def test_a_confident_network_keeps_its_answer_and_an_unsure_one_takes_the_mri():
    labels = _labels()
    size = (64, 96)
    grid = model_grid_labels(labels, size)
    unsure = torch.zeros(1, 3, *size)  # (any net_weight: zero logits stay zero)
    pooled = fuse(unsure, labels, (0.25, 0.25)).argmax(1)[0].numpy()
    assert (pooled == grid).mean() > 0.97
    sure = torch.zeros(1, 3, *size)
    sure[0, 0] = 10.0  # the network is sure there is no gland anywhere
    assert (fuse(sure, labels, (0.25, 0.25)).argmax(1) == 0).all()
    before = sure.clone()
    fuse(sure, labels, (0.25, 0.25))
    assert torch.equal(sure, before)  # the logits are not changed in place


def test_gated_pools_only_where_no_image_based_flag_doubts_the_registration():
    assert prior_applies("on", ("lc2_unsupported", "jump"))  # on: always
    assert not prior_applies(None, ())  # off
    assert prior_applies("gated", ()) and prior_applies("gated", ("error_estimate",))
    for flag in ("lc2_unsupported", "jump", "out_of_plane", "disagreement"):
        assert not prior_applies("gated", (flag,))
        assert not prior_applies("gated", ("error_estimate", flag))


@pytest.fixture(scope="module")
def case(tracked_still):
    return tracked_still(3103, 5, (100, 104))  # a calibration phantom: never an evaluation one


def test_the_published_labels_are_pooled_and_the_checks_see_the_networks(case):
    context, frames = case
    engine = build_engine(backend="eager", threads=1)

    def pipeline(mode):
        return build_pipeline(context, engine, deformable=None, lc2="off", resegment="on",
                              seg_prior=mode,
                              capture=build_default_capture(backend="eager", threads=1))

    off, on, gated = pipeline("off"), pipeline("on"), pipeline("gated")
    stats = StreamStats()
    assert not off.seg_prior and on.seg_prior == "on" and gated.seg_prior == "gated"
    for frame in frames:
        a, b, c = off(frame), on(frame), gated(frame)
        assert c.error_mm == pytest.approx(a.error_mm) and c.flags == a.flags
        # gated: pooled as `on` while no image-based flag doubts the frame, else the network's
        same = b if prior_applies("gated", c.flags) else a
        assert np.array_equal(c.labels, same.labels)
        assert ("seg_prior" in c.timings_ms) == prior_applies("gated", c.flags)
        # what the labels are is said per frame: in the Result, the ZeroMQ header, the stats
        assert a.labels_source == "network" and b.labels_source == "network+mri"
        assert c.labels_source == same.labels_source
        assert result_header(b)["labels_source"] == "network+mri"
        stats.add_trust(b.error_mm, b.flags, b.correction, b.labels_source)
        assert np.array_equal(a.mri_to_image, b.mri_to_image)
        assert np.array_equal(a.warped_labels, b.warped_labels)
        assert b.error_mm == pytest.approx(a.error_mm) and b.flags == a.flags
        assert b.quality == pytest.approx(a.quality)  # the network's labels vs the MRI's
        assert b.quality == pytest.approx(agreement(b.warped_labels > 0, a.labels > 0))
        assert "seg_prior" in b.timings_ms and "seg_prior" not in a.timings_ms
        assert (b.labels > 0).sum() > 1000
        # pooled: at least as close to the registered MRI labels as the network alone
        assert (agreement(b.warped_labels > 0, b.labels > 0)
                >= agreement(a.warped_labels > 0, a.labels > 0) - 1e-9)
    assert StreamStats().summary().get("labels_source") is None
    assert stats.summary()["labels_source"] == {"network+mri": len(frames)}
    assert f"published labels (frames): network+mri {len(frames)}" in format_summary(
        stats.summary())


def test_no_labels_are_published_on_a_frame_without_ultrasound(case):
    context, frames = case
    engine = build_engine(backend="eager", threads=1)
    on = build_pipeline(context, engine, deformable=None, lc2="off", resegment="on",
                        seg_prior="on", capture=build_default_capture(backend="eager", threads=1))
    black = dataclasses.replace(frames[0], pixels=np.zeros_like(frames[0].pixels))
    result = on(black)
    assert result.flagged and not result.labels.any()  # the MRI labels alone are not a frame's
    assert result.labels_source == "withheld"


def test_the_prior_needs_resegment_without_a_window_and_is_a_flag_everywhere(case):
    context, _ = case
    engine = build_engine(backend="eager", threads=1)
    with pytest.raises(ValueError, match="seg_prior needs resegment on and seg_window off"):
        build_pipeline(context, engine, deformable=None, lc2="off", resegment="off",
                       seg_prior="on")
    with pytest.raises(ValueError, match="seg_prior needs resegment on and seg_window off"):
        build_pipeline(context, engine, deformable=None, lc2="off", resegment="on",
                       seg_window="auto", seg_prior="on")
    with pytest.raises(ValueError, match="seg_prior 'maybe'"):
        build_pipeline(context, engine, deformable=None, lc2="off", seg_prior="maybe")
    # the default: gated (addendum 18) where the segmentation it pools with runs, else off --
    # so --resegment off or --seg-window auto alone is not an error
    assert SEG_PRIOR_DEFAULT == "gated"
    assert build_parser().parse_args(["--demo"]).seg_prior == "default"
    assert build_pipeline(context, engine, deformable=None, lc2="off",
                          resegment="on").seg_prior == "gated"
    assert build_pipeline(context, engine, deformable=None, lc2="off",
                          resegment="off").seg_prior is None
    assert build_pipeline(context, engine, deformable=None, lc2="off", resegment="on",
                          seg_window="auto").seg_prior is None
    assert "seg-prior" in SESSION_KEYS
