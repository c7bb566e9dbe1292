"""The compiled plane reslicer (regseg.kernels.plane_sample) against torch's F.grid_sample."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regseg.kernels import plane_sample

pytestmark = pytest.mark.skipif(not plane_sample.available(), reason="numba not installed")


def _torch(volume: np.ndarray, maps: np.ndarray, hw) -> np.ndarray:
    h, w = hw
    jj, ii = np.mgrid[:h, :w]
    pixels = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)], 1)
    grid = torch.as_tensor(pixels @ maps, dtype=torch.float32).reshape(len(maps), 1, h, w, 3)
    src = torch.from_numpy(volume)[None, None].expand(len(maps), -1, -1, -1, -1)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0, 0].numpy()


@pytest.mark.parametrize(("shape", "hw", "reach"), [((9, 11, 13), (17, 23), 0.8),
                                                     ((6, 5, 7), (8, 9), 1.6)])
def test_equals_grid_sample_inside_across_the_border_and_outside(shape, hw, reach):
    rng = np.random.default_rng(3)
    volume = rng.normal(size=shape).astype(np.float32)
    maps = np.zeros((4, 4, 3))
    maps[:, 0] = rng.normal(0, 1.0 / hw[1], (4, 3))  # pixel i's step
    maps[:, 1] = rng.normal(0, 1.0 / hw[0], (4, 3))  # pixel j's step
    maps[:, 2] = rng.normal(size=(4, 3))  # k is 0: must add nothing
    maps[:, 3] = rng.uniform(-reach, reach, (4, 3))  # origin: some planes leave the volume
    got = plane_sample.sample_planes(volume, maps, hw)
    ref = _torch(volume, maps, hw)
    assert got.shape == ref.shape == (4, *hw) and got.dtype == np.float32
    assert np.abs(ref).max() > 0.1  # the planes cross the volume
    assert np.allclose(got, ref, atol=2e-5 * np.abs(volume).max())
    if reach > 1:  # the case covers points outside the volume (zeros padding)
        assert (ref == 0).any()


@pytest.mark.parametrize("reach", [0.8, 1.6])
def test_the_interior_fast_path_adds_the_same_bits(reach):
    """Points whose eight neighbours are all inside skip the bounds tests; the same float64 sum
    in the same order, so the same values to the bit as the kernel testing every neighbour."""
    rng = np.random.default_rng(11)
    volume = rng.normal(size=(9, 11, 13)).astype(np.float32)
    maps = np.zeros((5, 4, 3))
    maps[:, 0] = rng.normal(0, 1.0 / 23, (5, 3))
    maps[:, 1] = rng.normal(0, 1.0 / 17, (5, 3))
    maps[:, 3] = rng.uniform(-reach, reach, (5, 3))
    fast = plane_sample.sample_planes(volume, maps, (17, 23))
    every = plane_sample.sample_planes(volume, maps, (17, 23), interior=False)
    assert np.array_equal(fast, every)
    assert (fast != 0).mean() > 0.2  # many points sample the volume
