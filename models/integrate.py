"""Dense-field algebra: compose, resize, integrate (scaling and squaring), invert displacements.

Conventions are those of :mod:`regseg.spatial`: a displacement ``ddf`` is in voxels (pixels),
(B, ndim, *spatial) with channels in array-axis order ((dy, dx) in 2-D, (dz, dy, dx) in 3-D), and
``warp(image, ddf)(x) = image(x + ddf(x))`` with voxel centres at integer indices
(``align_corners=False`` geometry). A stationary velocity field is named ``velocity``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from regseg.spatial import warp


def compose(first: Tensor, second: Tensor) -> Tensor:
    """Displacement of "warp by ``first``, then warp the result by ``second``".

    ``warp(warp(image, first), second) == warp(image, compose(first, second))`` up to
    interpolation: the composed field is ``second(x) + first(x + second(x))``.

    Args:
        first, second: (B, ndim, *spatial) displacements in voxels on the same grid.
    Returns:
        (B, ndim, *spatial).
    """
    # Border padding: a displacement just outside the grid is best guessed by its edge value.
    return second + warp(first, second, padding_mode="border")


def scaling_and_squaring(velocity: Tensor, steps: int = 7) -> Tensor:
    """Exponential of a stationary velocity field: the displacement of the diffeomorphism exp(v).

    ``u <- v / 2**steps``, then ``steps`` times ``u <- u + u o (Id + u)``.

    Args:
        velocity: (B, ndim, *spatial) stationary velocity in voxels (per unit time).
        steps: squarings; 7 (the VoxelMorph default) makes the first step ``v / 128``.
    Returns:
        (B, ndim, *spatial) displacement in voxels.

    References:
        Arsigny et al., "A Log-Euclidean Framework for Statistics on Diffeomorphisms", MICCAI
        2006; Dalca et al., "Unsupervised Learning of Probabilistic Diffeomorphic Registration for
        Images and Surfaces", MedIA 2019 (the network layer, ARCHITECTURES §5.2 "VecInt").
    """
    if steps < 0:
        raise ValueError(f"scaling_and_squaring: steps must be >= 0, got {steps}")
    ddf = velocity / (2.0**steps)
    for _ in range(steps):
        ddf = compose(ddf, ddf)
    return ddf


def invert_velocity(velocity: Tensor, steps: int = 7) -> Tensor:
    """Inverse of exp(v) as a displacement: exp(-v), exact for a stationary velocity field.

    Args:
        velocity: (B, ndim, *spatial) in voxels.
    Returns:
        (B, ndim, *spatial) displacement ``w`` with ``warp(warp(image, ddf), w) ~ image`` where
        ``ddf = scaling_and_squaring(velocity)``.
    """
    return scaling_and_squaring(-velocity, steps)


def invert_ddf(ddf: Tensor, iterations: int = 20) -> Tensor:
    """Inverse of a (non-stationary-velocity) displacement by fixed-point iteration.

    Solves ``w(x) = -u(x + w(x))``, so that ``x + w(x) + u(x + w(x)) = x``; the iteration
    converges where ``u`` is a contraction locally (|grad u| < 1, i.e. no folding). Used for
    fields that did not come from a velocity.

    Args:
        ddf: (B, ndim, *spatial) displacement in voxels.
        iterations: fixed-point steps; 20 reach ~1e-3 voxel for smooth fields of a few voxels.
    Returns:
        (B, ndim, *spatial) inverse displacement in voxels.

    References:
        Chen et al., "A simple fixed-point approach to invert a deformation field", Medical
        Physics 35(1), 2008.
    """
    inverse = -ddf
    for _ in range(iterations):
        inverse = -warp(ddf, inverse, padding_mode="border")
    return inverse


def resize_ddf(ddf: Tensor, size: tuple[int, ...]) -> Tensor:
    """Resample a displacement to another grid over the same field of view, rescaling its units.

    Voxel centres follow ``align_corners=False``: the two grids cover the same extent, so a
    displacement of ``d`` voxels on an axis of ``n`` voxels becomes ``d * m / n`` on ``m`` voxels.

    Args:
        ddf: (B, ndim, *spatial) in voxels of the input grid.
        size: the output spatial size, ``ndim`` integers.
    Returns:
        (B, ndim, *size) in voxels of the output grid.
    """
    spatial = ddf.shape[2:]
    if len(size) != len(spatial):
        raise ValueError(f"resize_ddf: size {tuple(size)} has {len(size)} axes, the field "
                         f"{tuple(ddf.shape)} has {len(spatial)}")
    if tuple(size) == tuple(spatial):
        return ddf
    mode = "bilinear" if len(size) == 2 else "trilinear"
    out = F.interpolate(ddf, size=tuple(size), mode=mode, align_corners=False)
    scale = torch.tensor([m / n for m, n in zip(size, spatial, strict=True)],
                         device=ddf.device, dtype=ddf.dtype)
    return out * scale.reshape(1, -1, *([1] * len(size)))


def upsample_ddf(ddf: Tensor) -> Tensor:
    """Coarse-to-fine step: a field on an (n/2)-grid to the n-grid, magnitudes doubled.

    Args:
        ddf: (B, ndim, *spatial) in coarse voxels.
    Returns:
        (B, ndim, *(2 * spatial)) in fine voxels.
    """
    return resize_ddf(ddf, tuple(2 * s for s in ddf.shape[2:]))
