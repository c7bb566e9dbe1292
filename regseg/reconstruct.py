"""Tracked 2-D frames compounded into a 3-D volume (freehand 3-D ultrasound).

The method of PLUS's VolumeReconstructor (Gobbi & Peters 2002; Lasso et al. 2014, PLUS): every
pixel of every frame is carried by its pose (``image_to_reference``: pixel (i = column, j = row, 0,
1) -> Reference mm) into the output grid and *splatted*: with ``nearest`` onto the closest voxel,
with ``linear`` onto the 8 surrounding voxels with trilinear weights. Each voxel keeps a weighted
sum and a weight; the volume is their ratio where the weight is non-zero (compounding by
averaging). Voxels no pixel reached are *holes*; ``fill_holes`` fills those lying between data
(reached voxels on both sides along an axis, within r voxels: a gap between fan planes) with the
mean of the reached voxels around them, so the space outside the sweep stays empty. The coverage
mask says which voxels were reached by a pixel (1) or filled (2).

Everything is torch (``index_add_`` scatter), on the CPU or a GPU; a frame's pixels go in one call.
Frames: ``image_to_reference`` as everywhere in regseg (RAS mm); the output grid is axis-aligned
in the Reference frame with ``voxel_to_world`` (I, J, K) -> Reference mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regseg.errors import InputError

METHODS = ("nearest", "linear")
#: Largest output grid, voxels (a 0.2 mm grid over 20 cm would be 1e9: refused, not swapped to).
MAX_GRID_VOXELS = 512 ** 3


@dataclass(frozen=True)
class Grid:
    """An axis-aligned output grid: ``shape`` (I, J, K) and ``voxel_to_world`` (4, 4), mm."""

    shape: tuple[int, int, int]
    voxel_to_world: np.ndarray


def frame_corners(hw: tuple[int, int], image_to_reference: np.ndarray) -> np.ndarray:
    """The four corner pixels' centres of an (H, W) frame in Reference mm, (4, 3)."""
    h, w = hw
    ij = np.array([[0, 0, 0, 1], [w - 1, 0, 0, 1], [0, h - 1, 0, 1], [w - 1, h - 1, 0, 1]],
                  dtype=np.float64)
    return (ij @ np.asarray(image_to_reference, dtype=np.float64).T)[:, :3]


def grid_around(corners_mm: np.ndarray, spacing_mm: float, margin_mm: float = 0.0) -> Grid:
    """The axis-aligned grid of ``spacing_mm`` that holds every point of ``corners_mm`` (N, 3).

    Raises:
        InputError: a spacing that is not positive, or a grid over :data:`MAX_GRID_VOXELS`.
    """
    if not spacing_mm > 0:
        raise InputError(f"--spacing {spacing_mm}: a positive voxel size in mm expected")
    lo = corners_mm.min(0) - margin_mm
    hi = corners_mm.max(0) + margin_mm
    shape = tuple(int(n) for n in np.floor((hi - lo) / spacing_mm).astype(int) + 1)
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_GRID_VOXELS:
        raise InputError(f"--spacing {spacing_mm} mm over the frames' extent "
                         f"{np.round(hi - lo, 1).tolist()} mm gives {shape} = {voxels:,} voxels; "
                         f"the limit is {MAX_GRID_VOXELS:,}: use a larger spacing")
    voxel_to_world = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    voxel_to_world[:3, 3] = lo
    return Grid(shape=shape, voxel_to_world=voxel_to_world)


class VolumeReconstructor:
    """Accumulates frames (:meth:`add`) into a grid; :meth:`result` gives volume and coverage.

    Args:
        grid: the output grid (see :func:`grid_around`).
        method: ``nearest`` or ``linear`` splatting.
        device: where the accumulators live (``cpu`` or ``cuda``).
    """

    def __init__(self, grid: Grid, method: str = "linear", device: str | torch.device = "cpu"
                 ) -> None:
        if method not in METHODS:
            raise InputError(f"--method {method!r}; one of {', '.join(METHODS)} expected")
        self.grid, self.method = grid, method
        self.device = torch.device(device)
        n = int(np.prod(grid.shape))
        self._sum = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._weight = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._world_to_voxel = np.linalg.inv(grid.voxel_to_world)
        self.frames = 0

    def add(self, pixels: np.ndarray | torch.Tensor, image_to_reference: np.ndarray,
            mask: np.ndarray | torch.Tensor | None = None) -> None:
        """Splat one (H, W) frame; ``mask`` (H, W) bool keeps only the pixels inside the image
        (e.g. the sector), so the black outside the fan is not compounded as tissue."""
        values = torch.as_tensor(pixels, device=self.device, dtype=torch.float32)
        if values.ndim != 2:
            raise InputError(f"frame of shape {tuple(values.shape)}: (H, W) grey expected")
        h, w = values.shape
        pixel_to_voxel = torch.as_tensor(self._world_to_voxel @ image_to_reference,
                                         dtype=torch.float32, device=self.device)
        jj, ii = torch.meshgrid(torch.arange(h, device=self.device, dtype=torch.float32),
                                torch.arange(w, device=self.device, dtype=torch.float32),
                                indexing="ij")
        keep = torch.ones_like(values, dtype=torch.bool) if mask is None else torch.as_tensor(
            mask, device=self.device).bool()
        ii, jj, values = ii[keep], jj[keep], values[keep]
        m = pixel_to_voxel
        xyz = (m[:3, 0, None] * ii + m[:3, 1, None] * jj + m[:3, 3, None])  # (3, N) voxel coords
        if self.method == "nearest":
            self._splat(torch.round(xyz).long(), values, torch.ones_like(values))
        else:
            base = torch.floor(xyz)
            frac = xyz - base
            base = base.long()
            for corner in range(8):
                offset = torch.tensor([(corner >> a) & 1 for a in range(3)], device=self.device)
                weight = torch.prod(torch.where(offset[:, None].bool(), frac, 1 - frac), dim=0)
                self._splat(base + offset[:, None], values, weight)
        self.frames += 1

    def _splat(self, ijk: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> None:
        size = torch.tensor(self.grid.shape, device=self.device)[:, None]
        inside = ((ijk >= 0) & (ijk < size)).all(0) & (weight > 0)
        i, j, k = ijk[:, inside]
        flat = (i * self.grid.shape[1] + j) * self.grid.shape[2] + k
        self._sum.index_add_(0, flat, values[inside] * weight[inside])
        self._weight.index_add_(0, flat, weight[inside])

    def result(self, fill_holes: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """``(volume float32 (I, J, K), coverage uint8 (I, J, K): 0 none, 1 hit, 2 filled)``.

        ``fill_holes`` (voxels, 0: none): a voxel no pixel reached is filled when reached voxels lie
        within that distance on *both* sides of it along some axis (it is between data, e.g. between
        two fan planes), with the mean of the reached voxels in its (2r+1)^3 box. The empty space
        around a sweep stays empty: a voxel beside the data on one side only is not filled.
        """
        shape = self.grid.shape
        weight = self._weight.view(shape)
        hit = weight > 0
        volume = torch.where(hit, self._sum.view(shape) / weight.clamp_min(1e-12),
                             torch.zeros_like(weight))
        coverage = hit.to(torch.uint8)
        r = max(0, int(fill_holes))
        if r and bool(hit.any()):
            data = hit.float()[None, None]
            between = torch.zeros_like(hit)
            for axis in range(3):
                between |= _any_within(data, axis, r, -1) & _any_within(data, axis, r, +1)
            new = between & ~hit
            num, den = _box_sum(volume[None, None] * data, r), _box_sum(data, r)
            volume = torch.where(new & (den > 0), num / den.clamp_min(1e-12), volume)
            coverage = torch.where(new, torch.full_like(coverage, 2), coverage)
        return volume.cpu().numpy().astype(np.float32), coverage.cpu().numpy()


def _any_within(data: torch.Tensor, axis: int, r: int, side: int) -> torch.Tensor:
    """(I, J, K) bool: some voxel of ``data`` (1, 1, I, J, K) is set within ``r`` voxels on
    ``side`` (-1 before, +1 after) of each voxel along ``axis`` (the voxel itself excluded)."""
    n = data.shape[2 + axis]
    pad = [0, 0, 0, 0, 0, 0]  # F.pad order: K, J, I (last axis first)
    pad[2 * (2 - axis) + (0 if side < 0 else 1)] = r
    kernel = [1, 1, 1]
    kernel[axis] = r
    pooled = F.max_pool3d(F.pad(data, pad), kernel, stride=1)[0, 0]
    start = 0 if side < 0 else 1
    return pooled.narrow(axis, start, n) > 0


def _box_sum(data: torch.Tensor, r: int) -> torch.Tensor:
    """(I, J, K): the sum of ``data`` (1, 1, I, J, K) over each voxel's (2r+1)^3 box, separably."""
    k = 2 * r + 1
    out = data
    for axis in range(3):
        kernel = [1, 1, 1]
        padding = [0, 0, 0]
        kernel[axis], padding[axis] = k, r
        out = F.avg_pool3d(out, kernel, stride=1, padding=padding,
                           count_include_pad=True) * k
    return out[0, 0]
