"""regseg.calibration solvers: analytic answers, noise behaviour, errors that name the input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from regseg.calibration import nwire, pivot, points, temporal
from regseg.errors import InputError
from regseg.sim import calibration as sim


def _rigid(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    m[:3, 3] = rng.normal(0, 50, 3)
    return m


def test_register_points_recovers_a_rigid_map_exactly_and_never_reflects():
    a_to_b = _rigid(1)
    a = np.random.default_rng(2).normal(0, 30, (6, 3))
    r = points.register_points(a, points.apply(a_to_b, a))
    assert np.allclose(r.moving_to_fixed, a_to_b, atol=1e-9) and r.fre_mm < 1e-9
    mirrored = a * [-1, 1, 1]  # the best map would be a reflection: a rotation must come back
    r = points.register_points(a, mirrored)
    assert np.linalg.det(r.moving_to_fixed[:3, :3]) > 0.999


def test_similarity_recovers_the_scale():
    a = np.random.default_rng(3).normal(0, 30, (5, 3))
    m = _rigid(4)
    m[:3, :3] *= 1.7
    r = points.register_points(a, points.apply(m, a), similarity=True)
    assert r.scale == pytest.approx(1.7) and np.allclose(r.moving_to_fixed, m, atol=1e-9)


def test_fitzpatrick_prediction_matches_monte_carlo():
    rng = np.random.default_rng(5)
    fid = rng.normal(0, 40, (5, 3))
    target = np.array([[60.0, 10.0, -20.0]])
    fle = 1.0
    tre, fre = [], []
    for _ in range(3000):
        r = points.register_points(sim.localise(fid, fle, rng), fid)
        tre.append(np.linalg.norm(points.apply(r.moving_to_fixed, target) - target))
        fre.append(r.fre_mm)
    assert np.sqrt(np.mean(np.square(tre))) == pytest.approx(
        points.predicted_tre_mm(fid, target, fle)[0], rel=0.06)
    assert np.sqrt(np.mean(np.square(fre))) == pytest.approx(points.expected_fre_mm(fle, 5),
                                                             rel=0.05)


def test_points_errors_name_the_input():
    with pytest.raises(InputError, match="fixed points"):
        points.register_points(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(InputError, match="collinear"):
        line = np.outer(np.arange(4.0), [1, 2, 3])
        points.register_points(line, line)


def test_pivot_finds_tip_despite_slips_and_refuses_a_still_stylus():
    s = sim.simulate_pivot(0, 120)
    r = pivot.pivot_calibrate(s.stylus_to_tracker)
    assert np.linalg.norm(r.tip_in_stylus - s.tip_in_stylus) < 0.3
    assert np.linalg.norm(r.pivot_in_tracker - s.pivot_in_tracker) < 0.3
    assert (~r.inliers[s.outliers]).mean() > 0.5  # most slips are rejected
    naive = pivot.pivot_calibrate(s.stylus_to_tracker, max_rounds=0)
    assert naive.rms_mm > r.rms_mm
    still = np.repeat(s.stylus_to_tracker[:1], 10, axis=0)
    with pytest.raises(InputError, match="turned at most 0.0 degrees"):
        pivot.pivot_calibrate(still)


def test_nwire_geometry_middle_point_is_on_the_diagonal_where_the_plane_cuts_it():
    s = sim.simulate_nwire(1, 1, renderer=sim.ReflectorRenderer(seed=1))
    image_to_phantom = (np.linalg.inv(s.true_phantom_to_tracker) @ s.true_probe_to_tracker[0]
                        @ s.true_image_to_probe)
    ij = s.true_dots_ij[0].reshape(3, 3, 2)
    uv, phantom = nwire.wire_points(ij)
    mapped = uv @ image_to_phantom[:3, :2].T + image_to_phantom[:3, 3]
    assert np.allclose(mapped, phantom, atol=1e-6)


def test_probe_calibration_from_rendered_bmode_frames():
    torch.set_num_threads(1)
    s = sim.simulate_nwire(2, 16, renderer=sim.ReflectorRenderer(seed=2))
    samples = nwire.collect_wire_points(s.pixels, s.probe_to_tracker, s.phantom_to_tracker)
    assert samples.used.sum() >= 10
    r = nwire.solve_image_to_probe(samples.pixels_ij, samples.points_probe)
    corners = np.array([[0, 0, 0, 1], [255, 0, 0, 1], [0, 255, 0, 1], [255, 255, 0, 1.0]])
    err = np.linalg.norm((corners @ (r.image_to_probe - s.true_image_to_probe).T)[:, :3], axis=1)
    assert err.max() < 1.0, err
    assert r.pixel_mm == pytest.approx((0.2, 0.2), abs=0.005)
    assert nwire.reprojection_errors_mm(r.image_to_probe, samples).mean() < 0.6
    # a wrong phantom registration (5 mm off) must show in the reprojection error
    off = s.phantom_to_tracker.copy()
    off[:3, 3] += [5, 0, 0]
    bad = nwire.collect_wire_points(s.pixels, s.probe_to_tracker, off)
    assert np.abs(nwire.solve_image_to_probe(bad.pixels_ij, bad.points_probe).image_to_probe
                  - r.image_to_probe)[:3, 3].max() > 1.0


def test_probe_calibration_refuses_too_few_points():
    with pytest.raises(InputError, match="N >= 6"):
        nwire.solve_image_to_probe(np.zeros((3, 2)), np.zeros((3, 3)))


def test_detect_dots_refuses_a_frame_without_nine_dots():
    r = sim.ReflectorRenderer(seed=3)
    assert nwire.detect_dots(r.dots(np.array([[50.0, 50.0], [150.0, 60.0]]))) is None


def test_temporal_lag_recovered_within_2_ms_and_sign_matters():
    torch.set_num_threads(1)
    s = sim.simulate_temporal(4, duration_s=8.0, lag_s=-0.06, image_fps=20.0)
    sig = temporal.line_depth_signal(s.pixels)
    track = temporal.tracker_signal(s.probe_to_tracker)
    r = temporal.estimate_lag(s.tracker_times_s, track, s.image_times_s, sig)
    assert abs(r.lag_s - s.lag_s) < 0.002, r.lag_s
    assert r.correlation > 0.99
    with pytest.raises(InputError, match="does not move"):
        temporal.estimate_lag(s.tracker_times_s, np.zeros_like(track), s.image_times_s, sig)
