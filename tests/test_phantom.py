"""Tests of regseg.sim.phantom: determinism, labels and grid, anatomy, NIfTI round trip."""

import numpy as np
import pytest

from regseg.imageio import load_labels, load_mri
from regseg.sim import phantom as ph
from regseg.types import BACKGROUND, LESION, PROSTATE


@pytest.fixture(scope="module")
def case() -> ph.Phantom:
    return ph.make_phantom(0)


def _world(volume, mask: np.ndarray) -> np.ndarray:
    """World mm (N, 3) of the voxels where ``mask`` is true."""
    v2w = volume.voxel_to_world
    return np.argwhere(mask) @ v2w[:3, :3].T + v2w[:3, 3]


def test_same_seed_gives_identical_arrays(case):
    again = ph.make_phantom(0)
    for a, b in [(case.mri, again.mri), (case.labels, again.labels), (case.tissue, again.tissue)]:
        assert np.array_equal(a.data, b.data)
        assert np.array_equal(a.voxel_to_world, b.voxel_to_world)


def test_different_seed_gives_different_anatomy(case):
    other = ph.make_phantom(1)
    assert other.seed == 1
    assert not np.array_equal(case.labels.data, other.labels.data)
    gland_a, gland_b = case.labels.data > 0, other.labels.data > 0
    overlap = (gland_a & gland_b).sum() / (gland_a | gland_b).sum()
    assert overlap < 0.95


def test_grids_dtypes_and_spacing_are_consistent(case):
    assert case.mri.data.dtype == np.float32
    assert case.labels.data.dtype == np.uint8 and case.tissue.data.dtype == np.uint8
    assert case.mri.data.shape == case.labels.data.shape == case.tissue.data.shape
    assert np.array_equal(case.mri.voxel_to_world, case.labels.voxel_to_world)
    assert np.array_equal(case.mri.voxel_to_world, case.tissue.voxel_to_world)
    assert np.allclose(case.mri.spacing_mm, 0.7)
    extent = np.asarray(case.mri.data.shape) * 0.7
    assert np.all(np.abs(extent - (90, 90, 80)) < 1.0)
    # the grid is centred on world (0, 0, 0)
    centre = case.mri.voxel_to_world @ np.r_[(np.asarray(case.mri.data.shape) - 1) / 2, 1.0]
    assert np.allclose(centre[:3], 0.0, atol=1e-6)


def test_label_values_and_labels_follow_tissue(case):
    assert set(np.unique(case.labels.data)) == {BACKGROUND, PROSTATE, LESION}
    assert np.array_equal(case.labels.data, ph.TISSUE_TO_LABEL[case.tissue.data])
    assert set(np.unique(case.tissue.data)) <= set(ph.TISSUE_NAMES)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lesion_lies_inside_the_gland(seed, case):
    p = case if seed == 0 else ph.make_phantom(seed)
    labels, tissue = p.labels.data, p.tissue.data
    lesion = labels == LESION
    assert 0 < lesion.sum() < 0.5 * (labels > 0).sum()
    # Every face neighbour of a lesion voxel is gland, lesion, or the capsule around the gland.
    inside = (labels != BACKGROUND) | (tissue == ph.CAPSULE)
    for axis in range(3):
        for step in (1, -1):
            assert np.all(np.roll(inside, step, axis)[lesion])


def test_anatomy_is_where_it_should_be(case):
    gland = _world(case.labels, case.labels.data > 0)
    centroid = gland.mean(0)
    assert np.all(np.abs(centroid) < 5.0)  # gland centred near world (0, 0, 0)
    width = np.ptp(gland[:, 0])
    assert 30.0 < width < 56.0
    lumen = _world(case.tissue, case.tissue.data == ph.RECTAL_LUMEN).mean(0)
    assert -33.0 < lumen[1] < -20.0  # rectum posterior (A = +y), where the probe goes
    urine = _world(case.tissue, case.tissue.data == ph.URINE).mean(0)
    assert urine[2] > centroid[2] + 10.0 and urine[1] > centroid[1]  # bladder superior-anterior
    calc = case.tissue.data == ph.CALCIFICATION
    assert calc.any() and np.all(case.labels.data[calc] == PROSTATE)


def test_mri_has_t2_contrast(case):
    mri, tissue = case.mri.data, case.tissue.data
    assert np.all(np.isfinite(mri)) and mri.min() >= 0.0

    def mean(t: int) -> float:
        return float(mri[tissue == t].mean())

    assert mean(ph.URINE) > mean(ph.PERIPHERAL_ZONE) > mean(ph.TRANSITION_ZONE) > mean(ph.TUMOUR)
    assert mean(ph.FAT) > mean(ph.SOFT_TISSUE) > mean(ph.RECTAL_LUMEN)


def test_write_phantom_round_trips_through_imageio(case, tmp_path):
    mri_path, labels_path = ph.write_phantom(case, tmp_path / "out")
    assert mri_path.name == "case.nii.gz" and labels_path.name == "case_labels.nii.gz"
    mri = load_mri(mri_path)
    labels = load_labels(labels_path, like=mri)
    assert np.array_equal(mri.data, case.mri.data)
    assert np.array_equal(labels.data, case.labels.data)
    assert np.allclose(mri.voxel_to_world, case.mri.voxel_to_world, atol=1e-5)


def test_smooth_noise_is_normalised_and_seeded():
    a = ph.smooth_noise(np.random.default_rng(4), (20, 30, 10), 3)
    b = ph.smooth_noise(np.random.default_rng(4), (20, 30, 10), 3)
    assert a.shape == (20, 30, 10) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert abs(float(a.mean())) < 1e-4 and abs(float(a.std()) - 1.0) < 1e-3
