"""Analytic checks of regseg.metrics: Dice, TRE and the true in-plane theta."""

import math

import numpy as np
import pytest
import torch

from regseg import metrics, spatial
from regseg.types import LESION, PROSTATE


def test_dice_identical_disjoint_and_empty():
    a = np.zeros((8, 8), np.uint8)
    a[2:5, 2:5] = PROSTATE
    b = np.zeros((8, 8), np.uint8)
    b[6:8, 6:8] = PROSTATE
    assert metrics.dice(a, a, PROSTATE) == 1.0
    assert metrics.dice(a, b, PROSTATE) == 0.0
    assert math.isnan(metrics.dice(a, a, LESION))  # absent from both: NaN, skipped by callers


def test_dice_half_overlap_and_prostate_includes_lesion():
    a = np.zeros((4, 4), np.uint8)
    a[:2] = PROSTATE
    b = np.zeros((4, 4), np.uint8)
    b[:2, :2] = PROSTATE
    b[:2, 2:] = LESION  # the lesion lies in the gland: still prostate
    assert metrics.dice(a, b, PROSTATE) == 1.0
    assert metrics.dice(a, b, LESION) == 0.0
    c = np.zeros((4, 4), np.uint8)
    c[:1] = PROSTATE
    assert metrics.dice(a, c, PROSTATE) == pytest.approx(2 * 4 / (8 + 4))


def test_dice_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differs from truth"):
        metrics.dice(np.zeros((2, 2)), np.zeros((3, 3)), PROSTATE)


def _plane(spacing_mm=0.5):
    image_to_mri = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    image_to_mri[:3, 3] = [-10.0, 5.0, 2.0]
    return image_to_mri


def test_tre_identical_and_translated():
    points = np.array([[0.0, 0.0], [10.0, 20.0], [63.0, 5.0]])
    a = _plane()
    assert metrics.tre_mm(a, a, points) == 0.0
    shifted = a.copy()
    shifted[:3, 3] += [0.0, 3.0, 0.0]  # 3 mm anterior
    assert metrics.tre_mm(shifted, a, points) == pytest.approx(3.0)
    assert math.isnan(metrics.tre_mm(a, a, np.zeros((0, 2))))


def test_true_theta_of_known_in_plane_shift():
    hw = (64, 128)
    tracked = _plane()
    shift = np.eye(4)
    shift[0, 3] = 4.0  # the anatomy under pixel i lies under i + 4 on the tracked plane
    true = tracked @ shift
    theta = metrics.true_theta(tracked, true, hw)
    np.testing.assert_allclose(theta, [[1, 0, 2 * 4 / hw[1]], [0, 1, 0]], atol=1e-12)
    # warp_affine with it moves the tracked plane's content 4 pixels towards -i
    image = torch.zeros(1, 1, *hw)
    image[..., 30:34, 50:60] = 1.0
    warped = spatial.warp_affine(image, torch.as_tensor(theta)[None].float())
    torch.testing.assert_close(warped[..., 30:34, 46:56], image[..., 30:34, 50:60])
    # and the registered plane equals the truth
    np.testing.assert_allclose(metrics.registered_image_to_mri(theta, tracked, hw), true,
                               atol=1e-9)


def test_true_theta_drops_out_of_plane_error():
    hw = (64, 64)
    tracked = _plane()
    error = np.eye(4)
    error[2, 3] = 3.0  # 3 pixels along the plane normal: nothing a 2-D affine can undo
    theta = metrics.true_theta(tracked, tracked @ error, hw)
    np.testing.assert_allclose(theta, np.eye(2, 3), atol=1e-12)


def test_tissue_tre_counts_the_tissue_motion_and_the_registration_field():
    plane = np.diag([0.5, 0.5, 0.5, 1.0])  # 0.5 mm pixels
    h, w = 20, 30
    motion = np.zeros((h, w, 2), np.float32)
    motion[..., 0] = 2.0  # the tissue under pixel p lies 2 px (1 mm) further along i
    pts = np.array([[3, 4], [10, 12], [25, 19]])
    # the plane alone misses the tissue by the motion: 1 mm
    assert metrics.tissue_tre_mm(plane, plane, motion, pts) == pytest.approx(1.0)
    assert metrics.tre_mm(plane, plane, pts) == 0.0
    # a registration field (dj, di) that follows the motion finds it exactly
    ddf = np.zeros((2, h, w), np.float32)
    ddf[1] = 2.0
    assert metrics.tissue_tre_mm(plane, plane, motion, pts, ddf) == pytest.approx(0.0)
    # so does a plane shifted by the motion; a field along j instead is sqrt(1 + 1) mm off
    shifted = plane.copy()
    shifted[0, 3] = 1.0
    assert metrics.tissue_tre_mm(shifted, plane, motion, pts) == pytest.approx(0.0)
    wrong = np.zeros((2, h, w), np.float32)
    wrong[0] = 2.0
    assert metrics.tissue_tre_mm(plane, plane, motion, pts, wrong) == pytest.approx(np.sqrt(2))
    assert math.isnan(metrics.tissue_tre_mm(plane, plane, motion, np.zeros((0, 2))))
