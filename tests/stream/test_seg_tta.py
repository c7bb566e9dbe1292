"""``--seg-tta flip`` (regseg.stream.resegment): the segmentation at the published plane is also run
on the frame's mirror image, with the MRI context mirrored alike, and the two are averaged; the
registration and the error estimate do not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regseg import spatial
from regseg.stream.build import build_default_capture, build_engine, build_pipeline
from regseg.stream.chain import plane_matrices
from regseg.stream.cli_parser import build_parser
from regseg.stream.resegment import SEG_TTA_DEFAULT, mirrored
from regseg.stream.serve.config import SESSION_KEYS


@pytest.fixture(scope="module")
def case(tracked_still):
    return tracked_still(3102, 4, (100, 104))  # a calibration phantom: never an evaluation one


def test_the_mirror_shows_the_same_mri_at_the_mirrored_pixels(case):
    context, frames = case
    frame = frames[0]
    plane = frame.truth.image_to_mri
    pixels, mplane = mirrored(frame.pixels, plane)
    h, w = frame.pixels.shape
    assert np.array_equal(pixels, frame.pixels[:, ::-1]) and pixels.flags.c_contiguous
    for i, j in ((0, 0), (17, 40), (w - 1, h - 1)):
        a = spatial.apply(plane, np.array([[w - 1 - i, j, 0.0]]))
        b = spatial.apply(mplane, np.array([[i, j, 0.0]]))
        assert np.allclose(a, b)
    # the MRI context on the network's grid: the mirror's is the frame's, columns reversed
    size = (64, 64)
    m0 = torch.from_numpy(plane_matrices(context, plane, (h, w), size))[1]
    m1 = torch.from_numpy(plane_matrices(context, mplane, (h, w), size))[1]
    axes = spatial.pixel_axes(*size)
    g0, g1 = spatial.axes_grid(m0, *axes), spatial.axes_grid(m1, *axes)
    assert torch.allclose(g1, g0.flip(1), atol=1e-5)


def test_flip_averages_two_passes_and_changes_nothing_else(case, monkeypatch):
    context, frames = case
    engine = build_engine(backend="eager", threads=1)

    def pipeline(mode):
        return build_pipeline(context, engine, deformable=None, lc2="off", resegment="on",
                              seg_tta=mode,
                              capture=build_default_capture(backend="eager", threads=1))

    off, flip = pipeline("off"), pipeline("flip")
    assert not off.seg_tta and flip.seg_tta
    for frame in frames:
        calls = []
        chain = flip.chain(frame.pixels.shape)
        original = chain.resegment
        monkeypatch.setattr(chain, "resegment",
                            lambda pixels, mats, calls=calls, original=original:
                            calls.append(pixels) or original(pixels, mats))
        a, b = off(frame), flip(frame)
        assert len(calls) == 2  # the frame, then its mirror
        assert torch.equal(calls[1], calls[0].flip(-1))
        assert np.array_equal(a.mri_to_image, b.mri_to_image)
        assert np.array_equal(a.warped_labels, b.warped_labels)
        assert b.error_mm == pytest.approx(a.error_mm)
        assert (b.labels > 0).sum() > 1000 and not np.array_equal(a.labels, b.labels)
        monkeypatch.undo()


def test_the_mirror_pass_needs_resegment_and_is_a_flag_everywhere(case):
    context, _ = case
    engine = build_engine(backend="eager", threads=1)
    with pytest.raises(ValueError, match="seg_tta needs resegment on"):
        build_pipeline(context, engine, deformable=None, lc2="off", resegment="off",
                       seg_tta="flip")
    with pytest.raises(ValueError, match="seg_tta 'twice'"):
        build_pipeline(context, engine, deformable=None, lc2="off", seg_tta="twice")
    assert build_parser().parse_args(["--demo"]).seg_tta == SEG_TTA_DEFAULT
    assert "seg-tta" in SESSION_KEYS


def test_an_engine_that_reuses_its_output_buffer_still_averages_the_two_passes(case, monkeypatch):
    """ONNX Runtime's bound outputs are one buffer per engine: the first pass's logits must be
    copied before the mirror pass overwrites them."""
    context, frames = case
    engine = build_engine(backend="eager", threads=1)
    flip = build_pipeline(context, engine, deformable=None, lc2="off", resegment="on",
                          seg_tta="flip",
                          capture=build_default_capture(backend="eager", threads=1))
    frame = frames[0]
    chain = flip.chain(frame.pixels.shape)
    original = chain.resegment
    honest = flip(frame).labels
    buffer = {}

    def reusing(pixels, mats):  # the same tensor object back every call
        out = original(pixels, mats)
        if "out" not in buffer:
            buffer["out"] = out.clone()
        else:
            buffer["out"].copy_(out)
        return buffer["out"]

    monkeypatch.setattr(chain, "resegment", reusing)
    flip.capture.temporal.reset()
    assert np.array_equal(flip(frame).labels, honest)
