"""Trilinear lookups in a 3-D volume through 2-D ``grid_sample`` on a column of its slices.

PyTorch's 3-D ``grid_sample`` has no vectorised CPU kernel: sampling a 256 x 192 beam grid from a
two-channel volume takes several milliseconds on two cores, a third of the simulated scanner's
frame budget. The 2-D kernel is vectorised and several times faster, so the volume's slices are
stacked into one tall 2-D image (each with a one-voxel border) and a trilinear lookup becomes two
bilinear lookups, in the slices below and above the point, blended along the slice axis. The
result is that of 3-D ``grid_sample`` (bilinear, ``border`` padding), or periodic with ``wrap``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from regseg.spatial import index_to_normalised


@dataclass(frozen=True)
class SliceAtlas:
    """A (C, D, H, W) volume as a (D + 1)-tile column of padded slices, in one 2-D image."""

    image: Tensor  # (1, C, (D + 1) * (H + 2), W + 2)
    size: Tensor  # (3,) float (W, H, D): the volume's size, fastest axis first
    upper: Tensor  # (3,) float: largest index kept (clamped volumes); W, H, D - 1 minus a hair
    wrap: bool  # periodic volume (True) or border-clamped (False)
    tile_rows: int  # H + 2
    scale: tuple[float, float]  # atlas pixel (x, y) -> normalised: x * scale + offset
    offset: tuple[float, float]


def build_atlas(volume: Tensor, *, wrap: bool = False) -> SliceAtlas:
    """Stack the slices of a (C, D, H, W) volume, each padded by one voxel (wrapped or repeated).

    A last tile repeats slice 0 (``wrap``) or slice D - 1 (border), so the slice above any point
    is always the next tile.

    Args:
        volume: (C, D, H, W) float, W indexed by i, H by j and D by k as in :mod:`regseg.spatial`.
        wrap: treat the volume as one period of a periodic texture.
    """
    c, d, h, w = volume.shape
    padded = F.pad(volume, (1, 1, 1, 1), mode="circular" if wrap else "replicate")
    extra = padded[:, :1] if wrap else padded[:, -1:]
    image = torch.cat([padded, extra], 1).reshape(1, c, (d + 1) * (h + 2), w + 2).contiguous()
    norm = index_to_normalised((image.shape[3], image.shape[2]))
    size = torch.tensor([w, h, d], dtype=volume.dtype, device=volume.device)
    return SliceAtlas(image=image, size=size, upper=size - torch.tensor([1.0, 1.0, 1.0]).to(size),
                      wrap=wrap, tile_rows=h + 2, scale=(float(norm[0, 0]), float(norm[1, 1])),
                      offset=(float(norm[0, 2]), float(norm[1, 2])))


def sample_atlas(atlas: SliceAtlas, index: Tensor) -> Tensor:
    """Trilinear samples at voxel index coordinates.

    Args:
        atlas: from :func:`build_atlas`.
        index: (..., 3) voxel coordinates (i, j, k), fastest axis first.
    Returns:
        (C, ...) float, as 3-D ``grid_sample`` with ``align_corners=False`` would give with
        ``padding_mode="border"`` (or periodically, for a wrapped atlas).
    """
    if atlas.wrap:
        index = torch.remainder(index, atlas.size)
    else:
        index = torch.clamp(index, min=torch.zeros_like(atlas.upper), max=atlas.upper)
    x, y, z = index.unbind(-1)
    z0 = torch.floor(z)
    sx, sy = atlas.scale
    ax = (x + 1.0) * sx + atlas.offset[0]
    ay0 = (z0 * atlas.tile_rows + y + 1.0) * sy + atlas.offset[1]
    ay1 = ay0 + atlas.tile_rows * sy  # the next tile: the slice above
    grid = torch.stack([torch.stack([ax, ay0], -1), torch.stack([ax, ay1], -1)], 0)
    out = F.grid_sample(atlas.image, grid.reshape(1, 2, -1, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)[0]  # (C, 2, N)
    out = torch.lerp(out[:, 0], out[:, 1], (z - z0).reshape(1, -1))
    return out.reshape(out.shape[0], *index.shape[:-1])
