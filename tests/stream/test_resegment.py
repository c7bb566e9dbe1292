"""``--resegment`` (regseg.stream.chain.FrameChain.resegment, Pipeline(resegment=True)): the
segmentation runs once more with the MRI context resliced at the plane that is published, after
the image-based refinement and the temporal filter have moved it, and replaces the chain's."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from regseg import spatial
from regseg.lc2 import in_plane_move
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import ScannerConfig, SimulatedScanner
from regseg.stream.build import build_engine, build_pipeline
from regseg.stream.chain import RESEGMENT_DEFAULT, plane_matrices
from regseg.stream.cli_parser import build_parser
from regseg.stream.context import build_context
from regseg.stream.quality import seg_confidence
from regseg.stream.serve.config import SESSION_KEYS

STILL = dict(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
             out_of_plane_mm=0.0)


class ShiftStage:
    """A stand-in for the image-based refinement: moves every registered plane 4 mm in plane
    about the frame's centre (as if LC2 had found the tissue there)."""

    def __init__(self, shift_mm=(4.0, -3.0)):
        self.shift_mm = np.asarray(shift_mm)

    def __call__(self, pixels, image_to_mri, *, tracked=None):
        h, w = pixels.shape
        move = in_plane_move(self.shift_mm, 0.0, np.array([w / 2, h / 2]), (0.2, 0.2))
        return image_to_mri @ move, float(np.hypot(*self.shift_mm)), 3.0

    @staticmethod
    def unsupported(significance):
        return False

    @staticmethod
    def timings():  # the stage protocol's (Lc2Stage, Lc2Lagged): no extra timings
        return {}

    def close(self):  # the stage protocol's: nothing to end
        pass


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(3100)  # a calibration phantom: never an evaluation one
    context = build_context(phantom.mri, phantom.labels)
    scanner = SimulatedScanner(phantom, ScannerConfig(**STILL), seed=5)
    frame = scanner.frame(40)
    return context, dataclasses.replace(frame, image_to_reference=frame.truth.image_to_mri)


def labels_at(context, engine, pipeline, frame, image_to_mri):
    """The segmentation with the MRI context at ``image_to_mri``, made by hand."""
    chain = pipeline.chain(frame.pixels.shape)
    mats = torch.from_numpy(plane_matrices(context, image_to_mri, frame.pixels.shape,
                                           engine.size))
    with torch.inference_mode():
        inputs = chain.prepare(torch.from_numpy(frame.pixels), mats)
        logits = engine(*inputs)["logits"].clone()
    return chain.segment(logits).numpy(), seg_confidence(logits)


def test_labels_are_made_at_the_published_plane_not_the_networks(case, monkeypatch):
    context, frame = case
    engine = build_engine(backend="eager", threads=1)
    # (the labels as the segmentation made them: no --seg-prior, tests/stream/test_seg_prior.py)
    on = build_pipeline(context, engine, deformable=None, lc2=ShiftStage(), resegment="on",
                        seg_prior="off")
    off = build_pipeline(context, engine, deformable=None, lc2=ShiftStage(), resegment="off")
    r_off = off(frame)
    chain = on.chain(frame.pixels.shape)
    # with resegment the chain's own segmentation is not run at all
    monkeypatch.setattr(chain, "seg_logits",
                        lambda *a: (_ for _ in ()).throw(AssertionError("segmented twice")))
    r_on = on(frame)
    published = spatial.invert(r_on.mri_to_image)
    assert np.allclose(published, spatial.invert(r_off.mri_to_image))  # same registration
    expected, confidence = labels_at(context, engine, on, frame, published)
    assert np.array_equal(r_on.labels, expected)
    assert r_on.seg_confidence == pytest.approx(confidence)
    assert r_on.timings_ms["resegment"] > 0 and "resegment" not in r_off.timings_ms
    # without it, the labels are the chain's: made at the plane the network started from (one
    # pass, no filter: the tracked plane); the 5 mm move of the context changes some of them
    assert np.array_equal(r_off.labels,
                          labels_at(context, engine, off, frame, frame.image_to_reference)[0])
    assert (r_on.labels != r_off.labels).any()
    assert math.isfinite(r_on.seg_confidence) and math.isfinite(r_off.seg_confidence)


def test_without_a_move_it_reproduces_the_chains_segmentation_closely(case):
    """No refinement, no filter, one network pass: the published plane is the network's own
    correction of the plane its logits were made at, so segmenting again there differs only
    by that correction (small on a frame tracked exactly)."""
    context, frame = case
    engine = build_engine(backend="eager", threads=1)
    from regseg.stream.capture import Capture

    on = build_pipeline(context, engine, deformable=None, lc2="off", resegment="on",
                        seg_prior="off", capture=Capture())
    off = build_pipeline(context, engine, deformable=None, lc2="off", resegment="off",
                         capture=Capture())
    a, b = on(frame).labels, off(frame).labels
    inter = np.count_nonzero((a > 0) & (b > 0))
    assert 2 * inter / (np.count_nonzero(a) + np.count_nonzero(b)) > 0.97


def test_modes_are_checked_and_reach_the_cli_and_serve(case):
    context, _ = case
    engine = build_engine(backend="eager", threads=1)
    assert RESEGMENT_DEFAULT in ("on", "off")
    with pytest.raises(ValueError, match="resegment 'maybe'"):
        build_pipeline(context, engine, deformable=None, lc2="off", resegment="maybe")
    default = build_pipeline(context, engine, deformable=None, lc2="off")
    assert default.resegment == (RESEGMENT_DEFAULT == "on")
    args = build_parser().parse_args(["--demo", "--resegment", "on"])
    assert args.resegment == "on"
    assert build_parser().parse_args(["--demo"]).resegment == RESEGMENT_DEFAULT
    assert "resegment" in SESSION_KEYS


def test_the_chain_skips_the_segmentation_unet_and_registers_the_same(case):
    """With resegment the chain's K = 2 passes all use the theta-only engine (the logits are
    made once, at the published plane): the registration is the one the full engine gives."""
    from regseg.stream.build import build_default_capture

    context, frame = case
    engine = build_engine(backend="eager", threads=1)
    results = {}
    for mode in ("off", "on"):
        capture = build_default_capture(backend="eager", threads=1)
        assert capture.refine_iterations == 2
        pipeline = build_pipeline(context, engine, deformable=None, lc2="off", resegment=mode,
                                  capture=capture)
        calls = []  # calls of the chain's full engine (with the segmentation U-Net)
        chain = pipeline.chain(frame.pixels.shape)
        chain.engine = lambda *a, _calls=calls: _calls.append(1) or engine(*a)
        results[mode] = (pipeline(frame), len(calls))
    (off, off_calls), (on, on_calls) = results["off"], results["on"]
    assert off_calls == 1  # the last of the chain's two passes
    assert on_calls == 1  # no chain pass: the one call segmenting at the published plane
    assert np.allclose(on.mri_to_image, off.mri_to_image, atol=1e-4)
