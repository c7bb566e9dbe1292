"""Spatial functions: 4x4 transforms, index<->normalised grids, reslicing, affine and dense warps.

Conventions (../shared/DESIGN.md "Geometry conventions"):

- World is RAS millimetres. A matrix named ``a_to_b`` maps points in frame a to frame b; composition
  reads right to left: ``image_to_mri = reference_to_mri @ image_to_reference``.
- Index coordinates are listed fastest axis first, as grid_sample wants them: (i, j[, k]) = (column,
  row[, slice]). A volume tensor is (B, C, D, H, W) with W indexed by i, H by j and D by k, so a
  nibabel array ``data[i, j, k]`` becomes a tensor with ``data.transpose(2, 1, 0)``.
- grid_sample runs with ``align_corners=False``: normalised -1 and +1 are the outer *edges* of the
  first and last voxel. :func:`index_to_normalised` is the one place that converts index matrices to
  normalised grids; nothing else in regseg does that arithmetic.
- A dense displacement ``ddf`` is in voxels (pixels), channels in array-axis order: (dy, dx) in 2-D,
  (dz, dy, dx) in 3-D, as in voxelmorph.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def compose(*matrices: np.ndarray) -> np.ndarray:
    """Product of 4x4 (or 3x3) matrices, right to left: ``compose(b_to_c, a_to_b) = a_to_c``."""
    out = np.eye(matrices[0].shape[0])
    for m in matrices:
        out = out @ np.asarray(m, dtype=np.float64)
    return out


def invert(a_to_b: np.ndarray) -> np.ndarray:
    """Inverse of an affine matrix, ``b_to_a``."""
    return np.linalg.inv(np.asarray(a_to_b, dtype=np.float64))


def apply(a_to_b: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points (N, n) through an (n+1, n+1) affine matrix; returns (N, n)."""
    points = np.asarray(points, dtype=np.float64)
    n = a_to_b.shape[0] - 1
    return points @ a_to_b[:n, :n].T + a_to_b[:n, n]


def plane_spacing(plane: np.ndarray) -> tuple[float, float]:
    """The pixel size (mm along columns, along rows) of a plane mapping frame pixel (i, j, 0) to
    mm: the lengths of its first two axes."""
    return float(np.linalg.norm(plane[:3, 0])), float(np.linalg.norm(plane[:3, 1]))


def lift_2d(a3: np.ndarray) -> np.ndarray:
    """Embed a 3x3 pixel affine of (i, j) into a 4x4 acting on (i, j, k), leaving k alone."""
    out = np.eye(4)
    out[:2, :2] = a3[:2, :2]
    out[:2, 3] = a3[:2, 2]
    return out


def index_to_normalised(size: Sequence[int]) -> np.ndarray:
    """Matrix from index coordinates to grid_sample's normalised coordinates (align_corners=False).

    Args:
        size: spatial size fastest axis first, (W, H) or (W, H, D).
    Returns:
        (n+1, n+1) matrix ``m``, ``m @ [i, j(, k), 1] = [x, y(, z), 1]``, ``x = (2i + 1) / W - 1``.
    """
    n = len(size)
    m = np.eye(n + 1)
    for axis, s in enumerate(size):
        m[axis, axis] = 2.0 / s
        m[axis, n] = 1.0 / s - 1.0
    return m


@lru_cache(maxsize=16)
def _pixel_grid(height: int, width: int, device: str, dtype: torch.dtype) -> Tensor:
    """Homogeneous pixel coordinates (H*W, 4) = (i, j, 0, 1), built once per size and device."""
    j, i = torch.meshgrid(
        torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing="ij"
    )
    grid = torch.stack([i, j, torch.zeros_like(i), torch.ones_like(i)], dim=-1).reshape(-1, 4)
    return grid.to(device)


def pixel_axes(height: int, width: int, *, device: torch.device | str | None = None
               ) -> tuple[Tensor, Tensor]:
    """Pixel coordinates along a plane's axes, float32: i (1, W, 1) and j (H, 1, 1).

    With :func:`axes_grid` they build a plane's sampling grid as an outer sum, which is several
    times faster on the CPU than an (H*W, 3) @ (3, 3) matmul for so small an inner size.
    """
    i = torch.arange(width, dtype=torch.float32, device=device).reshape(1, width, 1)
    j = torch.arange(height, dtype=torch.float32, device=device).reshape(height, 1, 1)
    return i, j


def axes_grid(m: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Grid points ``[i, j, 1] @ m.T`` of plane pixels, (H, W, 3) for a 3-D ``grid_sample``.

    ``m`` (3, 3): its columns are what pixel i, pixel j and 1 add to the normalised (x, y, z)
    point (columns 0, 1 and 3 of the 4x4 plane-pixel -> normalised map). ``i`` and ``j``
    broadcast to (H, W, 1): :func:`pixel_axes`, or those plus a displacement.
    """
    return i * m[:, 0] + (j * m[:, 1] + m[:, 2])


def plane_grid(
    volume_size: Sequence[int],
    world_to_voxel: np.ndarray,
    image_to_world: np.ndarray,
    out_hw: tuple[int, int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Normalised sampling grid of a 2-D image plane inside a 3-D volume.

    Args:
        volume_size: (W, H, D) of the volume tensor, i.e. the nibabel shape (I, J, K).
        world_to_voxel: (4, 4) world mm -> volume index (i, j, k).
        image_to_world: (4, 4) plane pixel (i, j, 0) -> world mm.
        out_hw: (H, W) of the plane image.
    Returns:
        (1, 1, H, W, 3) grid for a 3-D ``grid_sample``.
    """
    image_to_norm = index_to_normalised(volume_size) @ world_to_voxel @ image_to_world
    m = torch.as_tensor(image_to_norm[:3].T, dtype=dtype, device=device)  # (4, 3)
    pixels = _pixel_grid(out_hw[0], out_hw[1], str(torch.device(device)), dtype)
    return (pixels @ m).reshape(1, 1, out_hw[0], out_hw[1], 3)


def reslice(
    volume: Tensor,
    world_to_voxel: np.ndarray,
    image_to_world: np.ndarray,
    out_hw: tuple[int, int],
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> Tensor:
    """Sample a 3-D volume on a 2-D image plane.

    Args:
        volume: (B, C, D, H, W), see the module conventions for the axis order.
        world_to_voxel: (4, 4) world mm -> volume index (i, j, k).
        image_to_world: (4, 4) plane pixel (i, j, 0) -> world mm.
        out_hw: (H, W) of the plane image.
        mode: ``bilinear`` (trilinear in 3-D) for images, ``nearest`` for labels.
    Returns:
        (B, C, H, W) on the volume's device and dtype.
    """
    if volume.ndim != 5:
        raise ValueError(f"reslice needs a (B, C, D, H, W) volume; got shape {tuple(volume.shape)}")
    size = (volume.shape[4], volume.shape[3], volume.shape[2])
    grid = plane_grid(size, world_to_voxel, image_to_world, out_hw, device=volume.device,
                      dtype=volume.dtype if volume.is_floating_point() else torch.float32)
    grid = grid.expand(volume.shape[0], -1, -1, -1, -1)
    src = volume if volume.is_floating_point() else volume.float()
    out = F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    out = out[:, :, 0]
    return out if volume.is_floating_point() else out.to(volume.dtype)


def theta_to_pixel(theta: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Convert an ``affine_grid`` theta (2, 3) to the 3x3 pixel map it applies.

    ``warp_affine(image, theta)`` samples output pixel ``p`` at input pixel ``theta_to_pixel @ p``.
    Normalised coordinates do not depend on resolution, so the same theta warps any image of the
    same field of view; ``hw`` only sets the pixel units.
    """
    n = index_to_normalised((hw[1], hw[0]))
    t = np.eye(3)
    t[:2] = np.asarray(theta, dtype=np.float64)
    return np.linalg.inv(n) @ t @ n


def pixel_to_theta(a3: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`theta_to_pixel`: the (2, 3) theta that samples pixel ``a3 @ p``."""
    n = index_to_normalised((hw[1], hw[0]))
    return (n @ np.asarray(a3, dtype=np.float64) @ np.linalg.inv(n))[:2]


def warp_affine(image: Tensor, theta: Tensor, *, mode: str = "bilinear",
                padding_mode: str = "zeros") -> Tensor:
    """Warp a batch of 2-D images by normalised affines.

    Args:
        image: (B, C, H, W).
        theta: (B, 2, 3), as for ``F.affine_grid`` with align_corners=False.
    """
    if theta.shape[0] != image.shape[0] or theta.shape[1:] != (2, 3):
        raise ValueError(f"theta must be (B, 2, 3) with B = {image.shape[0]}; "
                         f"got {tuple(theta.shape)}")
    grid = F.affine_grid(theta.to(image.dtype), list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def identity_grid(spatial: Sequence[int], *, device=None, dtype=torch.float32) -> Tensor:
    """Index coordinates of every voxel, (ndim, *spatial), channels in array-axis order."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


#: Fewest sample points for which :func:`grid_sample` splits a one-volume 3-D call across threads.
def displaced_points(shape_ijk: tuple[int, ...], ddf: Tensor, matrix: np.ndarray) -> Tensor:
    """``matrix`` (3 or 4, 4) applied to every fixed voxel (i, j, k) displaced by ``ddf``
    (1, 3, K, J, I), array order: (K, J, I, 3). The same as (index grid + ddf, 1) @ matrix[:3].T
    to rounding, without the homogeneous copy and a tall (n, 4) x (4, 3) product (at 1.5 mm,
    59 -> 14 ms): per output axis, the matrix's ramp over the index grid (separable, broadcast)
    plus the displacement's three weighted terms."""
    k_n, j_n, i_n = shape_ijk[::-1]
    dev = ddf.device
    axes = [torch.arange(n, dtype=torch.float32, device=dev) for n in shape_ijk]  # i, j, k
    disp = ddf[0].flip(0)  # (i, j, k) components, each (K, J, I)
    out = torch.empty(k_n, j_n, i_n, 3, dtype=torch.float32, device=dev)
    for c in range(3):
        row = [float(v) for v in matrix[c]]
        ramp = ((axes[0] * row[0]).reshape(1, 1, i_n) + (axes[1] * row[1]).reshape(1, j_n, 1)
                + (axes[2] * row[2] + row[3]).reshape(k_n, 1, 1))
        acc = torch.add(ramp, disp[0], alpha=row[0])
        out[..., c] = acc.add_(disp[1], alpha=row[1]).add_(disp[2], alpha=row[2])
    return out


SPLIT_MIN_POINTS = 4096


def clamp_to_centres(grid: Tensor, sizes: Sequence[int]) -> Tensor:
    """``grid`` (.., ndim) in grid_sample's normalised (x, y, ..) order, each axis clamped to the
    centres of its first and last voxel, ``[-1 + 1/n, 1 - 1/n]`` (align_corners=False); ``sizes``
    in the same (x, y, ..) order.

    Written for ONNX Runtime, where an elementwise Max / Min broadcast along a last axis of 2 or 3
    takes ~240 us on a 64 x 64 grid and a Clip with scalar bounds ~10 us: one Clip when every
    axis has the same size, else one Clip per axis. The bounds are computed in the grid's dtype,
    as ``1.0 / tensor(sizes) - 1.0`` would be, so the values are the same to the bit.
    """
    dt = np.float32 if grid.dtype == torch.float32 else np.float64
    bounds = [float(dt(1.0) / dt(n) - dt(1.0)) for n in sizes]
    if len(set(bounds)) == 1:
        return grid.clamp(bounds[0], -bounds[0])
    return torch.cat([grid[..., k:k + 1].clamp(lo, -lo) for k, lo in enumerate(bounds)], dim=-1)


def grid_sample(image: Tensor, grid: Tensor, **kwargs) -> Tensor:
    """``F.grid_sample``, with one-volume 3-D calls on CPU split across torch's threads.

    torch's CPU 3-D sampler parallelises its forward over the batch only and its backward not at
    all for one volume; a (1, C, D, H, W) volume sampled at a (1, n, ...) grid is run instead as a
    batch of ``t`` copies of the volume (an expanded view, no copy) sampled at ``t`` slabs of the
    grid, so ``t`` threads share the work forward and backward. The same arithmetic per point:
    equal outputs, input gradients summed over the copies (to rounding). Inside
    :func:`regseg.kernels.trilinear.enabled`, eligible trilinear calls run the compiled kernels
    instead. Under ONNX export, bilinear border padding is written as clamped points + zeros
    padding (the same values; ONNX Runtime's border sampler is the slower one)."""
    from regseg.kernels import trilinear

    if (torch.onnx.is_in_onnx_export() and kwargs.get("padding_mode") == "border"
            and kwargs.get("mode", "bilinear") == "bilinear"
            and kwargs.get("align_corners") is False):
        # ONNX Runtime's GridSample is about twice as slow with border padding as with zeros
        # (64 x 64: 272 vs 133 us). Border padding is the point clamped to voxel centres
        # [0, n - 1], i.e. normalised [-1 + 1/n, 1 - 1/n] (align_corners=False); after that,
        # zeros padding adds only zero-weight terms: the same values.
        grid = clamp_to_centres(grid, image.shape[:1:-1])
        kwargs = {**kwargs, "padding_mode": "zeros"}
    if trilinear.eligible(image, grid, kwargs.get("mode", "bilinear"),
                          kwargs.get("padding_mode", "zeros"), kwargs.get("align_corners")):
        return trilinear.sample(image, grid, kwargs.get("padding_mode", "zeros"))
    threads = torch.get_num_threads()
    parts = min(threads, 4)
    if (image.device.type != "cpu" or image.dim() != 5 or image.shape[0] != 1 or parts < 2
            or grid.shape[1] % parts or grid[..., 0].numel() < SPLIT_MIN_POINTS
            or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling()):
        return F.grid_sample(image, grid, **kwargs)
    n = grid.shape[1]
    slabs = grid.reshape(parts, n // parts, *grid.shape[2:])
    out = F.grid_sample(image.expand(parts, *image.shape[1:]), slabs, **kwargs)
    channels, rest = image.shape[1], tuple(out.shape[3:])
    return (out.reshape(1, parts, channels, n // parts, *rest).transpose(1, 2)
            .reshape(1, channels, n, *rest))


def warp(image: Tensor, ddf: Tensor, *, mode: str = "bilinear",
         padding_mode: str = "border") -> Tensor:
    """Resample ``image`` at grid points displaced by ``ddf``.

    Args:
        image: (B, C, H, W) or (B, C, D, H, W).
        ddf: displacement in voxels, (B, ndim, *spatial), channels in array-axis order, same
            spatial size as ``image``.
    Raises:
        ValueError: if ``ddf`` does not match ``image`` in batch or spatial size.
    """
    spatial = tuple(image.shape[2:])
    ndim = len(spatial)
    if ddf.shape[0] != image.shape[0] or ddf.shape[1] != ndim or tuple(ddf.shape[2:]) != spatial:
        raise ValueError(f"ddf {tuple(ddf.shape)} does not fit image {tuple(image.shape)}: "
                         f"expected ({image.shape[0]}, {ndim}, *{spatial})")
    coords = identity_grid(spatial, device=ddf.device, dtype=ddf.dtype) + ddf  # array order
    # array order (.., y, x) -> grid_sample order (x, y, ..), then to normalised coordinates
    coords = coords.flip(1)
    sizes = torch.tensor(spatial[::-1], device=ddf.device, dtype=ddf.dtype)
    shape = (1, ndim) + (1,) * ndim
    grid = (2.0 * coords + 1.0) / sizes.reshape(shape) - 1.0
    grid = grid.movedim(1, -1)
    return grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode=padding_mode,
                       align_corners=False)
