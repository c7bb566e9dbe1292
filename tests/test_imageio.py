"""NIfTI loading: bad input is refused with the file, the value and what was expected."""

import nibabel as nib
import numpy as np
import pytest

from regseg.errors import InputError
from regseg.imageio import Volume, load_labels, load_mri, save_volume


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_round_trip(tmp_path):
    affine = np.diag([0.5, 0.6, 0.7, 1.0])
    affine[:3, 3] = [1, 2, 3]
    vol = Volume(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32), affine)
    save_volume(vol, tmp_path / "a.nii.gz")
    back = load_mri(tmp_path / "a.nii.gz")
    assert np.allclose(back.data, vol.data) and np.allclose(back.voxel_to_world, affine)
    assert np.allclose(back.spacing_mm, (0.5, 0.6, 0.7))


def test_reoriented_to_ras(tmp_path):
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS on disk
    data = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    back = load_mri(_write(tmp_path / "las.nii.gz", data, affine))
    assert back.voxel_to_world[0, 0] > 0
    assert np.allclose(back.data, data[::-1])


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.nii\.gz: MRI file not found"):
        load_mri(tmp_path / "nope.nii.gz")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(b"this is not a nifti file")
    with pytest.raises(InputError, match=r"bad\.nii\.gz: cannot read MRI as NIfTI"):
        load_mri(path)


def test_2d_image_refused(tmp_path):
    path = _write(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.float32))
    with pytest.raises(InputError, match=r"flat\.nii\.gz: MRI is 2-D with shape \(32, 32\); a 3-D"):
        load_mri(path)


def test_nan_refused(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 1, 1] = np.nan
    with pytest.raises(InputError, match="1 non-finite voxels"):
        load_mri(_write(tmp_path / "nan.nii.gz", data))


def test_labels_outside_set_refused(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, 0] = 7
    with pytest.raises(InputError,
                       match=r"label values \[7\] are not allowed; expected only \[0, 1, 2\]"):
        load_labels(_write(tmp_path / "lab.nii.gz", data))


def test_labels_grid_mismatch_refused(tmp_path):
    mri = load_mri(_write(tmp_path / "mri.nii.gz", np.zeros((4, 4, 4), np.float32)))
    lab = _write(tmp_path / "lab.nii.gz", np.zeros((4, 4, 5), np.float32))
    with pytest.raises(InputError, match=r"label grid \(4, 4, 5\) does not match the MRI"):
        load_labels(lab, like=mri)
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    lab2 = _write(tmp_path / "lab2.nii.gz", np.zeros((4, 4, 4), np.float32), shifted)
    with pytest.raises(InputError, match="voxel-to-world matrix"):
        load_labels(lab2, like=mri)
