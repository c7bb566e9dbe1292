"""spatial.grid_sample: one-volume 3-D calls split across threads give F.grid_sample's results."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regseg import spatial


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("grid_shape", [(1, 24, 16, 20, 3), (1, 8192, 1, 1, 3)],
                         ids=["dense", "points"])
@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_split_sampling_equals_torch_values_and_gradients(two_threads, grid_shape, padding):
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 12, 14, 10, generator=gen).requires_grad_(True)
    grid = (torch.rand(*grid_shape, generator=gen) * 2.4 - 1.2).requires_grad_(True)
    assert grid[..., 0].numel() >= spatial.SPLIT_MIN_POINTS  # the split path is taken
    kwargs = dict(mode="bilinear", padding_mode=padding, align_corners=False)
    want = F.grid_sample(image, grid, **kwargs)
    got = spatial.grid_sample(image, grid, **kwargs)
    assert got.shape == want.shape and torch.equal(got, want)
    weights = torch.randn(*want.shape, generator=gen)
    g_want = torch.autograd.grad((want * weights).sum(), (image, grid))
    g_got = torch.autograd.grad((got * weights).sum(), (image, grid))
    assert torch.allclose(g_got[0], g_want[0], atol=1e-5)
    assert torch.equal(g_got[1], g_want[1])


def test_calls_it_cannot_split_go_to_torch_unchanged(two_threads):
    image = torch.randn(2, 1, 6, 6, 6)  # a batch of two: already parallel over it
    grid = torch.rand(2, 5, 6, 6, 3) * 2 - 1  # 5 not divisible by the threads either
    assert torch.equal(spatial.grid_sample(image, grid, align_corners=False),
                       F.grid_sample(image, grid, align_corners=False))
    flat = torch.randn(1, 1, 8, 8)
    grid2 = torch.rand(1, 64, 64, 2) * 2 - 1
    assert torch.equal(spatial.grid_sample(flat, grid2, align_corners=False),
                       F.grid_sample(flat, grid2, align_corners=False))


def test_displaced_points_are_the_homogeneous_product():
    """spatial.displaced_points: (index grid + ddf, 1) @ matrix[:3].T, per fixed voxel."""
    shape_ijk = (5, 4, 3)
    ddf = torch.randn(1, 3, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    matrix = np.random.default_rng(1).normal(size=(4, 4))
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (3, 4, 5)],
                             indexing="ij")
    points = torch.stack([i, j, k], -1) + ddf[0].flip(0).permute(1, 2, 3, 0)
    want = (torch.cat([points, torch.ones_like(points[..., :1])], -1)
            @ torch.as_tensor(matrix[:3].T, dtype=torch.float32))
    got = spatial.displaced_points(shape_ijk, ddf, matrix)
    assert got.shape == (3, 4, 5, 3)
    assert torch.allclose(got, want, atol=1e-5)
