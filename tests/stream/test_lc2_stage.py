"""The image-based refinement in the live chain (``--lc2``, regseg.stream.lc2_stage): it turns
about the MRI gland, runs before the temporal filter, is timed and reported per frame, and its
chain has a QualityNet calibration key of its own."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from regseg import metrics, spatial
from regseg.lc2 import in_plane_move
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import ScannerConfig, SimulatedScanner
from regseg.stream.build import build_default_capture, build_engine, build_pipeline
from regseg.stream.context import build_context
from regseg.stream.lc2_stage import (
    BENCH_MODES,
    LC2_DEFAULT,
    LC2_MODES,
    Lc2Stage,
    build_lc2,
)
from regseg.stream.quality import pipeline_chain
from regseg.train.quality_chain import chain_lc2, parse_chain

STILL = dict(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
             out_of_plane_mm=0.0)


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(3100)  # a calibration phantom: never an evaluation one
    return phantom, build_context(phantom.mri, phantom.labels)


def test_modes_and_the_centre_it_turns_about(case):
    _, context = case
    assert LC2_DEFAULT in LC2_MODES and build_lc2(context, "off") is None
    with pytest.raises(ValueError, match="lc2 'maybe'"):
        build_lc2(context, "maybe")
    stage = build_lc2(context, "on")
    assert isinstance(stage, Lc2Stage)
    # every user mode reslices each candidate from the volume (the plane slice failed its rule);
    # the bench modes that compare the two are not --lc2 choices
    assert not any(build_lc2(context, m).config.plane_slice for m in ("on", "warm", "fast"))
    assert build_lc2(context, "on-slice").config.plane_slice
    assert not build_lc2(context, "on-volume").config.plane_slice
    assert not set(BENCH_MODES) & set(LC2_MODES)
    # the six-parameter search (a bench mode: not shipped by its rule): more rounds, same guard
    six = build_lc2(context, "six")
    assert six.config.out_of_plane and six.config.max_rounds == 40 and not six.warm
    assert not any(build_lc2(context, m).config.out_of_plane for m in ("on", "warm", "fast"))
    # the MRI gland's centre, projected onto a plane through it, lands where the plane puts it
    plane = np.eye(4)
    plane[:3, 0], plane[:3, 1] = [0.2, 0, 0], [0, 0.2, 0]
    plane[:3, 3] = stage.centre_mri - [0.2 * 50, 0.2 * 70, 0]
    assert np.allclose(stage.centre_ij(plane), [50.0, 70.0])


def test_chain_key_names_the_refinement():
    assert parse_chain("K2/deformable-on/multi-start-off/lc2-on") == (2, True, False)
    assert chain_lc2("K2/deformable-on/multi-start-off/lc2-on")
    assert not chain_lc2("K2/deformable-on/multi-start-off")
    with pytest.raises(Exception, match="lc2-on"):
        parse_chain("K2/deformable-on/multi-start-off/lc2-off")


def test_pipeline_with_lc2_reports_it_and_keeps_a_good_registration(case):
    """Frames tracked 2 mm / 2 deg off in plane (about the gland), which the network alone
    corrects on this scanner: with the refinement after it the published planes stay within
    1 mm of the truth over the gland; the stage is timed and says how far it moved the gland.
    (That it corrects what the network does not is measured in bench/lc2.py and
    tests/test_lc2.py.)"""
    phantom, context = case
    engine = build_engine(backend="eager", threads=1)
    pipeline = build_pipeline(context, engine, deformable=None, lc2="on",
                              capture=build_default_capture(backend="eager", threads=1))
    assert pipeline_chain(pipeline).endswith("/lc2-on")
    scanner = SimulatedScanner(phantom, ScannerConfig(**STILL), seed=3)
    moved, tres = 0, []
    for index in (30, 34, 38):
        frame = scanner.frame(index)
        gland = np.argwhere(frame.truth.labels > 0)[:, ::-1]
        error = in_plane_move(np.array([2.0, -1.0]), 2.0, gland.mean(0), frame.spacing_mm[::-1])
        frame = dataclasses.replace(frame, image_to_reference=frame.truth.image_to_mri @ error)
        assert metrics.tre_mm(frame.image_to_reference, frame.truth.image_to_mri, gland) > 2.0
        result = pipeline(frame)
        assert result.timings_ms["lc2"] > 0
        tres.append(metrics.tre_mm(spatial.invert(result.mri_to_image),
                                   frame.truth.image_to_mri, gland))
        moved += math.isfinite(result.lc2_move_mm)
        assert not math.isfinite(result.lc2_move_mm) or 0 < result.lc2_move_mm <= 8.0
        assert math.isfinite(result.lc2_significance)  # reported whether applied or not
    assert max(tres) < 1.0, tres
    assert moved >= 1  # the refinement applied a move on at least one frame


def test_warm_mode_starts_from_the_previous_move_and_forgets_it_on_a_new_frame_size(case,
                                                                                      monkeypatch):
    from regseg import lc2 as lc2_module
    from regseg.stream import lc2_stage

    _, context = case
    seen = []
    real = lc2_module.refine_in_plane

    def spy(*args, warm=None, **kwargs):
        seen.append(None if warm is None else np.array(warm))
        return real(*args, warm=warm, **kwargs)

    monkeypatch.setattr(lc2_stage, "refine_in_plane", spy)
    phantom = make_phantom(3100)
    frame = SimulatedScanner(phantom, ScannerConfig(**STILL), seed=3).frame(30)
    gland = np.argwhere(frame.truth.labels > 0)[:, ::-1]
    wrong = frame.truth.image_to_mri @ in_plane_move(np.array([1.5, 0.0]), 0.0, gland.mean(0),
                                                     frame.spacing_mm[::-1])
    stage = build_lc2(context, "warm")
    _, moved, significance = stage(frame.pixels, wrong)
    assert math.isfinite(moved)  # a 1.5 mm error: a move is applied and remembered
    assert significance >= stage.config.min_significance
    stage(frame.pixels, wrong)
    assert seen[0] is None and seen[1] is not None and np.hypot(*seen[1][:2]) > 0.5
    stage(frame.pixels[:200], wrong)  # another frame size: no start from the old move
    assert seen[2] is None
    cold = build_lc2(context, "on")
    cold(frame.pixels, wrong)
    cold(frame.pixels, wrong)
    assert seen[3] is None and seen[4] is None


def test_a_refinement_without_support_flags_the_frame(case, monkeypatch):
    """A frame whose refinement is not significant (its LC2 is not 1.5 x that of the MRI
    displaced 12 mm) is flagged lc2_unsupported, published as no truth; a significant one or one
    not computed is not; the flag can be turned off (the comparison run of its rule)."""
    from regseg import lc2 as lc2_module
    from regseg.stream import lc2_stage

    phantom, context = case
    significance = {"value": 1.2}
    real = lc2_module.refine_in_plane

    def fixed(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), significance=significance["value"])

    monkeypatch.setattr(lc2_stage, "refine_in_plane", fixed)
    engine = build_engine(backend="eager", threads=1)
    pipeline = build_pipeline(context, engine, deformable=None, lc2="on",
                              capture=build_default_capture(backend="eager", threads=1))
    frame = SimulatedScanner(phantom, ScannerConfig(**STILL), seed=3).frame(30)
    low = pipeline(frame)
    assert "lc2_unsupported" in low.flags and low.flagged and low.lc2_significance == 1.2
    significance["value"] = 2.0
    high = pipeline(frame)
    assert "lc2_unsupported" not in high.flags
    significance["value"] = math.nan  # not computed (guard off): never a flag
    assert "lc2_unsupported" not in pipeline(frame).flags
    significance["value"] = 1.2
    pipeline.lc2.flag_unsupported = False
    assert "lc2_unsupported" not in pipeline(frame).flags
