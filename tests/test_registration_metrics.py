"""Registration metrics: Jacobian determinant and folding (analytic), Dice, HD95, TRE."""

from __future__ import annotations

import numpy as np
import pytest

from regseg.registration_metrics import (
    dice_per_label,
    hd95_mm,
    jacobian_determinant,
    jacobian_stats,
    sample_field,
    tre_mm,
)


def _affine_ddf(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """u(x) = (A - I) x on a grid, array order: det J = det A everywhere."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    return np.einsum("ab,b...->a...", matrix - np.eye(len(shape)), grid)


def test_identity_has_unit_determinant():
    det = jacobian_determinant(np.zeros((3, 6, 7, 8)))
    assert det.shape == (6, 7, 8) and np.allclose(det, 1.0)


@pytest.mark.parametrize("shape", [(9, 11), (6, 7, 8)])
def test_affine_field_determinant_is_det_a(shape):
    rng = np.random.default_rng(0)
    a = np.eye(len(shape)) + 0.2 * rng.standard_normal((len(shape),) * 2)
    det = jacobian_determinant(_affine_ddf(a, shape))
    assert np.allclose(det, np.linalg.det(a))  # differences are exact for a linear field
    stats = jacobian_stats(_affine_ddf(a, shape))
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-9)


def test_reflection_folds_everywhere_and_folding_is_counted():
    flip = np.diag([1.0, 1.0, -1.0])  # a mirror: det = -1
    assert jacobian_stats(_affine_ddf(flip, (5, 5, 5)))["folding_pct"] == 100.0
    # x -> x + u with u = -2 x on half the volume along the last axis: det -1 there, 1 elsewhere
    ddf = np.zeros((2, 8, 20))
    ddf[1, :, 10:] = -2.0 * np.arange(10)[None, :]
    det = jacobian_determinant(ddf)
    assert np.allclose(det[:, 11:], -1.0) and np.allclose(det[:, :9], 1.0)
    stats = jacobian_stats(ddf)
    assert stats["folding_pct"] == pytest.approx(100 * (det <= 0).mean())
    assert 40.0 < stats["folding_pct"] < 60.0


def test_sdlogj_of_known_scalings():
    # half the voxels scaled by 2 along one axis, half by 1: log det J is 0 or ln 2
    ddf = np.zeros((2, 4, 40))
    ddf[1, :, :20] = np.arange(20)[None, :]  # du/dx = 1 -> det 2
    det = jacobian_determinant(ddf)
    mask = np.ones_like(det, dtype=bool)
    mask[:, 19:21] = False  # the kink between the two halves
    stats = jacobian_stats(ddf, mask)
    assert stats["sdlogj"] == pytest.approx(np.log(2) / 2, rel=1e-6)
    assert stats["folding_pct"] == 0.0


def test_jacobian_rejects_bad_shape():
    with pytest.raises(ValueError, match="ndim"):
        jacobian_determinant(np.zeros((3, 4, 4)))


def test_dice_per_label_exact_and_nested():
    truth = np.zeros((10, 10), int)
    truth[2:6, 2:6] = 1
    truth[3:5, 3:5] = 2
    pred = truth.copy()
    pred[3:5, 3:5] = 1  # the lesion called gland
    exact = dice_per_label(pred, truth, [1, 2])
    assert exact[2] == 0.0 and exact[1] == pytest.approx(2 * 12 / (16 + 12))
    nested = dice_per_label(pred, truth, [1, 2], nested_prostate=True)
    assert nested[1] == 1.0  # the gland includes the lesion
    assert np.isnan(dice_per_label(pred, truth, [7])[7])
    with pytest.raises(ValueError, match="shape"):
        dice_per_label(pred, truth[:5])


def test_hd95_of_a_shifted_cube_in_mm():
    a = np.zeros((20, 20, 20), int)
    a[5:15, 5:15, 5:15] = 1
    b = np.roll(a, 2, axis=0)
    assert hd95_mm(a, b, spacing_mm=(1.5, 1.0, 1.0))[1] == pytest.approx(3.0)
    assert hd95_mm(a, a)[1] == 0.0
    assert np.isnan(hd95_mm(a, np.zeros_like(a), [1])[1])


def test_tre_and_field_sampling():
    pred = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    true = pred + np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    out = tre_mm(pred, true)
    assert out["tre_mm"] == pytest.approx(3.0) and out["tre_max_mm"] == pytest.approx(5.0)
    field = _affine_ddf(np.diag([2.0, 1.5, 1.0]), (4, 5, 6))
    points = np.array([[1.5, 2.25, 3.0], [0.0, 4.0, 5.0]])
    assert np.allclose(sample_field(field, points), points * np.array([1.0, 0.5, 0.0]))
