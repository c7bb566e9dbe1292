"""resample_to_grid: a moving image already on the fixed grid is copied, as resampling gives."""

import numpy as np

from regseg.engines import registration
from regseg.imageio import Volume


def test_an_image_on_the_same_grid_is_copied_and_equals_the_resampled_one():
    rng = np.random.default_rng(0)
    data = rng.random((9, 11, 7)).astype(np.float32)
    v2w = np.diag([1.5, 1.5, 1.5, 1.0])
    v2w[:3, 3] = (-6.0, 4.0, 2.5)
    out, inside = registration.resample_to_grid(Volume(data, v2w), data.shape, v2w)
    assert inside == 1.0 and out.dtype == np.float32
    assert np.array_equal(out, data) and out is not data
    out[0, 0, 0] = -1.0
    assert data[0, 0, 0] != -1.0  # a copy, not a view
    # the general path (a grid shifted by a millionth of a voxel more than the tolerance)
    shifted = v2w.copy()
    shifted[0, 3] += 1e-5
    general, inside = registration.resample_to_grid(Volume(data, v2w), data.shape, shifted)
    assert inside == 1.0
    assert np.allclose(general, data, atol=1e-4)
    # another grid is resampled, not copied
    half = v2w.copy()
    half[:3, :3] *= 2.0
    other, inside = registration.resample_to_grid(Volume(data, v2w), data.shape, half)
    assert inside < 1.0 and not np.allclose(other, data)
