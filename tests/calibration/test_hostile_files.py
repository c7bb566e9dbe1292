"""Broken or hostile calibration inputs: each is refused with an InputError naming the file and
the value (exit 2 from the CLI), never a traceback, and never silently accepted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from regseg.calibration import inputs, markups, transforms_io
from regseg.calibration.live import read_reference_to_mri
from regseg.cli import main
from regseg.errors import InputError

PLUS = '<P><CoordinateDefinitions>{}</CoordinateDefinitions></P>'
REF_TO_MRI = '<Transform From="Reference" To="MRI" Matrix="1 0 0 5 0 1 0 0 0 0 1 0 0 0 0 1"/>'
MRI_TO_REF = '<Transform From="MRI" To="Reference" Matrix="1 0 0 9 0 1 0 0 0 0 1 0 0 0 0 1"/>'


def _markup(points: list, **extra) -> str:
    return json.dumps({"markups": [{"coordinateSystem": "LPS", "controlPoints": [
        {"label": f"L{n}", "position": p, **extra} for n, p in enumerate(points)]}]})


@pytest.mark.parametrize("name, content, message", [
    ("mirror.txt", "-1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "a reflection (determinant -1"),
    ("metres.txt", "1000 0 0 0\n0 1000 0 0\n0 0 1000 0\n0 0 0 1\n", "near-rigid"),
    ("half.tfm", "#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\n"
     "Parameters: 0.5 0 0 0 0.5 0 0 0 0.5 0 0 0\nFixedParameters: 0 0 0\n", "scales 2 to 2"),
    ("twice.xml", PLUS.format(REF_TO_MRI + REF_TO_MRI.replace(" 5 ", " 50 ")),
     "From='Reference' To='MRI' is defined twice"),
    ("both.xml", PLUS.format(REF_TO_MRI + MRI_TO_REF),
     "both ReferenceToMRI and MRIToReference are defined"),
    ("encoding.xml", '<?xml version="1.0" encoding="ebcdic-xx"?><P/>',
     "unknown encoding: ebcdic-xx"),
    ("big.tfm", "#Insight Transform File V1.0\n" + "#" * (5 * 2**20),
     "a transform file of at most"),
    ("text.h5", "not hdf5", "not an HDF5 file (it starts with b'not hdf5')"),
])
def test_reference_to_mri_files_refused(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        read_reference_to_mri(str(path))
    assert str(info.value).startswith(f"--reference-to-mri {path}")


def test_a_rigid_reference_to_mri_still_loads(tmp_path):
    m = np.eye(4)
    m[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    m[:3, 3] = [4.0, 5.0, 6.0]
    for name in ("r.tfm", "r.txt", "r.xml"):
        transforms_io.write_transform(tmp_path / name, m, from_name="Reference", to_name="MRI")
        assert np.allclose(read_reference_to_mri(str(tmp_path / name)), m)


@pytest.mark.parametrize("content, message", [
    (json.dumps({"markups": [1]}), "not a Slicer markups JSON"),  # was AttributeError
    (json.dumps({"markups": "abc"}), "not a Slicer markups JSON"),
    (_markup([[0, 0], [1, 0], [0, 1]]), "control point 'L0' position [0, 0]"),  # was regrouped
    (_markup([[0, 0, 0, 1], [1, 0, 0, 1]]), "position [0, 0, 0, 1]"),  # was ValueError
    (_markup([[0, 0, 0], [1, 0, 0]], positionStatus="undefined"), "positionStatus 'undefined'"),
    ("[" * 100_000, "JSON nested too deeply"),  # was RecursionError
    (_markup([[10**400, 0, 0]]), "OverflowError"),
])
def test_markups_json_refused(tmp_path, content, message):
    path = tmp_path / "m.mrk.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
        markups.read_landmarks(path)
    assert str(path) in str(info.value)


def test_binary_fcsv_refused(tmp_path):
    path = tmp_path / "m.fcsv"
    path.write_bytes(b"\xff\xfe\x00\x01")  # was UnicodeDecodeError
    with pytest.raises(InputError, match="m.fcsv: cannot read .*UTF-8"):
        markups.read_landmarks(path)


def _poses_csv(path, rows: list[list[float]], times=None) -> None:
    header = ",".join(["timestamp_s", *inputs.MATRIX_COLUMNS])
    lines = [",".join(str(v) for v in [t, *r])
             for t, r in zip(times or range(len(rows)), rows, strict=True)]
    path.write_text(header + "\n" + "\n".join(lines) + "\n")


@pytest.mark.parametrize("rotation, line", [
    (np.zeros((3, 3)), "line 2"),  # all zero: the pivot fit used to return tip (0, 0, 0), exit 0
    (np.diag([-1.0, 1.0, 1.0]), "line 2"),  # mirrored
    (np.eye(3) * 2.0, "line 2"),  # scaled
])
def test_tracked_poses_must_be_rigid(tmp_path, rotation, line):
    pose = np.eye(4)
    pose[:3, :3] = rotation
    path = tmp_path / "p.csv"
    _poses_csv(path, [list(pose.ravel())] * 8)
    with pytest.raises(InputError, match=f"p.csv: {line}: pose rotation part .* not a rotation"):
        inputs.read_tracked(path, "StylusToTracker")


def test_tracked_nan_timestamp_refused(tmp_path):
    path = tmp_path / "p.csv"
    _poses_csv(path, [list(np.eye(4).ravel())] * 2, times=[0.0, float("nan")])
    with pytest.raises(InputError, match="p.csv: line 3: timestamp_s 'nan'"):
        inputs.read_tracked(path, "StylusToTracker")


def test_calibrate_cli_exits_2_for_degenerate_poses_and_bad_markups(tmp_path, capsys):
    poses = tmp_path / "p.csv"
    _poses_csv(poses, [[0.0] * 15 + [1.0]] * 20)
    assert main(["calibrate", "pivot", "--input", str(poses), "--out",
                 str(tmp_path / "o.tfm")]) == 2
    err = capsys.readouterr().err
    assert "p.csv: line 2" in err and "not a rotation" in err and "Traceback" not in err
    bad = tmp_path / "bad.mrk.json"
    bad.write_text(json.dumps({"markups": [1]}))
    good = markups.write_landmarks(tmp_path / "good.mrk.json", ["a", "b", "c"], np.eye(3) * 10)
    assert main(["calibrate", "landmarks", "--fixed", str(bad), "--moving", str(good), "--out",
                 str(tmp_path / "o.tfm")]) == 2
    err = capsys.readouterr().err
    assert "bad.mrk.json: not a Slicer markups JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o.tfm").exists()


def test_a_bad_pose_in_a_sequence_file_names_the_file_and_frame(tmp_path):
    path = tmp_path / "s.igs.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 1\nElementType = MET_UCHAR\n"
                     b"Seq_Frame0000_ProbeToTrackerTransform = nan 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1\n"
                     b"ElementDataFile = LOCAL\n\0\0\0\0")
    with pytest.raises(InputError, match=r"s.igs.mha: frame 0: ProbeToTrackerTransform 'nan"):
        inputs.read_tracked(path, "ProbeToTracker")
