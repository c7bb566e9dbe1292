"""``--seg-window auto`` (regseg.stream.resegment.segment_published): the one segmentation pass at
the published plane runs on a window around the gland where that registration puts it; the
registration and the error estimate keep the whole view."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import ScannerConfig, SimulatedScanner
from regseg.stream.build import build_default_capture, build_engine, build_pipeline
from regseg.stream.chain import plane_matrices
from regseg.stream.cli_parser import build_parser
from regseg.stream.context import build_context
from regseg.stream.resegment import SEG_WINDOW_DEFAULT
from regseg.stream.roi import GlandRoi
from regseg.stream.serve.config import SESSION_KEYS
from regseg.types import Frame

STILL = dict(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
             out_of_plane_mm=0.0)


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(3102)  # a calibration phantom: never an evaluation one
    context = build_context(phantom.mri, phantom.labels)
    wide = SimulatedScanner(phantom, ScannerConfig(frame_hw=(320, 384), pixel_mm=0.22, **STILL),
                            seed=4)
    plain = SimulatedScanner(phantom, ScannerConfig(**STILL), seed=4)

    def tracked(scanner, index) -> Frame:
        f = scanner.frame(index)
        return dataclasses.replace(f, image_to_reference=f.truth.image_to_mri)

    return context, [tracked(wide, i) for i in (100, 104)], tracked(plain, 100)


def pipelines(context, **options):
    """off vs auto, both without --seg-prior (refused with a window; its default is off there)."""
    engine = build_engine(backend="eager", threads=1)
    return {mode: build_pipeline(context, engine, deformable=None, lc2="off", resegment="on",
                                 seg_window=mode, seg_prior="off",
                                 capture=build_default_capture(backend="eager", threads=1),
                                 **options)
            for mode in ("off", "auto")}


def test_only_the_segmentation_changes_and_it_is_made_on_the_window(case):
    context, frames, _ = case
    p = pipelines(context)
    for frame in frames:
        off, auto = p["off"](frame), p["auto"](frame)
        # the registration, the estimate and what it is made from: the whole view's
        assert np.array_equal(off.mri_to_image, auto.mri_to_image)
        assert np.array_equal(off.warped_labels, auto.warped_labels)
        assert auto.error_mm == pytest.approx(off.error_mm)
        published = np.linalg.inv(auto.mri_to_image)
        window = GlandRoi(context).window(frame, published)
        assert window is not None and window.width < frame.pixels.shape[1]
        rows, cols = window.rows_cols()
        outside = np.ones(frame.pixels.shape, bool)
        outside[rows, cols] = False
        assert not auto.labels[outside].any()  # nothing labelled outside the window
        # inside: the segmentation of the cut frame with the MRI context at its plane
        pixels = np.ascontiguousarray(frame.pixels[rows, cols])
        chain = p["auto"].chain(pixels.shape)
        mats = torch.from_numpy(plane_matrices(context, published @ window.shift(),
                                               pixels.shape, p["auto"].engine.size))
        with torch.inference_mode():
            expected = chain.segment(chain.resegment(torch.from_numpy(pixels), mats)).numpy()
        assert np.array_equal(auto.labels[rows, cols], expected)
        assert (auto.labels > 0).sum() > 1000 and (auto.labels != off.labels).any()


def test_a_view_not_wider_than_the_window_is_segmented_whole(case):
    context, _, plain = case  # family A's own 51 mm view: never cut
    p = pipelines(context)
    assert np.array_equal(p["off"](plain).labels, p["auto"](plain).labels)


def test_modes_are_checked_and_reach_the_cli_and_serve(case):
    context, _, _ = case
    engine = build_engine(backend="eager", threads=1)
    with pytest.raises(ValueError, match="seg_window 'maybe'"):
        build_pipeline(context, engine, deformable=None, lc2="off", seg_window="maybe")
    with pytest.raises(ValueError, match="seg_window needs resegment on"):
        build_pipeline(context, engine, deformable=None, lc2="off", resegment="off",
                       seg_window="auto")
    assert build_parser().parse_args(["--demo", "--seg-window", "auto"]).seg_window == "auto"
    assert build_parser().parse_args(["--demo"]).seg_window == SEG_WINDOW_DEFAULT
    assert "seg-window" in SESSION_KEYS
