"""``regseg calibrate``: each step on a simulated session finds the truth; bad input exits 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regseg.calibration import transforms_io
from regseg.calibration.simulate import write_sessions
from regseg.cli import main


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    torch.set_num_threads(1)  # small tensors: more threads only fight over the 2 cores
    out = tmp_path_factory.mktemp("calib")
    truth = write_sessions(out, 1, nwire_frames=14, temporal_s=6.0, temporal_fps=15.0)
    return out, truth


def test_pivot(session, tmp_path, capsys):
    folder, truth = session
    out, report = tmp_path / "tip.tfm", tmp_path / "pivot.json"
    assert main(["calibrate", "pivot", "--input", str(folder / "pivot.csv"), "--out", str(out),
                 "--report", str(report), "--plot", str(tmp_path / "p.png")]) == 0
    tip = transforms_io.read_transform(out)[:3, 3]
    assert np.linalg.norm(tip - truth["tip_in_stylus_mm"]) < 0.3
    r = json.loads(report.read_text())
    assert len(r["residuals_mm"]) == 200 and r["rms_mm"] > 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_probe_writes_a_plus_config_the_stream_reads(session, tmp_path):
    folder, truth = session
    out = tmp_path / "PlusDeviceSet.xml"
    assert main(["calibrate", "probe", "--input", str(folder / "nwire.igs.mha"),
                 "--phantom-to-tracker", str(folder / "phantom_to_tracker.txt"),
                 "--out", str(out), "--report", str(tmp_path / "probe.json")]) == 0
    m = transforms_io.read_transform(out, from_name="Image", to_name="Probe")
    corners = np.array([[0, 0, 0, 1], [255, 0, 0, 1], [0, 255, 0, 1], [255, 255, 0, 1.0]])
    err = np.linalg.norm((corners @ (m - np.array(truth["image_to_probe"])).T)[:, :3], axis=1)
    assert err.max() < 1.0, err
    r = json.loads((tmp_path / "probe.json").read_text())
    assert r["holdout_frames"] > 0 and r["holdout_rms_mm"] < 1.0


def test_temporal(session, tmp_path, capsys):
    folder, truth = session
    assert main(["calibrate", "temporal", "--input", str(folder / "temporal_video.igs.mha"),
                 "--tracking", str(folder / "temporal_tracker.csv"),
                 "--report", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")]) == 0
    lag_ms = json.loads((tmp_path / "t.json").read_text())["lag_ms"]
    assert abs(lag_ms - truth["lag_s"] * 1e3) < 2.0
    assert f"--time-offset-ms {lag_ms:.1f}" in capsys.readouterr().out


def test_landmarks(session, tmp_path, capsys):
    folder, truth = session
    out = tmp_path / "ReferenceToMRI.tfm"
    assert main(["calibrate", "landmarks", "--fixed", str(folder / "landmarks_mri.mrk.json"),
                 "--moving", str(folder / "landmarks_reference.fcsv"), "--out", str(out)]) == 0
    m = transforms_io.read_transform(out)
    centre = np.zeros(3)  # the fiducials surround the MRI origin: the TRE there is small
    in_ref = np.linalg.inv(truth["reference_to_mri"]) @ [*centre, 1]
    assert np.linalg.norm((m @ in_ref)[:3] - centre) < 2.0
    assert "FRE" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["pivot", "--input", "{d}/missing.csv", "--out", "{t}/x.tfm"], "file not found"),
    (["pivot", "--input", "{d}/landmarks_mri.mrk.json", "--out", "{t}/x.tfm"],
     "neither a CSV nor a PLUS sequence file"),
    (["probe", "--input", "{d}/nwire.igs.mha", "--phantom-to-tracker", "{d}/pivot.csv",
      "--out", "{t}/x.xml"], "cannot read a matrix"),
    (["probe", "--input", "{d}/nwire.igs.mha", "--probe", "ProbeToReference",
      "--phantom-to-tracker", "{d}/phantom_to_tracker.txt", "--out", "{t}/x.xml"],
     "no ProbeToReferenceTransform in its frames"),
    (["landmarks", "--fixed", "{d}/landmarks_mri.mrk.json", "--moving", "{d}/pivot.csv",
      "--out", "{t}/x.tfm"], "not a markups file name"),
    (["pivot", "--input", "{d}/pivot.csv", "--out", "{d}"], "is a folder"),
])
def test_bad_input_exits_2_naming_it_and_writes_nothing(session, tmp_path, capsys, argv,
                                                        message):
    folder, _ = session
    args = [a.format(d=folder, t=tmp_path) for a in argv]
    assert main(["calibrate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
