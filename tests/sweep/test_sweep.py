"""The simulated sweep case (regseg.sim.sweep): its truths agree with each other, it is
deterministic per seed, and the seed ranges are disjoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regseg import spatial
from regseg.calibration import transforms_io
from regseg.imageio import load_labels, load_mri
from regseg.sim.sweep import (
    ATLAS_SEEDS,
    EVAL_SEEDS,
    TRAIN_SEEDS,
    make_sweep_case,
    true_correspondence,
    write_sweep_case,
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def _labels_through(case, reference_to_mri: np.ndarray) -> np.ndarray:
    """The MRI labels on the TRUS grid through a Reference -> MRI map (nearest)."""
    from regseg.engines.registration import resample_to_grid
    from regseg.imageio import Volume

    mri_to_reference = spatial.invert(reference_to_mri)
    moved = Volume(case.mri_labels.data.astype(np.float32),
                   mri_to_reference @ case.mri_labels.voxel_to_world)
    return resample_to_grid(moved, case.trus.data.shape, case.trus.voxel_to_world,
                            mode="nearest")[0].astype(np.uint8)


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(1)
    return make_sweep_case(EVAL_SEEDS[0])


def test_truth_is_consistent(case):
    gland_trus = case.trus_labels.data > 0
    gland_mri = case.mri_labels.data > 0
    # the whole gland is on the TRUS grid and the sweep reaches it
    assert abs(int(gland_trus.sum()) - int(gland_mri.sum())) < 0.05 * gland_mri.sum()
    assert case.coverage.data[gland_trus].mean() > 0.95
    # the true Reference -> MRI maps the MRI gland onto the TRUS gland (only the probe-pressure
    # and smooth deformation are left); the initial one does not
    true = _labels_through(case, case.reference_to_mri_true) > 0
    initial = _labels_through(case, case.reference_to_mri_initial) > 0
    d_true, d_initial = dice(true, gland_trus), dice(initial, gland_trus)
    assert d_true > 0.85, d_true
    assert d_initial < d_true - 0.1, (d_initial, d_true)
    # the image shows the gland: mid-grey inside, and the labels are the tissue's
    grey = case.trus.data
    inside = grey[gland_trus & (case.coverage.data > 0)].mean()
    assert 0.2 < inside < 0.7
    # the correspondence (deformation included) maps TRUS gland voxels into the MRI gland
    idx = np.argwhere(gland_trus)[::50]
    ref = idx @ case.trus.voxel_to_world[:3, :3].T + case.trus.voxel_to_world[:3, 3]
    mri_pts = true_correspondence(case, ref)
    w2v = spatial.invert(case.mri_labels.voxel_to_world)
    vox = np.rint(mri_pts @ w2v[:3, :3].T + w2v[:3, 3]).astype(int)
    assert (case.mri_labels.data[tuple(vox.T)] > 0).mean() > 0.98


def test_initial_is_off_by_the_requested_misalignment():
    c = make_sweep_case(EVAL_SEEDS[1], misalign_mm=7.0, misalign_deg=4.0)
    error = c.reference_to_mri_initial @ spatial.invert(c.reference_to_mri_true)
    angle = np.degrees(np.arccos(np.clip((np.trace(error[:3, :3]) - 1) / 2, -1, 1)))
    assert abs(angle - 4.0) < 1e-6
    gland = np.argwhere(c.mri_labels.data > 0) @ c.mri_labels.voxel_to_world[:3, :3].T \
        + c.mri_labels.voxel_to_world[:3, 3]
    centre = gland.mean(0)
    assert abs(np.linalg.norm(error[:3, :3] @ centre + error[:3, 3] - centre) - 7.0) < 1e-6


def test_deterministic_per_seed_and_different_across_seeds(case):
    again = make_sweep_case(EVAL_SEEDS[0])
    for name in ("trus", "trus_labels", "coverage", "mri", "mri_labels"):
        assert np.array_equal(getattr(case, name).data, getattr(again, name).data), name
    np.testing.assert_array_equal(case.reference_to_mri_initial, again.reference_to_mri_initial)
    other = make_sweep_case(EVAL_SEEDS[2])
    assert not np.array_equal(case.mri.data[:10, :10, :10], other.mri.data[:10, :10, :10])


def test_seed_ranges_are_disjoint():
    sets = [set(TRAIN_SEEDS), set(ATLAS_SEEDS), set(EVAL_SEEDS)]
    assert all(len(s) >= 50 for s in sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_frames_render_agrees_with_volume_truth(case):
    frames = make_sweep_case(EVAL_SEEDS[0], render="frames", n_frames=24)
    assert frames.trus.data.shape == case.trus.data.shape
    np.testing.assert_allclose(frames.reference_to_mri_true, case.reference_to_mri_true)
    both = (frames.coverage.data > 0) & (case.coverage.data > 0)
    assert both.mean() > 0.3
    d = dice((frames.trus_labels.data > 0) & both, (case.trus_labels.data > 0) & both)
    assert d > 0.9, d


def test_written_files_read_back(case, tmp_path):
    paths = write_sweep_case(case, tmp_path)
    trus = load_mri(paths["trus"])
    np.testing.assert_allclose(trus.voxel_to_world, case.trus.voxel_to_world, atol=1e-5)
    labels = load_labels(paths["mri_labels"], like=load_mri(paths["mri"]))
    assert np.array_equal(labels.data, case.mri_labels.data)
    for ext in ("tfm", "txt"):
        np.testing.assert_allclose(
            transforms_io.read_transform(paths[f"reference_to_mri_true_{ext}"]),
            case.reference_to_mri_true, atol=1e-6)
