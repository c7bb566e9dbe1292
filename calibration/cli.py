"""``regseg calibrate pivot|probe|temporal|landmarks|simulate``: the steps before the first frame.

Each step reads tracked data (PLUS sequence files or CSV, Slicer markups), checks every input
before any work, writes the transform file (ITK ``.tfm``/``.h5`` for Slicer, PLUS ``.xml``
CoordinateDefinitions, or our 4x4 ``.txt``), a JSON report with the residuals and, on request, a
plot. ``simulate`` writes a simulated session of every step (regseg.sim.calibration) to try them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from regseg.cli_checks import (
    Once,
    check_readable_file,
    check_writable,
    float_at_least,
    int_at_least,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``regseg calibrate`` sub-tasks (called by regseg/cli.py's lazy task table)."""
    steps = p.add_subparsers(dest="step", required=True, metavar="STEP")

    pv = steps.add_parser("pivot", help="stylus tip from a pivoting recording (StylusTipToStylus)")
    pv.add_argument("--input", action=Once, required=True,
                    help="tracked stylus poses: PLUS sequence file or CSV (timestamp_s, m00..m33)")
    pv.add_argument("--tool", action=Once, default="StylusToTracker",
                    help="transform name in a sequence file (default StylusToTracker)")
    _outputs(pv, "StylusTipToStylus: .tfm/.h5 (Slicer), .xml (PLUS), .txt (4x4)")
    pv.set_defaults(func=run_pivot)

    pr = steps.add_parser("probe", help="ImageToProbe from B-mode frames of an N-wire phantom")
    pr.add_argument("--input", action=Once, required=True,
                    help="PLUS sequence file of the phantom's frames with the probe's poses")
    pr.add_argument("--probe", action=Once, default="ProbeToTracker",
                    help="the probe's transform name in the file (default ProbeToTracker; "
                    "ProbeToReference with a reference marker)")
    pr.add_argument("--phantom-to-tracker", action=Once, required=True, metavar="FILE",
                    help="the phantom's registration to the poses' frame (.tfm/.h5/.txt, or a "
                    "PLUS .xml with Phantom -> Tracker/Reference)")
    pr.add_argument("--holdout", action=Once, type=float_at_least(0.0, 0.9), default=0.3,
                    help="share of usable frames (the last ones) kept out of the fit to measure "
                    "the reprojection error (default 0.3)")
    _outputs(pr, "ImageToProbe (pixels -> mm): .xml (PLUS), .tfm/.h5 (Slicer), .txt (4x4)")
    pr.set_defaults(func=run_probe)

    tm = steps.add_parser("temporal", help="lag between the tracker's and the images' clocks")
    tm.add_argument("--input", action=Once, required=True,
                    help="PLUS sequence file of the images (probe moved up and down over a flat "
                    "tank bottom)")
    tm.add_argument("--tracking", action=Once, default=None,
                    help="the probe's poses on the tracker clock: CSV or sequence file (default: "
                    "the poses in --input)")
    tm.add_argument("--probe", action=Once, default="ProbeToTracker",
                    help="the probe's transform name in a sequence file (default ProbeToTracker)")
    tm.add_argument("--max-lag-ms", action=Once, type=float_at_least(1.0, 5000.0), default=500.0,
                    help="search the lag within +-this (default 500 ms, as PLUS)")
    tm.add_argument("--report", action=Once, default=None, help="JSON report")
    tm.add_argument("--plot", action=Once, default=None, help="PNG of the correlation curve")
    tm.set_defaults(func=run_temporal)

    lm = steps.add_parser("landmarks", help="ReferenceToMRI from paired landmarks (FRE, TRE)")
    lm.add_argument("--fixed", action=Once, required=True,
                    help="landmarks in the MRI (.mrk.json or .fcsv)")
    lm.add_argument("--moving", action=Once, required=True,
                    help="the same landmarks in the tracker's Reference frame (.mrk.json/.fcsv)")
    lm.add_argument("--similarity", action="store_true", help="also fit an isotropic scale")
    lm.add_argument("--fle-mm", action=Once, type=float_at_least(0.0, 100.0), default=1.0,
                    help="RMS localisation error assumed for the predicted TRE (default 1 mm)")
    lm.add_argument("--targets", action=Once, default=None,
                    help="target points in the MRI (.mrk.json/.fcsv): predicted TRE at each")
    _outputs(lm, "ReferenceToMRI: .tfm/.h5 (Slicer), .txt (4x4, regseg-stream), .xml (PLUS)")
    lm.set_defaults(func=run_landmarks)

    sm = steps.add_parser("simulate", help="write simulated sessions of every step (and truth)")
    sm.add_argument("--out", action=Once, required=True, help="output folder")
    sm.add_argument("--seed", action=Once, type=int_at_least(0), default=0,
                    help="seed of the simulated sessions (default 0)")
    sm.add_argument("--frames", action=Once, type=int_at_least(8), default=60,
                    help="N-wire frames (default 60)")
    sm.set_defaults(func=run_simulate)


def _outputs(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", action=Once, required=True, help=f"transform file to write: {what}")
    p.add_argument("--report", action=Once, default=None, help="JSON report with the residuals")
    p.add_argument("--plot", action=Once, default=None, help="PNG of the residuals")


def _check_outputs(args, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            check_writable(value, flag)


def _write_report(path: str | None, report: dict) -> None:
    if path:
        from regseg.calibration.transforms_io import write_atomic

        write_atomic(path, json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")


def _round(values, digits: int = 4) -> list:
    import numpy as np

    return np.round(np.asarray(values, dtype=float), digits).tolist()


def run_pivot(args) -> int:
    from regseg.calibration import inputs, pivot, plots, transforms_io

    check_readable_file(args.input, "--input")
    _check_outputs(args, "--out", "--report", "--plot")
    tracked = inputs.read_tracked(args.input, args.tool)
    result = pivot.pivot_calibrate(tracked.poses)
    transforms_io.write_transform(args.out, result.tip_to_stylus, from_name="StylusTip",
                                  to_name="Stylus", error_mm=result.rms_mm)
    print(f"pivot: tip {_round(result.tip_in_stylus, 2)} mm in the stylus frame, pivot "
          f"{_round(result.pivot_in_tracker, 2)} mm; RMS {result.rms_mm:.3f} mm over "
          f"{int(result.inliers.sum())}/{len(result.inliers)} poses\nwrote {args.out}")
    _write_report(args.report, {
        "step": "pivot", "input": str(args.input), "tool": args.tool, "out": str(args.out),
        "tip_in_stylus_mm": _round(result.tip_in_stylus), "tip_to_stylus":
        _round(result.tip_to_stylus, 6), "pivot_in_tracker_mm": _round(result.pivot_in_tracker),
        "rms_mm": result.rms_mm, "poses": len(result.inliers),
        "inliers": int(result.inliers.sum()), "residuals_mm": _round(result.residuals_mm),
        "method": "algebraic one-step least squares with residual rejection (Yaniv 2015)"})
    if args.plot:
        plots.plot_residuals(args.plot, result.residuals_mm, inliers=result.inliers,
                             title="pivot: tip distance from the pivot point", xlabel="pose")
        print(f"wrote {args.plot}")
    return 0


def run_probe(args) -> int:
    import numpy as np

    from regseg.calibration import inputs, nwire, plots, transforms_io
    from regseg.errors import InputError

    check_readable_file(args.input, "--input")
    check_readable_file(args.phantom_to_tracker, "--phantom-to-tracker")
    _check_outputs(args, "--out", "--report", "--plot")
    frame = args.probe.split("To", 1)[1] if "To" in args.probe else "Tracker"
    phantom_to_tracker = transforms_io.read_transform(args.phantom_to_tracker,
                                                      from_name="Phantom", to_name=frame)
    tracked = inputs.read_tracked(args.input, args.probe, images=True)
    if tracked.pixels is None or len(tracked.pixels) == 0:
        raise InputError(f"--input {args.input}: no frame has a valid {args.probe}Transform")
    samples = nwire.collect_wire_points(tracked.pixels, tracked.poses, phantom_to_tracker)
    used = np.flatnonzero(samples.used)
    if len(used) < 4:
        raise InputError(f"--input {args.input}: the N-wire dots were found in {len(used)} of "
                         f"{len(tracked.pixels)} frames; at least 4 are needed (are the 9 wire "
                         "dots in view and brighter than the rest?)")
    n_hold = int(round(args.holdout * len(used))) if len(used) >= 8 else 0
    held = np.isin(samples.frame_of_point, used[len(used) - n_hold:]) if n_hold else \
        np.zeros(len(samples.frame_of_point), dtype=bool)
    fit = nwire.WireSamples(samples.pixels_ij[~held], samples.points_probe[~held],
                            samples.frame_of_point[~held], samples.used)
    result = nwire.solve_image_to_probe(fit.pixels_ij, fit.points_probe)
    test = nwire.WireSamples(samples.pixels_ij[held], samples.points_probe[held],
                             samples.frame_of_point[held], samples.used)
    held_err = nwire.reprojection_errors_mm(result.image_to_probe, test) if n_hold else \
        np.zeros(0)
    error = float(np.sqrt(np.mean(held_err ** 2))) if n_hold else result.rms_mm
    transforms_io.write_transform(args.out, result.image_to_probe, from_name="Image",
                                  to_name="Probe", error_mm=error)
    print(f"probe: pixel size {result.pixel_mm[0]:.4f} x {result.pixel_mm[1]:.4f} mm; dots found "
          f"in {len(used)}/{len(tracked.pixels)} frames; fit RMS {result.rms_mm:.3f} mm over "
          f"{int(result.inliers.sum())}/{len(result.inliers)} points"
          + (f"; held-out ({n_hold} frames) RMS {error:.3f} mm" if n_hold else "")
          + f"\nwrote {args.out}")
    _write_report(args.report, {
        "step": "probe", "input": str(args.input), "out": str(args.out),
        "image_to_probe": _round(result.image_to_probe, 6), "pixel_mm": list(result.pixel_mm),
        "frames": len(tracked.pixels), "frames_with_dots": int(len(used)),
        "fit_rms_mm": result.rms_mm, "fit_points": len(result.inliers),
        "fit_inliers": int(result.inliers.sum()), "fit_residuals_mm": _round(result.residuals_mm),
        "holdout_frames": n_hold, "holdout_rms_mm": error if n_hold else None,
        "holdout_residuals_mm": _round(held_err),
        "method": "N-wire (fCal 2.0 layout) middle-dot points, rotation + 2 scales + translation "
                  "least squares"})
    if args.plot:
        values = np.r_[result.residuals_mm, held_err]
        keep = np.r_[np.ones(len(result.residuals_mm), bool), np.zeros(len(held_err), bool)]
        plots.plot_residuals(args.plot, values, inliers=keep, xlabel="wire point (grey: held out)",
                             title="probe calibration: reprojection error")
        print(f"wrote {args.plot}")
    return 0


def run_temporal(args) -> int:
    import numpy as np

    from regseg.calibration import inputs, plots, temporal
    from regseg.sequence_file import read_sequence

    check_readable_file(args.input, "--input")
    if args.tracking:
        check_readable_file(args.tracking, "--tracking")
    _check_outputs(args, "--report", "--plot")
    seq = read_sequence(args.input)
    frames = [f.pixels if f.pixels.ndim == 2 else f.pixels[..., 0] for f in seq.frames]
    times = np.array([f.timestamp_s if f.timestamp_s is not None else np.nan for f in seq.frames])
    tracked = inputs.read_tracked(args.tracking or args.input, args.probe)
    image_signal = temporal.line_depth_signal(frames)
    tracker_signal = temporal.tracker_signal(tracked.poses)
    result = temporal.estimate_lag(tracked.times_s, tracker_signal, times, image_signal,
                                   max_lag_s=args.max_lag_ms / 1e3)
    lag_ms = result.lag_s * 1e3
    print(f"temporal: lag {lag_ms:.1f} ms (image time + lag = tracker time), correlation "
          f"{result.correlation:.4f}; stream with: regseg-stream ... --time-offset-ms "
          f"{lag_ms:.1f}")
    _write_report(args.report, {
        "step": "temporal", "input": str(args.input), "tracking": str(args.tracking or args.input),
        "lag_ms": lag_ms, "time_offset_ms": lag_ms, "correlation": result.correlation,
        "image_samples": int(np.isfinite(image_signal).sum()),
        "tracker_samples": len(tracker_signal),
        "lags_ms": _round(result.lags_s * 1e3, 3), "scores": _round(result.scores, 5),
        "method": "line depth vs probe position, normalised correlation (after PLUS)"})
    if args.plot:
        plots.plot_lag(args.plot, result.lags_s, result.scores, result.lag_s,
                       tracker=(tracked.times_s, tracker_signal), image=(times, image_signal))
        print(f"wrote {args.plot}")
    return 0


def run_landmarks(args) -> int:

    from regseg.calibration import markups, plots, points, transforms_io

    for flag in ("--fixed", "--moving", "--targets"):
        value = getattr(args, flag[2:])
        if value:
            check_readable_file(value, flag)
    _check_outputs(args, "--out", "--report", "--plot")
    fixed = markups.read_landmarks(args.fixed)
    moving = markups.read_landmarks(args.moving)
    labels, in_mri, in_reference = markups.pair_landmarks(fixed, moving, f"--fixed {args.fixed}",
                                                          f"--moving {args.moving}")
    reg = points.register_points(in_reference, in_mri, similarity=args.similarity)
    n = len(labels)
    targets = markups.read_landmarks(args.targets) if args.targets else \
        markups.Landmarks(["centroid"], in_mri.mean(0, keepdims=True))
    tre = points.predicted_tre_mm(in_mri, targets.points_ras, args.fle_mm)
    transforms_io.write_transform(args.out, reg.moving_to_fixed, from_name="Reference",
                                  to_name="MRI", error_mm=reg.fre_mm)
    print(f"landmarks: {n} pairs, FRE {reg.fre_mm:.3f} mm (expected "
          f"{points.expected_fre_mm(args.fle_mm, n):.3f} mm for FLE {args.fle_mm:g} mm); "
          "predicted TRE " + ", ".join(f"{t}: {e:.2f} mm" for t, e in zip(targets.labels, tre,
                                                                           strict=True))
          + f"\nwrote {args.out}")
    _write_report(args.report, {
        "step": "landmarks", "fixed": str(args.fixed), "moving": str(args.moving),
        "out": str(args.out), "reference_to_mri": _round(reg.moving_to_fixed, 6),
        "scale": reg.scale, "fre_mm": reg.fre_mm,
        "residuals_mm": dict(zip(labels, _round(reg.residuals_mm), strict=True)),
        "fle_mm": args.fle_mm, "expected_fre_mm": points.expected_fre_mm(args.fle_mm, n),
        "predicted_tre_mm": dict(zip(targets.labels, _round(tre), strict=True)),
        "method": "Arun/Umeyama SVD; FRE/TRE after Fitzpatrick 1998"})
    if args.plot:
        plots.plot_residuals(args.plot, reg.residuals_mm, labels=labels, xlabel="landmark",
                             title="landmark registration residuals")
        print(f"wrote {args.plot}")
    if n < 4:
        print(f"note: {n} landmarks give no check of themselves (FRE ~ 0 whatever the error); "
              "use 4 or more")
    return 0


def run_simulate(args) -> int:
    import torch

    from regseg.calibration.simulate import write_sessions

    torch.set_num_threads(1)  # the B-mode tensors are small: one thread is fastest
    check_writable(Path(args.out) / "truth.json", "--out")
    write_sessions(args.out, args.seed, nwire_frames=args.frames)
    for name in sorted(Path(args.out).iterdir()):
        print(f"wrote {name}")
    return 0
