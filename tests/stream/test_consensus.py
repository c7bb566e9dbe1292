"""The 3-D consensus of a sweep (regseg.stream.consensus): one 3-D shift recovered from in-plane
corrections seen from several orientations; nothing claimed about a direction no plane sees;
corrections that are not one shift are not fitted; the flag, the pipeline and the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regseg import spatial
from regseg.stream.consensus import (
    CONSENSUS_DEFAULT,
    CONSENSUS_MODES,
    ConsensusConfig,
    PlaneConsensus,
    build_consensus,
)

SPACING = 0.2  # mm per pixel
CENTRE = (128.0, 128.0)  # the pixel the corrections are measured at


def fan_plane(angle_deg: float, axial_mm: float = 0.0) -> np.ndarray:
    """A side-fire sagittal plane (pixel -> mm) turned ``angle_deg`` about the probe's axis (z):
    columns along z, rows away from the axis; the pixel CENTRE lies 30 mm from the axis."""
    a = math.radians(angle_deg)
    radial = np.array([math.cos(a), math.sin(a), 0.0])
    m = np.eye(4)
    m[:3, 0] = [0.0, 0.0, SPACING]
    m[:3, 1] = radial * SPACING
    m[:3, 2] = np.cross(m[:3, 0], m[:3, 1]) / SPACING
    m[:3, 3] = radial * (30.0 - CENTRE[1] * SPACING) + [0.0, 0.0, axial_mm - CENTRE[0] * SPACING]
    return m


def registered(tracked: np.ndarray, true_shift: np.ndarray) -> np.ndarray:
    """What a registration that corrects only in plane publishes: the tracked plane moved by the
    in-plane part of the true 3-D error."""
    n = np.cross(tracked[:3, 0], tracked[:3, 1])
    n /= np.linalg.norm(n)
    inplane = true_shift - (true_shift @ n) * n
    move = np.eye(4)
    move[:3, 3] = inplane
    return move @ tracked


def normal(plane):
    n = np.cross(plane[:3, 0], plane[:3, 1])
    return n / np.linalg.norm(n)


#: the fit without the image gate (bench mode ``ungated``): what the world model alone does
UNGATED = ConsensusConfig(image_gate=False)


def test_a_constant_shift_is_recovered_from_a_sweep_and_flagged_out_of_plane():
    shift = np.array([4.0, -3.0, 2.0])
    consensus, gated = PlaneConsensus(UNGATED), PlaneConsensus()
    oops, held = [], []
    for k, angle in enumerate(np.linspace(-60, 60, 13)):
        tracked = fan_plane(angle)
        published = registered(tracked, shift)
        est = consensus.update(tracked, published, CENTRE)
        held.append(gated.update(tracked, published, CENTRE).holds)
        oops.append(consensus.out_of_plane_mm(published))
        assert est.holds == (k + 1 >= ConsensusConfig().min_keyframes)
    # the gate (the default) holds the same fit once the fan is wide enough to tell a world
    # shift from an offset fixed to the probe: over -60..-10 degrees this shift's in-plane part
    # is nearly the same in every frame's own axes, so the first keyframes do not tell them apart
    assert not any(held[:ConsensusConfig().min_keyframes - 1]) and held[-1]
    assert held == sorted(held)  # once told apart, it stays held as the fan widens
    np.testing.assert_allclose(gated.estimate.shift_mm, consensus.estimate.shift_mm)
    t = consensus.estimate.shift_mm
    # every plane of the fan contains z (seen exactly); x and y are seen in the planes turned
    # toward them, the ridge pulling what is seen least toward 0 (shrinkage, never inflation)
    assert t[2] == pytest.approx(shift[2] * 13 / (13 + 2.0))  # ridge 2 over 13 keyframes
    assert np.linalg.norm(t - shift) < 1.5 and np.linalg.norm(t) <= np.linalg.norm(shift), t
    assert consensus.estimate.residual_mm < 1.0
    # every frame's remaining error is its out-of-plane part, which the consensus predicts,
    # shrunk but not inflated
    for angle, oop in zip(np.linspace(-60, 60, 13)[5:], oops[5:], strict=True):
        truth = abs(shift @ normal(fan_plane(angle)))
        assert 0.5 * truth - 0.1 <= oop <= truth + 0.1, (angle, oop, truth)
    assert consensus.flags(max(oops[5:])) and not consensus.flags(math.nan)


def test_nothing_is_claimed_along_a_direction_no_plane_sees():
    """A pure pull-back (parallel planes): their common normal is never in plane, so the
    consensus says ~0 mm out of plane whatever the true error along it. With the image gate (the
    default) it holds no estimate at all: parallel planes cannot tell a world shift from an offset
    fixed to the probe."""
    shift = np.array([0.0, 8.0, 1.0])  # y: the normal of the 0-degree plane
    consensus, gated = PlaneConsensus(UNGATED), PlaneConsensus()
    for axial in np.arange(0.0, 40.0, 4.0):
        tracked = fan_plane(0.0, axial)
        for c in (consensus, gated):
            c.update(tracked, registered(tracked, shift), CENTRE)
    assert consensus.estimate.holds
    assert consensus.out_of_plane_mm(fan_plane(0.0)) < 0.1
    assert not gated.estimate.holds and math.isnan(gated.out_of_plane_mm(fan_plane(0.0)))
    assert gated.estimate.probe_residual_mm < 1e-9 < gated.estimate.residual_mm


def test_frames_that_hardly_move_are_one_keyframe_but_a_slow_sweep_still_adds_them():
    consensus = PlaneConsensus(UNGATED)
    for angle in np.arange(0.0, 2.0, 0.1):  # 20 frames within 2 degrees: one keyframe
        tracked = fan_plane(angle)
        consensus.update(tracked, registered(tracked, np.ones(3)), CENTRE)
    assert consensus.estimate.keyframes == 1 and not consensus.estimate.holds
    for angle in np.arange(2.0, 20.0, 0.5):  # 0.5 deg per frame: a keyframe every 3 deg
        tracked = fan_plane(angle)
        consensus.update(tracked, registered(tracked, np.ones(3)), CENTRE)
    assert 5 <= consensus.estimate.keyframes <= 7 and consensus.estimate.holds


def test_corrections_that_are_not_one_shift_are_not_fitted():
    """An error that turns with the probe (fixed in image coordinates, along the rows) is no
    3-D shift: the misfit is large and the consensus does not hold, so it flags nothing."""
    consensus = PlaneConsensus()
    for angle in np.linspace(-60, 60, 13):
        tracked = fan_plane(angle)
        move = np.eye(4)
        move[:3, 3] = 20.0 * tracked[:3, 1] / SPACING  # 20 mm along this frame's rows
        consensus.update(tracked, move @ tracked, CENTRE)
    assert consensus.estimate.residual_mm > ConsensusConfig().max_residual_mm
    assert math.isnan(consensus.out_of_plane_mm(fan_plane(0.0)))


def test_reset_and_frames_without_a_gland():
    consensus = PlaneConsensus(UNGATED)
    for angle in np.linspace(-30, 30, 8):
        tracked = fan_plane(angle)
        consensus.update(tracked, registered(tracked, np.ones(3)), CENTRE)
    assert consensus.estimate.holds
    before = consensus.estimate.keyframes
    consensus.update(fan_plane(45.0), fan_plane(45.0), None)  # no gland: nothing added
    assert consensus.estimate.keyframes == before
    empty = np.zeros((256, 256), np.uint8)
    assert math.isfinite(consensus.assess(fan_plane(0.0), fan_plane(0.0), empty))
    consensus.reset()
    assert consensus.estimate.keyframes == 0 and math.isnan(consensus.out_of_plane_mm(
        fan_plane(0.0)))


def test_modes():
    assert CONSENSUS_DEFAULT in CONSENSUS_MODES
    assert isinstance(build_consensus("on"), PlaneConsensus) and build_consensus("off") is None
    with pytest.raises(ValueError, match="consensus 'maybe'"):
        build_consensus("maybe")


def test_the_pipeline_flags_out_of_plane_and_a_new_registration_clears_it(monkeypatch):
    """Wired into the Pipeline: the consensus sees each tracked frame with its registered gland,
    its estimate goes into Result.out_of_plane_mm and the out_of_plane flag; ZeroMQ and
    OpenIGTLink carry it; set_reference_to_mri starts it again."""
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner
    from regseg.stream.build import build_engine, build_pipeline
    from regseg.stream.context import build_context
    from regseg.stream.igtl.sink import trust_metadata
    from regseg.stream.zmq_sink import result_header

    phantom = make_phantom(3100)  # a calibration phantom: never an evaluation one
    context = build_context(phantom.mri, phantom.labels)
    consensus = PlaneConsensus()
    seen = []
    real = consensus.assess

    def spy(tracked, published, warped):
        seen.append(bool(warped.any()))
        return real(tracked, published, warped)

    monkeypatch.setattr(consensus, "assess", spy)
    monkeypatch.setattr(consensus, "out_of_plane_mm", lambda published: 5.0)  # as if it held
    suggested = np.eye(4)
    suggested[:3, 3] = [1.0, 0.0, -2.0]
    monkeypatch.setattr(consensus, "suggest", lambda reference_to_mri: suggested @ reference_to_mri)
    pipeline = build_pipeline(context, build_engine(backend="eager", threads=1), deformable=None,
                              lc2="off", consensus=consensus)
    scanner = SimulatedScanner(phantom, ScannerConfig(), seed=2)
    result = pipeline(scanner.frame(40))
    assert seen == [True]
    assert result.out_of_plane_mm == 5.0 and "out_of_plane" in result.flags and result.flagged
    assert result_header(result)["out_of_plane_mm"] == 5.0
    np.testing.assert_allclose(result.suggested_reference_to_mri, suggested)  # reference: identity
    assert result_header(result)["suggested_reference_to_mri"] == suggested.tolist()
    assert trust_metadata(result)["OutOfPlaneMm"] == "5.000"
    assert consensus.estimate.keyframes == 1  # the frame, with its registered gland
    pipeline.set_reference_to_mri(spatial.invert(np.eye(4)))
    assert consensus.estimate.keyframes == 0


def test_the_suggested_registration_moves_the_mri_by_the_fitted_shift_and_only_when_it_holds():
    consensus = PlaneConsensus(ConsensusConfig(suggest=True))
    assert build_consensus("suggest").config.suggest and not build_consensus("on").config.suggest
    reference_to_mri = np.eye(4)
    reference_to_mri[:3, 3] = [1.0, 2.0, 3.0]
    assert consensus.suggest(reference_to_mri) is None  # nothing to suggest yet
    shift = np.array([3.0, -2.0, 1.5])
    for angle in np.linspace(-60, 60, 13):
        tracked = fan_plane(angle)
        consensus.update(tracked, registered(tracked, shift), CENTRE)
    suggested = consensus.suggest(reference_to_mri)
    np.testing.assert_allclose(suggested[:3, :3], np.eye(3))
    np.testing.assert_allclose(suggested[:3, 3] - reference_to_mri[:3, 3],
                               consensus.estimate.shift_mm)
    assert np.linalg.norm(consensus.estimate.shift_mm - shift) < 1.5
    flag_only = PlaneConsensus()  # --consensus on: the same fit, no suggestion published
    flag_only._frames, flag_only.estimate = consensus._frames, consensus.estimate
    assert flag_only.suggest(reference_to_mri) is None


def test_its_last_estimate_goes_into_the_summary():
    consensus = PlaneConsensus()
    assert consensus.info() == {"holds": False, "keyframes": 0, "shift_mm": None,
                                "residual_mm": None}
    for angle in np.linspace(-60, 60, 13):
        tracked = fan_plane(angle)
        consensus.update(tracked, registered(tracked, np.array([3.0, -2.0, 1.5])), CENTRE)
    info = consensus.info()
    assert info["holds"] and info["keyframes"] == 13 and info["residual_mm"] < 1.0
    np.testing.assert_allclose(info["shift_mm"], consensus.estimate.shift_mm, atol=1e-3)


def test_the_image_gate_holds_a_world_shift_and_not_an_offset_fixed_to_the_probe():
    """``image_gate`` (the default since addendum 19): one 3-D shift fits a constant world error
    with no misfit and is held; an in-plane offset fixed in every frame's own axes (a
    probe-calibration error, or the accuracy bench's tracking error) fits the probe model with
    none, and the consensus then claims nothing about the normal."""
    from regseg.stream.consensus import BENCH_MODES

    assert not {"gated", "ungated"} & set(CONSENSUS_MODES)  # bench modes, not --consensus choices
    assert build_consensus("gated").config.image_gate and build_consensus("on").config.image_gate
    assert not build_consensus("ungated").config.image_gate
    shift = np.array([4.0, -3.0, 2.0])
    world, probe = PlaneConsensus(ConsensusConfig(image_gate=True)), PlaneConsensus(
        ConsensusConfig(**BENCH_MODES["gated"]))
    for angle in np.linspace(-60, 60, 13):
        tracked = fan_plane(angle)
        world.update(tracked, registered(tracked, shift), CENTRE)
        # 2 mm along the plane's columns and 1 mm along its rows, whatever its orientation
        offset = tracked[:3, 0] / SPACING * 2.0 + tracked[:3, 1] / SPACING * 1.0
        move = np.eye(4)
        move[:3, 3] = offset
        probe.update(tracked, move @ tracked, CENTRE)
    # the ridge leaves some misfit; the probe model leaves more
    assert world.estimate.holds
    assert world.estimate.residual_mm < 0.5 * world.estimate.probe_residual_mm
    assert world.out_of_plane_mm(fan_plane(0.0)) > 2.0  # the shift's normal part at 0 deg
    assert not probe.estimate.holds and probe.estimate.probe_residual_mm < 1e-6
    assert math.isnan(probe.out_of_plane_mm(fan_plane(0.0)))
    # without the gate the same probe-fixed offset is fitted as a shift and may flag
    ungated = build_consensus("ungated")
    for angle in np.linspace(-60, 60, 13):
        tracked = fan_plane(angle)
        move = np.eye(4)
        move[:3, 3] = tracked[:3, 0] / SPACING * 2.0 + tracked[:3, 1] / SPACING * 1.0
        ungated.update(tracked, move @ tracked, CENTRE)
    assert ungated.estimate.holds


def test_strict_flags_sweep_pending_until_the_sweep_has_formed_the_consensus():
    """--consensus strict: frames after a registration are flagged sweep_pending until enough
    distinct planes have been seen; then only out_of_plane can flag (here nothing: the
    registration is right); a new registration starts it again. on: never pending."""
    assert "strict" in CONSENSUS_MODES
    strict, plain = build_consensus("strict"), build_consensus("on")
    assert strict.config.strict and not plain.config.strict and not strict.config.suggest
    true = np.array([0.0, 0.0, 0.0])
    reasons = []
    for angle in range(-30, 31, 6):  # a sweep: a new keyframe every 6 degrees
        tracked = fan_plane(angle)
        for c in (strict, plain):
            c.update(tracked, registered(tracked, true), CENTRE)
        reasons.append(strict.reasons(strict.out_of_plane_mm(registered(tracked, true))))
        assert plain.reasons(plain.out_of_plane_mm(tracked)) == ()
    need = strict.config.min_keyframes
    assert reasons[:need - 1] == [("sweep_pending",)] * (need - 1)
    assert reasons[need - 1:] == [()] * (len(reasons) - need + 1)  # formed; no error: no flag
    # no correction at all fits the probe-fixed model as well as a shift: the gate holds no
    # estimate, yet the sweep has been made, so nothing is pending
    assert not strict.estimate.holds and not strict.pending()
    # corrections that no model fits (20 mm along each frame's rows, and its columns in turn)
    # are no verification: pending stays
    for k, angle in enumerate(range(-30, 31, 6)):
        tracked = fan_plane(angle)
        move = np.eye(4)
        move[:3, 3] = 20.0 * tracked[:3, k % 2] / SPACING * (-1) ** (k // 2)
        strict.update(tracked, move @ tracked, CENTRE)
    assert strict.estimate.keyframes >= need
    assert strict.estimate.residual_mm > strict.config.max_residual_mm and strict.pending()
    strict.reset()
    assert strict.reasons(math.nan) == ("sweep_pending",)
    assert strict.reasons(5.0) == ("out_of_plane",)  # above flag_mm: off, not pending


@pytest.fixture(scope="module")
def one_frame():
    """(context, engine, frame) of calibration phantom 3100 (never an evaluation one)."""
    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner
    from regseg.stream.build import build_engine
    from regseg.stream.context import build_context

    phantom = make_phantom(3100)
    return (build_context(phantom.mri, phantom.labels), build_engine(backend="eager", threads=1),
            SimulatedScanner(phantom, ScannerConfig(), seed=2).frame(40))


def test_strict_in_the_pipeline_marks_the_first_frame_and_the_wire_carries_it(one_frame):
    from regseg.stream.build import build_pipeline
    from regseg.stream.quality import FLAG_REASONS

    assert "sweep_pending" in FLAG_REASONS
    context, engine, frame = one_frame
    strict = build_pipeline(context, engine, deformable=None, lc2="off", consensus="strict")
    result = strict(frame)
    assert "sweep_pending" in result.flags and result.flagged and math.isnan(result.out_of_plane_mm)
    assert result.labels_source == "network"  # the prior is withheld: an image-based flag
    on = build_pipeline(context, engine, deformable=None, lc2="off", consensus="on")
    assert "sweep_pending" not in on(frame).flags


def test_the_sweep_status_goes_out_in_every_mode_and_flags_only_in_strict(one_frame):
    """``on`` (the default) says, without flagging, that the sweep which checks the registration
    along the normals is still to be made: Result, ZeroMQ header, OpenIGTLink metadata, the
    overlay's corner and the run's summary; ``off`` says nothing; a sweep clears it."""
    from regseg.stream.build import build_pipeline
    from regseg.stream.igtl.sink import trust_metadata
    from regseg.stream.overlay import compose_overlay
    from regseg.stream.stats import StreamStats, format_summary
    from regseg.stream.zmq_sink import result_header

    context, engine, frame = one_frame
    on = build_pipeline(context, engine, deformable=None, lc2="off", consensus="on")
    result = on(frame)
    assert result.sweep_pending is True and result.sweep_planes == 1
    assert "sweep_pending" not in result.flags  # told, not flagged
    assert result_header(result)["sweep_pending"] is True
    assert result_header(result)["sweep_planes"] == 1
    meta = trust_metadata(result)
    assert meta["SweepPending"] == "true" and meta["SweepPlanes"] == "1"
    stats = StreamStats()
    stats.add_trust(result.error_mm, result.flags, result.correction, result.labels_source,
                    result.sweep_pending)
    summary = stats.summary()
    assert summary["sweep_pending_frames"] == 1
    assert "frames before the sweep" in format_summary(summary)
    off = build_pipeline(context, engine, deformable=None, lc2="off", consensus="off")(frame)
    assert off.sweep_pending is None and off.sweep_planes == -1
    assert result_header(off)["sweep_pending"] is None and "SweepPending" not in trust_metadata(off)
    # the sweep: six distinct planes whose corrections a model fits clear it
    consensus = on.consensus
    for angle in range(-30, 31, 6):
        tracked = fan_plane(angle)
        consensus.update(tracked, tracked, CENTRE)
    planes, pending = consensus.status()
    assert planes >= consensus.config.min_keyframes and pending is False
    # the overlay's corner: written while pending (bright text where the plain one has none),
    # not after the sweep, and a flagged frame keeps only its UNVERIFIED mark
    pixels = np.full((256, 256), 40, np.uint8)
    empty = np.zeros_like(pixels)

    def bright(rgb):  # text pixels in the bottom corner
        return int((rgb[220:, :].min(axis=-1) > 150).sum())

    assert bright(compose_overlay(pixels, empty, empty, sweep=(2, True))) > 20
    assert bright(compose_overlay(pixels, empty, empty, sweep=(6, False))) == 0
    assert bright(compose_overlay(pixels, empty, empty, sweep=(-1, None))) == 0
    assert bright(compose_overlay(pixels, empty, empty, flags=("error_estimate",),
                                  sweep=(2, True))) == 0
