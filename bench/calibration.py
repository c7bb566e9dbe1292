"""Calibration against ground truth: pivot, probe (N-wire), temporal, landmark registration.

``python bench/calibration.py [--quick] [--json F]`` simulates each step (regseg.sim.calibration)
with stated noise, runs the regseg.calibration function the ``regseg calibrate`` CLI runs, and
compares with the truth and with what theory or published practice expects:

- pivot: tip error |tip - true tip| per session (Yaniv 2015: precision about 0.25 mm);
- probe: ImageToProbe error at held-out image points, |C_est u - C_true u| for every wire dot
  detected in held-out frames, and the held-out reprojection error (PLUS fCal style; Carbajal
  2013: 0.5-2 mm on real data); the detector's dot error against the true wire crossings;
- temporal: |estimated lag - true lag| (PLUS: about 1 ms);
- landmarks: RMS TRE at the MRI lesion over 100 trials against Fitzpatrick's prediction (1998
  eq. 46) for the same fiducial configuration and FLE, and RMS FRE against eq. 10.

Top-level JSON keys for scripts: ``pivot_tip_error_mm`` (mean over sessions),
``probe_calibration_error_mm`` (mean over held-out image points and sessions),
``temporal_lag_error_ms`` (mean |error| over sessions), ``landmark_tre_vs_predicted`` (measured
RMS TRE / predicted), and ``noise`` (the levels simulated).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from common import print_table, write_json
from scipy.spatial.transform import Rotation

from regseg.calibration import nwire, pivot, points, temporal
from regseg.sim import calibration as sim

FLE_MRI_MM = 1.0  # fiducial localisation in the MRI (a click), RMS 3-D
FLE_REFERENCE_MM = 0.5  # fiducial touched with the tracked stylus, RMS 3-D
LANDMARK_TRIALS = 100


def bench_pivot(sessions: int) -> dict:
    errors, rms = [], []
    for seed in range(sessions):
        s = sim.simulate_pivot(seed)
        r = pivot.pivot_calibrate(s.stylus_to_tracker)
        errors.append(float(np.linalg.norm(r.tip_in_stylus - s.tip_in_stylus)))
        rms.append(r.rms_mm)
    return {"name": "pivot", "metric": "tip error mm", "mean": float(np.mean(errors)),
            "max": float(np.max(errors)), "expected": 0.25, "limit": 0.3,
            "residual_rms_mm": float(np.mean(rms)), "sessions": sessions, "poses": 200,
            "expected_source": "Yaniv 2015 precision 0.25(0.11) mm"}


def bench_probe(sessions: int, n_cal: int, n_val: int) -> tuple[dict, dict]:
    renderer = sim.ReflectorRenderer()
    true_err, pre, dot_err, used, scale = [], [], [], [], []
    for seed in range(sessions):
        s = sim.simulate_nwire(seed, n_cal + n_val, renderer=renderer)
        cal = nwire.collect_wire_points(s.pixels[:n_cal], s.probe_to_tracker[:n_cal],
                                        s.phantom_to_tracker)
        val = nwire.collect_wire_points(s.pixels[n_cal:], s.probe_to_tracker[n_cal:],
                                        s.phantom_to_tracker)
        r = nwire.solve_image_to_probe(cal.pixels_ij, cal.points_probe)
        pre.extend(nwire.reprojection_errors_mm(r.image_to_probe, val))
        for k in np.flatnonzero(val.used):  # every detected dot of the held-out frames
            dots = nwire.detect_dots(s.pixels[n_cal + k]).reshape(-1, 2)
            truth = s.true_dots_ij[n_cal + k]
            dot_err.extend(np.linalg.norm(dots - truth, axis=1) * s.pixel_mm)
            uv = np.column_stack([dots, np.zeros(len(dots)), np.ones(len(dots))])
            true_err.extend(np.linalg.norm((uv @ (r.image_to_probe - s.true_image_to_probe).T)
                                           [:, :3], axis=1))
        used.append(float(np.mean(np.r_[cal.used, val.used])))
        scale.append(max(abs(p - s.pixel_mm) for p in r.pixel_mm))
    row = {"name": "probe", "metric": "held-out point error mm",
           "mean": float(np.mean(true_err)), "max": float(np.max(true_err)), "limit": 1.0,
           "expected": None, "reprojection_mean_mm": float(np.mean(pre)),
           "reprojection_p95_mm": float(np.percentile(pre, 95)),
           "dot_error_rms_mm": float(np.sqrt(np.mean(np.square(dot_err)))),
           "frames_detected": float(np.mean(used)), "pixel_size_error_mm": float(max(scale)),
           "sessions": sessions, "frames_calibration": n_cal, "frames_validation": n_val,
           "expected_source": "PLUS fCal/Carbajal 2013: 0.5-2 mm on real data"}
    return row, {"dot_error_rms_mm": row["dot_error_rms_mm"]}


def bench_temporal(sessions: int) -> dict:
    errors = []
    for seed in range(sessions):
        lag = float(np.random.default_rng([seed, 23]).uniform(0.02, 0.2))
        s = sim.simulate_temporal(seed, lag_s=lag)
        r = temporal.estimate_lag(s.tracker_times_s, temporal.tracker_signal(s.probe_to_tracker),
                                  s.image_times_s, temporal.line_depth_signal(s.pixels))
        errors.append(abs(r.lag_s - s.lag_s) * 1e3)
    return {"name": "temporal", "metric": "|lag error| ms", "mean": float(np.mean(errors)),
            "max": float(np.max(errors)), "limit": 2.0, "expected": 1.0, "sessions": sessions,
            "expected_source": "PLUS temporal calibration: about 1 ms"}


def landmark_case() -> tuple[np.ndarray, np.ndarray]:
    """Six fiducials around the phantom's gland and the lesion centroid (target), MRI mm."""
    from regseg.sim.phantom import make_phantom

    phantom = make_phantom(0)
    vox = phantom.labels.voxel_to_world
    ijk = np.argwhere(phantom.labels.data == 2)
    if not len(ijk):
        ijk = np.argwhere(phantom.labels.data == 1)
    target = points.apply(vox, ijk.mean(0, keepdims=True))
    gland = points.apply(vox, np.argwhere(phantom.labels.data > 0).mean(0, keepdims=True))[0]
    offsets = np.array([[35, 0, 10], [-35, 0, 10], [0, 30, -15], [0, -30, -15], [20, 20, 30],
                        [-20, -20, -30]], dtype=float)
    return gland + offsets, target


def bench_landmarks(trials: int, case: tuple[np.ndarray, np.ndarray]) -> dict:
    fiducials_mri, target_mri = case
    rng = np.random.default_rng([29, trials])
    fre, tre = [], []
    for _ in range(trials):
        reference_to_mri = np.eye(4)
        reference_to_mri[:3, :3] = Rotation.random(random_state=rng).as_matrix()
        reference_to_mri[:3, 3] = rng.normal(0, 100, 3)
        mri_to_reference = np.linalg.inv(reference_to_mri)
        in_reference = points.apply(mri_to_reference, fiducials_mri)
        r = points.register_points(sim.localise(in_reference, FLE_REFERENCE_MM, rng),
                                   sim.localise(fiducials_mri, FLE_MRI_MM, rng))
        fre.append(r.fre_mm)
        target_ref = points.apply(mri_to_reference, target_mri)
        tre.append(float(np.linalg.norm(points.apply(r.moving_to_fixed, target_ref)
                                        - target_mri)))
    fle = float(np.hypot(FLE_MRI_MM, FLE_REFERENCE_MM))
    predicted = float(points.predicted_tre_mm(fiducials_mri, target_mri, fle)[0])
    measured = float(np.sqrt(np.mean(np.square(tre))))
    return {"name": f"landmarks x{trials}", "metric": "RMS TRE mm", "mean": measured,
            "max": float(np.max(tre)), "expected": predicted, "limit": None,
            "ratio": measured / predicted, "fre_rms_mm": float(np.sqrt(np.mean(np.square(fre)))),
            "fre_expected_mm": points.expected_fre_mm(fle, len(fiducials_mri)),
            "fiducials": len(fiducials_mri), "trials": trials,
            "expected_source": "Fitzpatrick 1998 eq. 46 (TRE) and eq. 10 (FRE)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sessions and frames (< 5 min)")
    p.add_argument("--json", default=None, help="write the rows and the top-level keys here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    q = args.quick
    rows = [bench_pivot(5 if q else 20)]
    probe, _ = bench_probe(1 if q else 3, 60 if q else 200, 30 if q else 100)
    case = landmark_case()
    # 100 trials as the issue asks (the top-level key); 2000 more show where the ratio converges
    rows += [probe, bench_temporal(2 if q else 5), bench_landmarks(LANDMARK_TRIALS, case),
             bench_landmarks(2000, case)]
    for row in rows:
        ratio_ok = "ratio" not in row or abs(row["ratio"] - 1) <= 0.1
        row["pass"] = bool(ratio_ok and (row["limit"] is None or row["mean"] <= row["limit"]))
    print_table(rows, [("name", "step", ""), ("metric", "metric", ""), ("mean", "measured", ".3f"),
                       ("max", "max", ".3f"), ("expected", "expected", ".3f"),
                       ("limit", "limit", ".2f"), ("pass", "pass", "")])
    keys = {"pivot_tip_error_mm": rows[0]["mean"], "probe_calibration_error_mm": rows[1]["mean"],
            "temporal_lag_error_ms": rows[2]["mean"], "landmark_tre_vs_predicted": rows[3]["ratio"]}
    noise = {"tracker_position_mm_rms": sim.TRACKER_POSITION_MM,
             "tracker_angle_deg_rms": sim.TRACKER_ANGLE_DEG,
             "pivot_outlier_fraction": 0.05, "pivot_slip_mm": 3.0,
             "phantom_landmark_fle_mm": 0.3, "timestamp_jitter_s": 0.0005,
             "fle_mri_mm": FLE_MRI_MM, "fle_reference_mm": FLE_REFERENCE_MM,
             "wire_dot_error_rms_mm": rows[1]["dot_error_rms_mm"]}
    elapsed = time.perf_counter() - t0
    print(" ".join(f"{k}={v:.3f}" for k, v in keys.items()) + f"  ({elapsed:.0f} s)")
    if args.json:
        write_json(args.json, "calibration", rows, quick=q, noise=noise, seconds=elapsed, **keys)
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
