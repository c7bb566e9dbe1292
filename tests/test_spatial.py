"""Analytic tests of regseg.spatial: compositions, grids, reslicing, affine and dense warps."""

import numpy as np
import pytest
import torch

from regseg import spatial


def _random_affine(rng) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rng.normal(size=(3, 3)) + 3 * np.eye(3)
    m[:3, 3] = rng.normal(size=3) * 10
    return m


def test_compose_with_inverse_is_identity():
    rng = np.random.default_rng(0)
    a_to_b = _random_affine(rng)
    assert np.allclose(spatial.compose(spatial.invert(a_to_b), a_to_b), np.eye(4), atol=1e-12)
    assert np.allclose(spatial.compose(a_to_b, spatial.invert(a_to_b)), np.eye(4), atol=1e-12)


def test_compose_reads_right_to_left():
    shift = np.eye(4)
    shift[0, 3] = 5.0
    scale = np.diag([2.0, 2.0, 2.0, 1.0])
    # scale first, then shift: point 1 -> 2 -> 7
    assert spatial.apply(spatial.compose(shift, scale), np.array([[1.0, 0, 0]]))[0, 0] == 7.0


def test_index_to_normalised_maps_voxel_edges_to_minus_one_and_one():
    m = spatial.index_to_normalised((4, 8))
    edges = spatial.apply(m, np.array([[-0.5, -0.5], [3.5, 7.5]]))
    assert np.allclose(edges, [[-1, -1], [1, 1]])


def test_reslice_known_plane_returns_that_slice():
    rng = np.random.default_rng(1)
    data = rng.random((12, 10, 8)).astype(np.float32)  # (I, J, K)
    voxel_to_world = np.diag([0.5, 0.7, 2.0, 1.0])
    voxel_to_world[:3, 3] = [-3.0, 4.0, 1.0]
    vol = torch.from_numpy(data.transpose(2, 1, 0).copy())[None, None]
    image_to_voxel = np.eye(4)
    image_to_voxel[2, 3] = 5  # plane k = 5, image (i, j) = voxel (i, j)
    out = spatial.reslice(vol, spatial.invert(voxel_to_world), voxel_to_world @ image_to_voxel,
                          (10, 12))
    assert out.shape == (1, 1, 10, 12)
    assert np.allclose(out[0, 0].numpy(), data[:, :, 5].T, atol=1e-5)


def test_reslice_nearest_keeps_integer_labels():
    lab = torch.zeros(1, 1, 4, 6, 6, dtype=torch.uint8)
    lab[..., 2:4, 2:4] = 2
    out = spatial.reslice(lab, np.eye(4), np.eye(4), (6, 6), mode="nearest")
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) == {0, 2}
    assert int((out == 2).sum()) == 4


def test_one_pixel_dense_shift():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 3, 3] = 1.0
    ddf = torch.zeros(1, 2, 8, 8)
    ddf[:, 1] = 1.0  # dx = +1: each output pixel samples one column to its right
    moved = spatial.warp(image, ddf)
    assert torch.nonzero(moved[0, 0] > 0.5).tolist() == [[3, 2]]


def test_one_voxel_dense_shift_3d():
    image = torch.zeros(1, 1, 6, 6, 6)
    image[0, 0, 2, 3, 4] = 1.0
    ddf = torch.zeros(1, 3, 6, 6, 6)
    ddf[:, 0] = -1.0  # dz = -1
    moved = spatial.warp(image, ddf)
    assert torch.nonzero(moved[0, 0] > 0.5).tolist() == [[3, 3, 4]]


def test_warp_rejects_mismatched_ddf_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 4\).*\(1, 1, 8, 8\)"):
        spatial.warp(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 4, 4))


def test_theta_pixel_round_trip_and_shift():
    hw = (8, 10)
    a3 = np.array([[1.0, 0.1, 2.0], [-0.05, 0.9, -1.0], [0, 0, 1]])
    theta = spatial.pixel_to_theta(a3, hw)
    assert np.allclose(spatial.theta_to_pixel(theta, hw), a3)
    # a one-pixel shift in x, as a normalised theta, moves a dot by one pixel
    shift = spatial.pixel_to_theta(np.array([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]]), hw)
    image = torch.zeros(1, 1, *hw)
    image[0, 0, 4, 5] = 1.0
    moved = spatial.warp_affine(image, torch.tensor(shift, dtype=torch.float32)[None])
    assert torch.nonzero(moved[0, 0] > 0.5).tolist() == [[4, 4]]


def test_theta_is_resolution_independent():
    theta = np.array([[0.9, 0.1, 0.05], [-0.1, 1.1, -0.02]])
    a_small = spatial.theta_to_pixel(theta, (64, 64))
    a_big = spatial.theta_to_pixel(theta, (256, 256))
    # the same physical point: pixel centre p_small <-> p_big = 4 p + 1.5
    p_small = np.array([10.0, 20.0, 1.0])
    p_big = np.array([4 * 10 + 1.5, 4 * 20 + 1.5, 1.0])
    q_small, q_big = a_small @ p_small, a_big @ p_big
    assert np.allclose(q_big[:2], 4 * q_small[:2] + 1.5)


def test_lift_2d_leaves_k_alone():
    a3 = np.array([[0.0, -1.0, 3.0], [1.0, 0.0, 2.0], [0, 0, 1]])
    m = spatial.lift_2d(a3)
    assert np.allclose(spatial.apply(m, np.array([[1.0, 2.0, 7.0]])), [[1.0, 3.0, 7.0]])


def test_axes_grid_equals_plane_grid():
    # the outer-sum grid the live path builds is the same grid as spatial.plane_grid's matmul
    volume_size = (40, 30, 20)
    world_to_voxel = np.diag([0.5, 0.5, 0.25, 1.0])
    world_to_voxel[:3, 3] = [3.0, -2.0, 1.5]
    image_to_world = spatial.lift_2d(np.array([[0.9, -0.3, 4.0], [0.2, 1.1, 6.0], [0, 0, 1]]))
    image_to_world[2, 3] = 30.0
    expected = spatial.plane_grid(volume_size, world_to_voxel, image_to_world, (7, 9))[0, 0]
    to_norm = spatial.index_to_normalised(volume_size) @ world_to_voxel @ image_to_world
    m = torch.as_tensor(to_norm[:3, [0, 1, 3]], dtype=torch.float32)
    got = spatial.axes_grid(m, *spatial.pixel_axes(7, 9))
    assert got.shape == (7, 9, 3)
    assert torch.allclose(got, expected, atol=1e-5)
