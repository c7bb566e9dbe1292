"""--lc2-hold (regseg.stream.lc2_stage.Lc2Stage.hold): a significant LC2 move over the 8 mm cap is
applied only when it keeps the correction of the tracked pose the previous refinement applied, and
the tracked plane did not jump; a first lock still needs the cap. On a family-B case whose network
plane drifts away from the anatomy, the chain keeps the registration it had instead of falling
8-11 mm off. --lc2-rescue (Lc2Stage.rescue): a search that applied nothing runs again from other
starts, and on a family-B case whose network plane sits outside LC2's basin it finds the anatomy."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from regseg import spatial
from regseg.lc2 import Lc2Refinement, in_plane_move
from regseg.stream.build import build_default_capture, build_engine, build_pipeline
from regseg.stream.context import build_context
from regseg.stream.lc2_stage import (
    HOLD_MM,
    RESCUE_MM,
    Held,
    Lc2Stage,
    build_lc2,
    held_by,
    move_params,
)
from regseg.stream.runner import frame_accuracy

SHAPE = (120, 160)
SPACING = 0.3


def _plane(shift_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    plane = np.diag([SPACING, SPACING, SPACING, 1.0])
    plane[:3, 3] = np.asarray(shift_mm, np.float64) + (-20.0, -15.0, 0.0)
    return plane


@pytest.fixture(scope="module")
def stage():
    from regseg.sim.phantom import make_phantom

    phantom = make_phantom(3100)  # a calibration phantom: never an evaluation one
    return Lc2Stage(build_context(phantom.mri, phantom.labels), hold_mm=HOLD_MM)


def _found(stage, network, shift=(9.0, 0.0), significance=2.5, applied=False):
    """What refine_in_plane returns for a move over the cap (not applied)."""
    move = float(np.hypot(*shift))
    return Lc2Refinement(image_to_mri=network, score_start=0.1, score=0.1,
                         shift_mm=shift, rotation_deg=0.0, move_mm=move, rounds=5,
                         applied=applied, significance=significance)


def _moved(stage, network, shift):
    return network @ in_plane_move(np.asarray(shift), 0.0, stage.centre_ij(network),
                                   (SPACING, SPACING))


def _held_at(stage, tracked, network, shift):
    """The previous refinement's record, whose correction puts ``network`` moved by ``shift``."""
    return Held(SHAPE, tracked, spatial.invert(tracked) @ _moved(stage, network, shift))


def test_a_move_over_the_cap_is_held_when_it_keeps_the_previous_correction(stage):
    tracked, network = _plane(), _plane((1.0, 0.5, 0.0))
    found = _found(stage, network)
    assert found.move_mm > stage.config.max_move_mm and not found.applied
    held = stage.hold(found, SHAPE, network, tracked, _held_at(stage, tracked, network, (8.5, 0)))
    assert held.applied and held.move_mm > stage.config.max_move_mm  # applied over the cap
    assert np.allclose(held.image_to_mri, _moved(stage, network, (9.0, 0.0)))
    assert held.move_mm == found.move_mm and held.significance == found.significance


@pytest.mark.parametrize("case", ["far", "insignificant", "view_change", "shape", "applied",
                                  "under_cap"])
def test_what_is_not_held(stage, case):
    tracked, network = _plane(), _plane((1.0, 0.5, 0.0))
    found = _found(stage, network, significance=1.2 if case == "insignificant" else 2.5,
                   shift=(5.0, 0.0) if case == "under_cap" else (9.0, 0.0))
    held = _held_at(stage, tracked, network, (9.0 - (HOLD_MM + 1.0) if case == "far" else 8.5, 0))
    if case == "shape":
        held = dataclasses.replace(held, shape=(SHAPE[0] + 1, SHAPE[1]))
    if case == "applied":
        found = dataclasses.replace(found, applied=True)
    now = _plane((0.0, 6.0, 0.0)) if case == "view_change" else tracked  # the probe jumped 6 mm
    out = stage.hold(found, SHAPE, network, now, held)
    assert out is found  # unchanged: not applied by the hold


def test_held_by_records_the_correction_of_the_tracked_pose(stage):
    tracked, network = _plane(), _plane((1.0, 0.5, 0.0))
    refined = _moved(stage, network, (3.0, 1.0))
    found = dataclasses.replace(_found(stage, network, (3.0, 1.0)), image_to_mri=refined,
                                applied=True)
    held = held_by(found, SHAPE, tracked)
    assert np.allclose(tracked @ held.correction, refined) and held.shape == SHAPE
    assert held_by(found, SHAPE, None) is None
    assert held_by(dataclasses.replace(found, applied=False), SHAPE, tracked) is None


def test_modes_and_bad_values(stage):
    context = stage.context
    assert build_lc2(context, "on").hold_mm == 0.0  # off by default
    assert build_lc2(context, "on", "on").hold_mm == HOLD_MM
    assert build_lc2(context, "lag", "on").stage.hold_mm == HOLD_MM
    with pytest.raises(ValueError, match="lc2 hold 'maybe'"):
        build_lc2(context, "on", "maybe")
    with pytest.raises(ValueError, match="hold_mm"):
        Lc2Stage(context, hold_mm=math.nan)


def test_move_params_inverts_the_in_plane_move():
    centre, spacing = np.array([50.0, 40.0]), (0.3, 0.45)
    for shift, angle in (((2.0, -3.5), 7.0), ((-9.0, 0.5), -12.0), ((0.0, 0.0), 0.0)):
        move = in_plane_move(np.array(shift), angle, centre, spacing)
        assert np.allclose(move_params(move, centre, spacing), [*shift, angle], atol=1e-9)


def test_rescue_modes_and_bad_values(stage):
    context = stage.context
    assert build_lc2(context, "on").rescue_mm == 0.0  # off by default
    assert build_lc2(context, "lag", "on", "on").stage.rescue_mm == RESCUE_MM
    with pytest.raises(ValueError, match="rescue"):
        build_lc2(context, "warm", "off", "on")
    with pytest.raises(ValueError, match="lc2 rescue 'yes'"):
        build_lc2(context, "on", "off", "yes")
    with pytest.raises(ValueError, match="rescue_mm"):
        Lc2Stage(context, rescue_mm=-1.0)


def _family_b_run(hold: str, frames, context, rescue: str = "off"):
    pipeline = build_pipeline(context, build_engine(backend="eager", threads=1), deformable=None,
                              lc2="lag", lc2_hold=hold, lc2_rescue=rescue,
                              capture=build_default_capture(backend="eager", threads=1))
    out = []
    for frame in frames:
        result = pipeline(frame)
        out.append((frame_accuracy(pipeline, result)[1]["registered"], result.lc2_move_mm))
    pipeline.close()
    return out


def _b_frames(seed: int, n: int):
    """Consecutive frames of a family-B diagnosis case at 10 mm / 10 deg, as bench/accuracy.py
    --stride 1 makes them."""
    from regseg.sim.family_b.anatomy import make_case
    from regseg.sim.family_b.session import Session, SessionConfig

    case = make_case(seed)
    session = Session(case, SessionConfig(tracking_shift_mm=10.0, tracking_rot_deg=10.0),
                      seed=seed * 7 + 1)
    start = int(np.random.default_rng([seed, 100, 0xB]).integers(0, 300))
    frames = [dataclasses.replace(session.frame(start + k), seq=k,
                                  acquired_ns=k * 1_000_000_000 // 30) for k in range(n)]
    return build_context(case.mri, case.labels), frames


def test_a_family_b_case_keeps_its_registration_when_the_network_drifts():
    """Diagnosis case 5293: LC2 locks under the cap, then the network's plane drifts and LC2's
    move passes 8 mm; without the hold the published plane falls back to the network's, 7-11 mm
    off."""
    context, frames = _b_frames(5293, 17)  # a diagnosis case (never an evaluation one)
    off, on = _family_b_run("off", frames, context), _family_b_run("on", frames, context)
    assert all(t < 2.5 for t, _ in off[:11]) and off[:11] == on[:11]  # locked, the same chain
    lost = [k for k in range(11, 17) if off[k][0] > 5.0]
    assert len(lost) >= 3 and all(math.isnan(off[k][1]) for k in lost)  # the cap refused
    held = [k for k in range(11, 17) if on[k][1] > 8.0]  # moves over the cap, applied
    assert len(held) >= 4
    assert all(on[k][0] < 2.5 for k in range(11, 17))


def test_a_family_b_case_whose_network_plane_is_outside_lc2s_basin_is_found_by_the_rescue():
    """Diagnosis case 5298: the network leaves the plane 8 mm off and LC2's search from it finds
    nothing it may apply on any frame; searched again from four starts 6 mm away, it locks."""
    context, frames = _b_frames(5298, 16)  # a diagnosis case (never an evaluation one)
    off = _family_b_run("off", frames, context)
    rescued = _family_b_run("on", frames, context, rescue="on")
    assert all(t > 5.0 for t, _ in off)
    assert sum(not math.isnan(m) for _, m in rescued) >= 8  # moves applied
    assert all(t < 2.5 for t, _ in rescued[-6:]), rescued


def test_the_cli_refuses_a_rescue_for_a_warm_search(capsys):
    from regseg.stream.cli import main

    assert main(["--demo", "--lc2", "warm", "--lc2-rescue", "on"]) == 2
    err = capsys.readouterr().err
    assert "--lc2-rescue on with --lc2 warm" in err and "Traceback" not in err


def test_async_carries_the_hold_as_lag_does(monkeypatch):
    """The worker thread keeps what each refinement applied (FoundMove.held): ``async`` with
    every frame waiting for the worker gives lag's Results with the hold and rescue on."""
    monkeypatch.setenv("REGSEG_LC2_IN_ORDER", "0")  # the rest of the suite runs async in order
    context, frames = _b_frames(5293, 14)

    def run(mode):
        pipeline = build_pipeline(context, build_engine(backend="eager", threads=1),
                                  deformable=None, lc2=mode, lc2_hold="on", lc2_rescue="on",
                                  capture=build_default_capture(backend="eager", threads=1))
        out = []
        for frame in frames:
            out.append(pipeline(frame))
            if mode == "async":
                pipeline.lc2.wait()
        assert pipeline.lc2.asynchronous == (mode == "async")
        pipeline.close()
        return out

    lag, done = run("lag"), run("async")
    assert any(r.lc2_move_mm > 8.0 for r in lag)  # the hold applied moves over the cap
    for a, b in zip(lag, done, strict=True):
        assert np.array_equal(a.mri_to_image, b.mri_to_image) and a.flags == b.flags
