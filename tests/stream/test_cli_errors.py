"""regseg-stream refuses bad input with exit status 2 and one paragraph, never a traceback."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

STREAM = [sys.executable, "-m", "regseg.stream.cli"]


def _run(*args):
    return subprocess.run([*STREAM, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def labels(tmp_path):
    path = tmp_path / "labels.nii.gz"
    data = np.zeros((8, 8, 8), np.uint8)
    data[2:6, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("regseg-stream: error: ")
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_missing_mri(tmp_path, labels):
    proc = _run("--mri", str(tmp_path / "missing.nii.gz"), "--mri-labels", str(labels),
                "--source", "igtl://127.0.0.1:18944", "--serve", "none")
    _assert_clean_error(proc, "missing.nii.gz", "MRI file not found")


def test_malformed_mri(tmp_path, labels):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    proc = _run("--mri", str(bad), "--mri-labels", str(labels), "--source", "igtl://127.0.0.1:1")
    _assert_clean_error(proc, "broken.nii.gz", "cannot read MRI as NIfTI")


def test_2d_mri(tmp_path, labels):
    flat = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.float32), np.eye(4)), str(flat))
    proc = _run("--mri", str(flat), "--mri-labels", str(labels), "--source", "igtl://127.0.0.1:1")
    _assert_clean_error(proc, "slice.nii.gz", "2-D", "a 3-D volume")


def test_bad_source_url(labels):
    proc = _run("--mri", str(labels), "--mri-labels", str(labels), "--source", "rtsp://x")
    _assert_clean_error(proc, "rtsp://x", "expected igtl://HOST:PORT")


def test_no_source():
    _assert_clean_error(_run(), "no --source given")
