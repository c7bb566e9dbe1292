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


def test_absurd_size_refused_from_the_header_before_decompressing(tmp_path):
    """A .nii.gz of 512^3 zeros is ~130 KB on disk and 512 MiB decompressed: refused with the
    number and the limit, before the data is read (peak memory stays far below its size)."""
    import gzip
    import resource

    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 512))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    path = tmp_path / "zeros.nii.gz"
    zeros = gzip.compress(b"\0" * (1 << 22), compresslevel=9)  # one 4 MiB member, ~4 KB
    with path.open("wb") as f:  # gzip members concatenate: 128 of them are the 512 MiB of data
        f.write(gzip.compress(header.binaryblock + b"\0" * 4))  # vox_offset 352
        for _ in range(512 * 512 * 512 * 4 // (1 << 22)):
            f.write(zeros)
    assert path.stat().st_size < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=r"zeros\.nii\.gz: MRI header declares 512x512x512 = "
                       r"134,217,728 voxels \(0\.5 GiB as float32\); the limit is 67,108,864"):
        load_mri(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100, grown_mib


@pytest.mark.parametrize("affine", [np.zeros((4, 4)), np.diag([1.0, 1.0, 0.0, 1.0])])
def test_singular_voxel_to_world_refused(tmp_path, affine):
    path = tmp_path / "flat.nii.gz"
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    img.set_sform(affine, code=1)
    img.set_qform(None, code=0)
    nib.save(img, str(path))
    with pytest.raises(InputError, match=r"flat\.nii\.gz: MRI voxel-to-world matrix"):
        load_mri(path)
