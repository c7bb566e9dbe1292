"""regseg.crossmodal: the label-free affine stage brings a 10 mm / 10 degree misaligned MRI onto
its simulated TRUS sweep (TRE against the simulator's true correspondence), and bad input is
refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regseg.crossmodal import register_cross_modal
from regseg.errors import InputError
from regseg.imageio import Volume
from regseg.sim.sweep import EVAL_SEEDS, make_sweep_case, true_correspondence


def tre_mm(case, fixed_to_moving: np.ndarray, ddf_mm: np.ndarray | None = None) -> float:
    """Mean distance over the TRUS gland between where a registration and the truth put it."""
    idx = np.argwhere(case.trus_labels.data > 0)[::10]
    v2w = case.trus.voxel_to_world
    ref = idx @ v2w[:3, :3].T + v2w[:3, 3]
    true = true_correspondence(case, ref)
    pts = ref if ddf_mm is None else ref + ddf_mm[:, idx[:, 0], idx[:, 1], idx[:, 2]].T
    est = pts @ fixed_to_moving[:3, :3].T + fixed_to_moving[:3, 3]
    return float(np.linalg.norm(est - true, axis=1).mean())


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(1)
    return make_sweep_case(EVAL_SEEDS[3])


def test_affine_registers_a_misaligned_mri_to_its_sweep(case):
    before = tre_mm(case, case.reference_to_mri_initial)
    result = register_cross_modal(case.mri, case.mri_labels, case.trus, method="affine",
                                  initial_fixed_to_moving=case.reference_to_mri_initial)
    after = tre_mm(case, result.fixed_to_moving)
    print(f"affine: TRE {before:.2f} -> {after:.2f} mm in {result.seconds:.1f} s")
    assert before > 8.0
    assert after < 2.0
    assert result.ddf_mm is None
    assert result.warped_image.shape == case.trus.data.shape
    assert result.warped_onehot.shape == (3, *case.trus.data.shape)
    np.testing.assert_allclose(result.warped_onehot.sum(0), 1.0, atol=1e-4)
    gland = result.warped_onehot[1] + result.warped_onehot[2] > 0.5
    truth = case.trus_labels.data > 0
    assert 2 * (gland & truth).sum() / (gland.sum() + truth.sum()) > 0.85


def test_bad_input_is_refused(case):
    with pytest.raises(InputError, match="method"):
        register_cross_modal(case.mri, case.mri_labels, case.trus, method="nope")
    with pytest.raises(InputError, match="3-D"):
        register_cross_modal(case.mri, case.mri_labels,
                             Volume(case.trus.data[..., 0], case.trus.voxel_to_world),
                             method="affine")
    with pytest.raises(InputError, match="swept"):
        register_cross_modal(case.mri, case.mri_labels,
                             Volume(np.zeros_like(case.trus.data), case.trus.voxel_to_world),
                             method="affine")
