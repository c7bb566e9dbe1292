"""Family B probes: end-fire curved and side-fire linear arrays, their beams, scan conversion.

Both put the transducer face at the top of the frame, rows going away from it, square pixels.
The end-fire array's centre of curvature (the apex) lies above the top row; its image plane
contains the probe axis. The side-fire array runs along the probe axis; its beams are parallel.
Everything here is in frame pixels ``(i = column, j = row)``; :mod:`.session` places the plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from regseg.errors import InputError

ENDFIRE, SIDEFIRE = "endfire", "sidefire"


@dataclass(frozen=True)
class ProbeGeometry:
    """A probe and its display settings. Lengths in mm, angles in degrees."""

    kind: str  # ENDFIRE or SIDEFIRE
    frame_hw: tuple[int, int]
    pixel_mm: float
    depth_mm: float  # imaging depth below the face
    radius_mm: float = 0.0  # curved array radius (end-fire)
    sector_deg: float = 0.0  # total sector angle (end-fire)
    width_mm: float = 0.0  # array length (side-fire)
    n_beams: int = 160
    top_mm: float = 1.0  # depth of the top row above the face's centre

    def __post_init__(self) -> None:
        if self.kind not in (ENDFIRE, SIDEFIRE):
            raise InputError(f"ProbeGeometry.kind={self.kind!r}: {ENDFIRE!r} or {SIDEFIRE!r} "
                             "expected")
        if self.pixel_mm <= 0 or self.depth_mm <= 0 or min(self.frame_hw) < 16:
            raise InputError(f"ProbeGeometry: pixel_mm={self.pixel_mm}, depth_mm={self.depth_mm}, "
                             f"frame_hw={self.frame_hw}: positive sizes and >= 16 px expected")
        if self.kind == ENDFIRE and not (self.radius_mm > 0 and 0 < self.sector_deg < 180):
            raise InputError(f"end-fire probe: radius_mm={self.radius_mm}, sector_deg="
                             f"{self.sector_deg}: radius > 0 and 0 < sector < 180 expected")
        if self.kind == SIDEFIRE and self.width_mm <= 0:
            raise InputError(f"side-fire probe: width_mm={self.width_mm}: > 0 expected")

    @property
    def centre_i(self) -> float:
        return 0.5 * (self.frame_hw[1] - 1)

    @property
    def apex_j(self) -> float:
        """Row of the end-fire apex (negative: above the frame)."""
        return -(self.radius_mm - self.top_mm) / self.pixel_mm


def draw_geometry(rng: np.random.Generator, kind: str) -> ProbeGeometry:
    """A random probe of ``kind`` with its own frame size and pixel spacing."""
    px = float(rng.uniform(0.18, 0.3) if kind == ENDFIRE else rng.uniform(0.15, 0.25))
    if kind == ENDFIRE:
        depth, radius, sector = rng.uniform(50, 65), rng.uniform(7, 10), rng.uniform(110, 150)
        width = min(2 * (radius + depth) * np.sin(np.deg2rad(sector / 2)), 1.3 * depth)
        return ProbeGeometry(ENDFIRE, (int((depth + 1.0) / px), int(width / px)), px, depth,
                             radius_mm=radius, sector_deg=sector, n_beams=int(sector / 0.75))
    if kind != SIDEFIRE:
        raise InputError(f"probe kind {kind!r}: {ENDFIRE!r} or {SIDEFIRE!r} expected")
    depth, width = rng.uniform(40, 55), rng.uniform(45, 60)
    return ProbeGeometry(SIDEFIRE, (int((depth + 1.0) / px), int((width + 4.0) / px)), px, depth,
                         width_mm=width, n_beams=int(width / 0.3))


@dataclass(frozen=True)
class Beams:
    """Where the beams' samples lie on the frame, and how the frame samples the beam image."""

    sample_ij: Tensor  # (R, B, 2) frame pixel (i, j) of every beam sample
    radial_ij: Tensor  # (R, B, 2) unit vector along the beam (away from the face), pixels
    depth_mm: Tensor  # (R,) depth of each sample row below the face
    spacing_mm: Tensor  # (R,) distance between neighbouring beams at each depth
    scan_grid: Tensor  # (1, H, W, 2) grid_sample grid into the (R, B) beam image (corners aligned)
    mask: Tensor  # (H, W) bool, inside the imaged region
    pixel_depth_mm: Tensor  # (H, W) depth of each frame pixel below the face
    pixel_radial_ij: Tensor  # (H, W, 2) beam direction at each frame pixel
    dz_mm: float  # depth step between sample rows
    coarse: int  # tissue is looked up every ``coarse`` rows; (R - 1) is a multiple of it

    def coarse_rows(self, a: Tensor) -> Tensor:
        """Rows 0, coarse, 2 coarse, ... of a per-sample array."""
        return a[:: self.coarse]


def make_beams(geo: ProbeGeometry, dz_mm: float, device: str | torch.device = "cpu",
               coarse: int = 4) -> Beams:
    """Beam samples every ``dz_mm`` down to ``geo.depth_mm`` and the scan-conversion grid."""
    nr = coarse * int(np.ceil(geo.depth_mm / dz_mm / coarse)) + 1
    depth = np.arange(nr) * dz_mm
    h, w = geo.frame_hw
    px, ci = geo.pixel_mm, geo.centre_i
    jj, ii = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    nb = geo.n_beams
    if geo.kind == ENDFIRE:
        half = np.deg2rad(geo.sector_deg / 2)
        phi = np.linspace(-half, half, nb)
        direction = np.stack([np.sin(phi), np.cos(phi)], -1)  # (B, 2)
        apex = np.array([ci, geo.apex_j])
        rad = (geo.radius_mm + depth)[:, None, None] / px
        samples = apex + rad * direction[None]
        radial = np.broadcast_to(direction[None], samples.shape)
        spacing = (geo.radius_mm + depth) * (phi[1] - phi[0])
        di, dj = ii - apex[0], jj - apex[1]
        rho = np.hypot(di, dj) * px
        pixel_depth = rho - geo.radius_mm
        angle = np.arctan2(di, dj)
        beam = (angle + half) / (2 * half) * (nb - 1)
        mask = (np.abs(angle) <= half) & (pixel_depth >= 0) & (pixel_depth <= geo.depth_mm)
        pixel_radial = np.stack([di, dj], -1) / np.maximum(np.hypot(di, dj), 1e-6)[..., None]
    else:
        pitch = geo.width_mm / (nb - 1)
        offs = (np.arange(nb) - 0.5 * (nb - 1)) * pitch / px
        top = geo.top_mm / px
        samples = np.stack(np.broadcast_arrays(ci + offs[None, :], top + depth[:, None] / px), -1)
        radial = np.broadcast_to(np.array([0.0, 1.0]), samples.shape)
        spacing = np.full(nr, pitch)
        pixel_depth = jj * px - geo.top_mm
        beam = (ii - ci) * px / pitch + 0.5 * (nb - 1)
        mask = (beam >= 0) & (beam <= nb - 1) & (pixel_depth >= 0) & (pixel_depth <= geo.depth_mm)
        pixel_radial = np.broadcast_to(np.array([0.0, 1.0]), (h, w, 2))
    row = pixel_depth / dz_mm
    grid = np.stack([2 * beam / (nb - 1) - 1, 2 * row / (nr - 1) - 1], -1)

    def t(a, dtype=torch.float32):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    return Beams(sample_ij=t(samples), radial_ij=t(radial), depth_mm=t(depth),
                 spacing_mm=t(spacing), scan_grid=t(grid)[None], mask=t(mask, torch.bool),
                 pixel_depth_mm=t(pixel_depth), pixel_radial_ij=t(pixel_radial), dz_mm=dz_mm,
                 coarse=coarse)
