"""The live path's calibration inputs: the pose chain and time offset in the pairer, and
regseg-stream's flags (--probe-calibration, --reference-to-mri, landmarks, --time-offset-ms)."""

from __future__ import annotations

import numpy as np
import pytest

from regseg.calibration import markups, transforms_io
from regseg.errors import InputError
from regseg.stream.cli import build_parser
from regseg.stream.cli_args import check_args
from regseg.stream.igtl.pairing import Pose, TimestampPairer

IMAGE_TO_PROBE = np.diag([0.2, 0.2, 1.0, 1.0])
IMAGE_TO_PROBE[:3, 3] = [1.0, 2.0, 3.0]


def _pose(t: float, x: float) -> Pose:
    m = np.eye(4)
    m[0, 3] = x
    return Pose(m, t, True, int(t * 1e9))


def test_pairer_chains_probe_poses_and_applies_the_time_offset():
    pairer: TimestampPairer[str] = TimestampPairer(image_to_probe=IMAGE_TO_PROBE,
                                                   time_offset_s=0.1, tolerance_s=0.005)
    for k in range(10):
        pairer.add_pose(_pose(k * 0.05, float(k)))
    (out,) = pairer.add_image("frame", 0.2, int(0.45e9))  # image at 0.2 s = tracker 0.3 s (k=6)
    assert np.allclose(out.pose.matrix, _pose(0, 6.0).matrix @ IMAGE_TO_PROBE)
    (lost,) = pairer.add_image("no pose", 5.0, int(5e9))
    assert lost.pose is not None and not lost.pose.valid  # never the IMAGE's own matrix
    assert pairer.stats()["probe_calibration"] and pairer.stats()["time_offset_ms"] == 100.0


@pytest.fixture
def files(tmp_path):
    for name in ("case.nii.gz", "labels.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def _plan(files, *extra):
    args = build_parser().parse_args(["--mri", str(files / "case.nii.gz"), "--mri-labels",
                                      str(files / "labels.nii.gz"), "--source",
                                      "igtl://127.0.0.1:18944", "--device", "cpu", *extra])
    return check_args(args)


def test_reference_to_mri_from_a_slicer_tfm_and_from_landmarks(files):
    m = np.eye(4)
    m[:3, 3] = [5.0, -3.0, 2.0]
    transforms_io.write_transform(files / "r.tfm", m)
    assert np.allclose(_plan(files, "--reference-to-mri", str(files / "r.tfm")).reference_to_mri,
                       m)
    pts = np.array([[0, 0, 0], [50, 0, 0], [0, 40, 0], [0, 0, 30], [20, 20, 20.0]])
    labels = [f"F{i}" for i in range(len(pts))]
    markups.write_landmarks(files / "mri.mrk.json", labels, pts + [5.0, -3.0, 2.0])
    markups.write_landmarks(files / "ref.fcsv", labels, pts)
    plan = _plan(files, "--landmarks-mri", str(files / "mri.mrk.json"), "--landmarks-reference",
                 str(files / "ref.fcsv"))
    assert np.allclose(plan.reference_to_mri, m, atol=1e-9) and plan.landmarks.fre_mm < 1e-9
    assert "FRE 0.00 mm" in plan.landmarks.describe()


def test_probe_calibration_from_a_plus_config(files):
    transforms_io.write_transform(files / "cal.xml", IMAGE_TO_PROBE, from_name="Image",
                                  to_name="Probe")
    plan = _plan(files, "--probe-calibration", str(files / "cal.xml"), "--time-offset-ms", "12")
    assert np.allclose(plan.image_to_probe, IMAGE_TO_PROBE) and plan.time_offset_s == 0.012


@pytest.mark.parametrize("make, extra, message", [
    (None, ["--landmarks-mri", "{d}/case.nii.gz"], "go together"),
    ("xml_without", ["--probe-calibration", "{d}/cal.xml"], "no Transform From='Image'"),
    ("probe_to_image", ["--probe-calibration", "{d}/cal.txt"], "pixel axes of 10 and 10 mm"),
    ("tfm", ["--reference-to-mri", "{d}/r.tfm", "--landmarks-mri", "{d}/a.fcsv",
             "--landmarks-reference", "{d}/a.fcsv"], "give one of them"),
])
def test_bad_calibration_flags_are_refused_naming_them(files, make, extra, message):
    if make == "xml_without":
        transforms_io.write_transform(files / "cal.xml", np.eye(4), from_name="Stylus",
                                      to_name="Tracker")
    elif make == "probe_to_image":
        transforms_io.write_transform(files / "cal.txt", np.diag([10.0, 10.0, 1.0, 1.0]))
    elif make == "tfm":
        transforms_io.write_transform(files / "r.tfm", np.eye(4))
        markups.write_landmarks(files / "a.fcsv", ["a", "b", "c"], np.eye(3) * 10)
    with pytest.raises(InputError, match=message):
        _plan(files, *[a.format(d=files) for a in extra])


def test_probe_calibration_needs_an_igtl_source(files):
    transforms_io.write_transform(files / "cal.txt", IMAGE_TO_PROBE)
    args = build_parser().parse_args(["--demo", "--probe-calibration", str(files / "cal.txt"),
                                      "--serve", "none", "--zmq", "none"])
    with pytest.raises(InputError, match="only with an igtl:// source"):
        check_args(args)
