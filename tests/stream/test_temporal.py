"""Where the temporal filter measures a frame's jump (regseg.stream.temporal): over the frame, or
over the MRI gland's pixels (``--jump-at gland``, :class:`GlandPoints`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regseg import spatial
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.capture import Capture
from regseg.stream.context import build_context
from regseg.stream.temporal import GlandPoints, TemporalFilter
from regseg.types import Frame

HW = (256, 256)
SPACING = (0.2, 0.2)


def _rotation_about(centre_ij, deg: float) -> np.ndarray:
    """(3, 3) frame-pixel rotation by ``deg`` about pixel ``centre_ij`` (square pixels)."""
    a = math.radians(deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.asarray(centre_ij, np.float64)
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = r, c - r @ c
    return m


def test_a_rotation_about_the_gland_jumps_at_the_corners_not_at_the_gland():
    centre = (128.0, 160.0)
    gland = np.array([[centre[0] + dx, centre[1] + dy] for dx in (-20, 0, 20)
                      for dy in (-20, 0, 20)], np.float64)  # +-4 mm around the centre
    jumps = {}
    for where, points in (("frame", None), ("gland", gland)):
        f = TemporalFilter(window=5)
        f.prior(np.eye(4), HW, 0.0)
        f.update(np.eye(4), np.eye(3), HW, SPACING, 0.0)
        f.prior(np.eye(4), HW, 0.033)
        _, jumps[where] = f.update(np.eye(4), _rotation_about(centre, 12.0), HW, SPACING, 0.033,
                                   points_ij=points)
    # the frame's points are 10-36 mm from the centre: 12 deg moves them ~5 mm on average;
    # the gland's are within 5.7 mm of it: under 1 mm
    assert jumps["frame"] > 3.0
    assert jumps["gland"] < 1.0
    # a translation moves every point alike: the same jump wherever it is measured
    for points in (None, gland, np.empty((0, 2))):
        f = TemporalFilter(window=5)
        f.update(np.eye(4), np.eye(3), HW, SPACING, 0.0)
        t = np.eye(3)
        t[:2, 2] = (15.0, -20.0)  # 3 mm, -4 mm
        _, jump = f.update(np.eye(4), t, HW, SPACING, 0.033, points_ij=points)
        assert jump == pytest.approx(5.0)


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(0)
    frame = SimulatedScanner(phantom, seed=0).frame(0)
    return build_context(phantom.mri, phantom.labels), frame


def test_gland_points_lie_on_the_gland_the_plane_shows(case):
    context, frame = case
    truth = frame.truth
    assert (truth.labels > 0).sum() > 1000  # the frame shows the gland
    points = GlandPoints(context)(truth.image_to_mri, frame.pixels.shape, frame.spacing_mm)
    assert points is not None and len(points) >= 50
    i, j = points[:, 0].astype(int), points[:, 1].astype(int)
    assert (0 <= i).all() and (i < frame.pixels.shape[1]).all()
    assert (0 <= j).all() and (j < frame.pixels.shape[0]).all()
    # the MRI labels through the true plane vs the frame's true labels (tissue moved a little)
    assert np.mean(truth.labels[j, i] > 0) > 0.9
    # a lattice of about 2 mm: neighbouring points 2 mm apart
    steps = np.diff(np.unique(points[:, 0])) * frame.spacing_mm[1]
    assert steps.min() == pytest.approx(2.0, abs=0.25)
    # a plane 60 mm along its normal from the gland shows none: None (measure over the frame)
    away = truth.image_to_mri.copy()
    normal = np.cross(away[:3, 0], away[:3, 1])
    away[:3, 3] += 60.0 * normal / np.linalg.norm(normal)
    assert GlandPoints(context)(away, frame.pixels.shape, frame.spacing_mm) is None


def test_capture_measures_the_jump_where_its_jump_points_say(case):
    context, frame = case
    tracked = frame.truth.image_to_mri
    ij = GlandPoints(context)(tracked, frame.pixels.shape, frame.spacing_mm)
    centre = ij.mean(0)

    def frame_at(ms: int) -> Frame:
        return Frame(seq=ms, acquired_ns=ms * 1_000_000, pixels=frame.pixels,
                     spacing_mm=frame.spacing_mm, image_to_reference=np.eye(4))

    jumps, published = {}, {}
    for where, points in (("frame", None), ("gland", GlandPoints(context))):
        cap = Capture(temporal=TemporalFilter(window=5), jump_points=points)
        cap.finish(frame_at(0), tracked, tracked)
        published[where], jumps[where] = cap.finish(
            frame_at(33), tracked, tracked @ spatial.lift_2d(_rotation_about(centre, 12.0)))
    # 12 deg about the gland centre: its pixels (within ~15 mm) move ~2 mm, the frame ~5 mm
    assert jumps["frame"] > 3.0 > jumps["gland"]
    assert jumps["gland"] < 0.6 * jumps["frame"]
    # where the jump is measured changes nothing that is published
    assert np.array_equal(published["frame"], published["gland"])


def test_build_pipeline_sets_where_the_jump_is_measured(case):
    from regseg.stream.build import build_pipeline

    context, _ = case

    class Engine:  # build_pipeline only stores the engine
        device = __import__("torch").device("cpu")

    from regseg.stream.temporal import JUMP_AT_DEFAULT

    default = GlandPoints if JUMP_AT_DEFAULT == "gland" else type(None)
    for mode, kind in (("gland", GlandPoints), ("frame", type(None)), ("default", default)):
        cap = Capture(temporal=TemporalFilter())
        build_pipeline(context, Engine(), capture=cap, jump_at=mode, lc2="off")
        assert isinstance(cap.jump_points, kind)
    with pytest.raises(ValueError, match="jump_at 'corners'"):
        build_pipeline(context, Engine(), capture=Capture(), jump_at="corners", lc2="off")
