"""Dense-field algebra: analytic warps, scaling and squaring, inverse fields."""

from __future__ import annotations

import math

import pytest
import torch

from regseg.models.integrate import (
    compose,
    invert_ddf,
    invert_velocity,
    resize_ddf,
    scaling_and_squaring,
)
from regseg.spatial import identity_grid, warp


def _constant(shape: tuple[int, ...], vector: tuple[float, ...]) -> torch.Tensor:
    v = torch.tensor(vector).reshape(1, -1, *([1] * len(shape)))
    return v.expand(1, len(shape), *shape).clone()


@pytest.mark.parametrize("shape", [(12, 14), (8, 10, 12)])
def test_one_voxel_ddf_shifts_by_one_voxel(shape):
    image = torch.rand(1, 1, *shape)
    ddf = _constant(shape, (0.0,) * (len(shape) - 1) + (1.0,))  # +1 along the last axis
    moved = warp(image, ddf)
    assert torch.allclose(moved[..., :-1], image[..., 1:], atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
def test_constant_velocity_integrates_to_itself(shape):
    # exp of a constant field is the translation by it, for any number of squarings
    v = _constant(shape, tuple(0.7 * (i + 1) for i in range(len(shape))))
    ddf = scaling_and_squaring(v, 5)
    assert torch.allclose(ddf, v, atol=1e-4)


def test_rotation_velocity_integrates_to_rotation():
    # v(x) = W (x - c) with W skew: exp is the rotation by the angle of W about c
    n, angle = 33, 0.2
    grid = identity_grid((n, n))
    c = (n - 1) / 2
    y, x = grid[0] - c, grid[1] - c
    velocity = torch.stack([angle * x, -angle * y])[None]  # (dy, dx) = angle * (x, -y)
    ddf = scaling_and_squaring(velocity, 7)[0]
    cos, sin = math.cos(angle), math.sin(angle)
    true = torch.stack([sin * x + cos * y - y, cos * x - sin * y - x])
    interior = (slice(None), slice(8, -8), slice(8, -8))
    # error of 7 squarings with bilinear composition: stated bound 0.02 voxel inside
    assert (ddf[interior] - true[interior]).abs().max() < 0.02


def _smooth_velocity(shape: tuple[int, ...], magnitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth random field: per channel, a product of one-period sinusoids along every axis."""
    g = torch.Generator().manual_seed(seed)
    grid = identity_grid(shape)
    channels = []
    for _ in shape:
        phase = torch.rand(len(shape), generator=g) * 2 * math.pi
        field = torch.ones(shape)
        for axis, n in enumerate(shape):
            field = field * torch.sin(2 * math.pi * grid[axis] / n + phase[axis])
        channels.append(field)
    v = torch.stack(channels)[None]
    return v * magnitude / v.abs().max()


@pytest.mark.parametrize(("shape", "magnitude"), [((48, 48), 3.0), ((24, 24, 24), 1.5)])
def test_inverse_of_velocity_field_composes_to_identity(shape, magnitude):
    velocity = _smooth_velocity(shape, magnitude)
    ddf = scaling_and_squaring(velocity)
    inverse = invert_velocity(velocity)
    interior = (slice(None), slice(None), *[slice(4, -4)] * len(shape))
    for a, b in ((ddf, inverse), (inverse, ddf)):
        residual = compose(a, b)  # warp by a then by b: identity if b = a^-1
        # stated error: < 0.1 voxel max, < 0.02 mean, for fields of ~1/8 of the grid per wave
        assert residual[interior].abs().max() < 0.1
        assert residual[interior].abs().mean() < 0.02


def test_fixed_point_inverse_composes_to_identity():
    ddf = _smooth_velocity((48, 48), 2.5, seed=3)
    inverse = invert_ddf(ddf)
    residual = compose(inverse, ddf)  # x + ddf(x) + inverse(x + ddf(x)) = x
    assert residual[:, :, 4:-4, 4:-4].abs().max() < 0.05


def test_warp_then_inverse_restores_image():
    shape = (40, 40)
    yy, xx = identity_grid(shape)
    image = torch.sin(xx / 5)[None, None] * torch.cos(yy / 7)
    velocity = _smooth_velocity(shape, 2.0, seed=1)
    back = warp(warp(image, scaling_and_squaring(velocity)), invert_velocity(velocity))
    assert (back - image)[..., 6:-6, 6:-6].abs().max() < 0.05


def test_resize_ddf_rescales_units():
    ddf = _constant((16, 16), (1.0, -0.5))
    big = resize_ddf(ddf, (32, 48))
    assert big.shape == (1, 2, 32, 48)
    assert torch.allclose(big[0, 0], torch.full((32, 48), 2.0))
    assert torch.allclose(big[0, 1], torch.full((32, 48), -1.5))
    with pytest.raises(ValueError, match="axes"):
        resize_ddf(ddf, (8, 8, 8))
