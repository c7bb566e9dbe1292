"""Simulated calibration sessions written as the files a user records (``regseg calibrate
simulate``): what the README's "Before the case" walk-through and the tests calibrate from.

Files in ``out``: ``pivot.csv`` (StylusToTracker poses), ``nwire.igs.mha`` (B-mode frames of the
N-wire phantom with ProbeToTrackerTransform), ``phantom_to_tracker.txt`` (the phantom's stylus
registration), ``temporal_video.igs.mha`` (frames over a tank bottom, image clock) with
``temporal_tracker.csv`` (ProbeToTracker, tracker clock), ``landmarks_mri.mrk.json`` and
``landmarks_reference.fcsv`` (the same six fiducials clicked in the MRI and touched with the
stylus), and ``truth.json`` (what each calibration should find).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from regseg.calibration.inputs import write_csv_poses
from regseg.calibration.markups import write_landmarks
from regseg.calibration.points import apply
from regseg.calibration.transforms_io import write_atomic, write_matrix_text
from regseg.sim import calibration as sim

#: Six fiducials around the phantom case's gland (near the MRI origin), MRI RAS mm.
FIDUCIALS_MRI = np.array([[35, 0, 10], [-35, 0, 10], [0, 30, -15], [0, -30, -15], [20, 20, 30],
                          [-20, -20, -30]], dtype=float)
FLE_MRI_MM, FLE_REFERENCE_MM = 1.0, 0.5


def _write_sequence(path: Path, pixels, times_s, transforms: dict[str, np.ndarray] | None,
                    pixel_mm: float) -> None:
    from regseg.sequence_file import format_matrix
    from regseg.sequence_writer import SequenceWriter

    writer = SequenceWriter(path, fields={"UltrasoundImageOrientation": "MF"},
                            spacing_mm=(pixel_mm, pixel_mm))
    for n, (frame, t) in enumerate(zip(pixels, times_s, strict=True)):
        fields = {"Timestamp": repr(float(t))}
        for name, poses in (transforms or {}).items():
            fields[f"{name}Transform"] = format_matrix(poses[n])
            fields[f"{name}TransformStatus"] = "OK"
        writer.add(frame, fields)
    writer.close()


def write_sessions(out: str | Path, seed: int = 0, *, nwire_frames: int = 60,
                   temporal_s: float = 8.0, temporal_fps: float = 20.0) -> dict:
    """Write every simulated session to ``out``; returns the truth (also in truth.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    renderer = sim.ReflectorRenderer(seed=seed)
    pivot = sim.simulate_pivot(seed)
    write_csv_poses(out / "pivot.csv", np.arange(len(pivot.stylus_to_tracker)) / 20.0,
                    pivot.stylus_to_tracker)

    nw = sim.simulate_nwire(seed, nwire_frames, renderer=renderer)
    _write_sequence(out / "nwire.igs.mha", nw.pixels, np.arange(nwire_frames) / 10.0,
                    {"ProbeToTracker": nw.probe_to_tracker}, nw.pixel_mm)
    write_matrix_text(out / "phantom_to_tracker.txt", nw.phantom_to_tracker)

    tm = sim.simulate_temporal(seed, duration_s=temporal_s, image_fps=temporal_fps,
                               renderer=renderer)
    _write_sequence(out / "temporal_video.igs.mha", tm.pixels, tm.image_times_s, None,
                    renderer.pixel_mm)
    write_csv_poses(out / "temporal_tracker.csv", tm.tracker_times_s, tm.probe_to_tracker)

    rng = np.random.default_rng([seed, 31])
    reference_to_mri = np.eye(4)
    reference_to_mri[:3, :3] = Rotation.random(random_state=rng).as_matrix()
    reference_to_mri[:3, 3] = rng.normal(0, 100, 3)
    in_reference = apply(np.linalg.inv(reference_to_mri), FIDUCIALS_MRI)
    labels = [f"F-{n + 1}" for n in range(len(FIDUCIALS_MRI))]
    write_landmarks(out / "landmarks_mri.mrk.json", labels,
                    sim.localise(FIDUCIALS_MRI, FLE_MRI_MM, rng))
    write_landmarks(out / "landmarks_reference.fcsv", labels,
                    sim.localise(in_reference, FLE_REFERENCE_MM, rng))
    truth = {"tip_in_stylus_mm": pivot.tip_in_stylus.tolist(),
             "pivot_in_tracker_mm": pivot.pivot_in_tracker.tolist(),
             "image_to_probe": nw.true_image_to_probe.tolist(), "lag_s": tm.lag_s,
             "reference_to_mri": reference_to_mri.tolist(),
             "noise": {"tracker_position_mm_rms": sim.TRACKER_POSITION_MM,
                       "tracker_angle_deg_rms": sim.TRACKER_ANGLE_DEG,
                       "fle_mri_mm": FLE_MRI_MM, "fle_reference_mm": FLE_REFERENCE_MM}}
    write_atomic(out / "truth.json", json.dumps(truth, indent=2) + "\n")
    return truth
