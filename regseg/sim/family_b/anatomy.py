"""Family B phantom: a pelvis around a star-shaped gland, its T2 MRI, labels and acoustic table.

Written apart from :mod:`regseg.sim.phantom` (family A) on purpose; see the package docstring.
Anatomy is built on a fine isotropic grid (``FINE_MM``) in RAS millimetres: that grid is what the
ultrasound renderer images and what frame truth comes from. The MRI is then acquired from it on
its own oblique, anisotropic grid, and the MRI labels are the fine labels at the MRI voxel centres
(what a reader outlines slice by slice), so MRI labels and the true anatomy differ by partial
volume, as in a real case.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regseg.errors import InputError
from regseg.imageio import Volume
from regseg.spatial import index_to_normalised, invert
from regseg.types import BACKGROUND, LESION, PROSTATE

# Tissue classes of ``Case.tissue``; 0 is fat, which is also what lies outside the volume.
FAT, MUSCLE, RECTAL_WALL, RECTAL_LUMEN, BLADDER_WALL, URINE, BONE, VESICLE, BUNDLE = range(9)
PZ, CZ, TZ, STROMA, URETHRA, CALCIFICATION = range(9, 15)
LESION0, MAX_LESIONS = 15, 3  # lesion k has class LESION0 + k
N_TISSUES = LESION0 + MAX_LESIONS
GLAND_TISSUES = (PZ, CZ, TZ, STROMA, URETHRA, CALCIFICATION)
FINE_MM = 0.6  # the anatomy grid
LESION_KINDS = ("hypo", "mild", "iso")  # echogenicity on TRUS; "iso" lesions are invisible there

#: Per class: echo (dB), impedance (MRayl), attenuation (dB/cm/MHz), K-distribution shape (small =
#: few scatterers per cell, large = Rayleigh), macro texture (dB std), T2 level (fat = 1).
_TABLE = {
    FAT: (-14.0, 1.38, 0.6, 8.0, 3.0, 1.00), MUSCLE: (-24.0, 1.70, 1.0, 20.0, 2.0, 0.22),
    RECTAL_WALL: (-14.0, 1.66, 0.8, 10.0, 1.5, 0.30),
    RECTAL_LUMEN: (-70.0, 1.50, 0.05, 50.0, 0.0, 0.15),
    BLADDER_WALL: (-12.0, 1.66, 0.8, 10.0, 1.5, 0.28), URINE: (-85.0, 1.52, 0.002, 50.0, 0.0, 1.35),
    BONE: (2.0, 6.0, 15.0, 2.0, 1.0, 0.12), VESICLE: (-28.0, 1.60, 0.6, 10.0, 2.0, 1.10),
    BUNDLE: (-22.0, 1.62, 0.7, 5.0, 2.0, 0.55), PZ: (-17.0, 1.63, 0.55, 25.0, 1.2, 0.85),
    CZ: (-21.0, 1.64, 0.6, 15.0, 1.5, 0.30), TZ: (-22.0, 1.63, 0.55, 6.0, 4.0, 0.50),
    STROMA: (-26.0, 1.68, 0.8, 12.0, 1.5, 0.18), URETHRA: (-32.0, 1.58, 0.5, 20.0, 1.0, 0.70),
    CALCIFICATION: (8.0, 3.5, 10.0, 1.5, 0.0, 0.10),
}


@dataclass(frozen=True)
class Acoustics:
    """Per tissue class, float32 arrays of length :data:`N_TISSUES`."""

    echo_db: np.ndarray
    impedance: np.ndarray
    atten_db_cm_mhz: np.ndarray
    k_shape: np.ndarray
    texture_db: np.ndarray


@dataclass(frozen=True)
class Rectum:
    """Rectal centreline ``x = x_mm, y = y0_mm - curvature (z - z0_mm)^2`` and lumen radius."""

    x_mm: float
    y0_mm: float
    z0_mm: float
    curvature: float  # 1/mm
    lumen_mm: float

    def point(self, z_mm: float) -> np.ndarray:
        return np.array([self.x_mm, self.y0_mm - self.curvature * (z_mm - self.z0_mm) ** 2, z_mm])

    def tangent(self, z_mm: float) -> np.ndarray:
        t = np.array([0.0, -2.0 * self.curvature * (z_mm - self.z0_mm), 1.0])
        return t / np.linalg.norm(t)


@dataclass(frozen=True)
class Case:
    """One family-B case. ``mri`` and ``labels`` are what the live path loads."""

    mri: Volume  # float32 T2 on the oblique 0.5 x 0.5 x 3 mm grid
    labels: Volume  # uint8 on the MRI grid: 0 background, 1 prostate, 2 lesion
    tissue: Volume  # uint8 classes on the fine grid: what the renderer images
    truth_labels: Volume  # uint8 labels on the fine grid: where frame truth comes from
    texture: Volume  # float32 zero-mean unit-variance smooth field (macro echo texture)
    acoustics: Acoustics
    gland_centre: np.ndarray  # (3,) mm
    gland_axes_mm: np.ndarray  # (3,) semi-axes before shape perturbation
    rectum: Rectum
    lesion_kinds: tuple[str, ...]
    seed: int


def _monomials(u: np.ndarray) -> list[np.ndarray]:
    """Monomials of degree 1-3 of a unit vector's components (spherical harmonics up to l = 3)."""
    powers = [[np.ones_like(u[a]), u[a], u[a] * u[a], u[a] * u[a] * u[a]] for a in range(3)]
    out = []
    for a, b, c in itertools.product(range(4), repeat=3):
        if 1 <= a + b + c <= 3:
            terms = [p for p, e in ((powers[0][a], a), (powers[1][b], b), (powers[2][c], c)) if e]
            out.append(terms[0] if len(terms) == 1 else np.prod(terms, axis=0))
    return out


def _gland_radius(u: np.ndarray, axes: np.ndarray, shape: dict) -> np.ndarray:
    """Radius (mm) of the gland surface along unit directions ``u`` (3, ...) in the gland frame."""
    r0 = 1.0 / np.sqrt((u[0] / axes[0]) ** 2 + (u[1] / axes[1]) ** 2 + (u[2] / axes[2]) ** 2)
    poly = sum(c * m for c, m in zip(shape["coef"], _monomials(u), strict=True))
    r = r0 * np.clip(1.0 + poly, 0.75, 1.3)
    r = r * np.where(u[1] < 0, 1.0 - shape["flatten"] * u[1] ** 2, 1.0)
    return r * np.where(u[2] < 0, 1.0 - shape["taper"] * np.abs(u[2]) ** 3, 1.0)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def _fibonacci_sphere(n: int) -> np.ndarray:
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = np.pi * (1.0 + 5 ** 0.5) * k
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z])


def _value_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Smooth zero-mean unit-variance field: Gaussian lattice, trilinear-upsampled, box-blurred."""
    coarse = torch.from_numpy(rng.standard_normal((cells + 3,) * 3).astype(np.float32))
    up = F.interpolate(coarse[None, None], size=shape, mode="trilinear", align_corners=False)
    up = F.avg_pool3d(up, 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    up = up - up.mean()
    return (up / up.std().clamp_min(1e-6)).numpy()


def make_case(seed: int, *, mri_spacing_mm: tuple[float, float, float] = (0.5, 0.5, 3.0),
              gland_mm: tuple[float, float] = (20.0, 55.0)) -> Case:
    """Generate family-B case ``seed`` (deterministic).

    Args:
        seed: the case.
        mri_spacing_mm: MRI voxel size (in-plane, in-plane, slice thickness).
        gland_mm: range of the gland's largest diameter.
    Raises:
        InputError: for a non-positive spacing or an empty/inverted size range.
    """
    if min(mri_spacing_mm) <= 0 or len(mri_spacing_mm) != 3:
        raise InputError(f"mri_spacing_mm={mri_spacing_mm}: three positive sizes in mm expected")
    if not 5.0 <= gland_mm[0] <= gland_mm[1]:
        raise InputError(f"gland_mm={gland_mm}: (low, high) with 5 <= low <= high expected")
    rng = np.random.default_rng([seed, 0xB])
    width = rng.uniform(*gland_mm)
    axes = np.array([0.5, 0.5 * rng.uniform(0.6, 0.85), 0.5 * rng.uniform(0.75, 1.0)]) * width
    shape = {"coef": rng.normal(0.0, 0.06, 19), "flatten": rng.uniform(0.1, 0.3),
             "taper": rng.uniform(0.1, 0.35)}
    centre = rng.uniform(-3.0, 3.0, 3)
    rot = _rotation(np.deg2rad(rng.uniform(-25, 10)), *np.deg2rad(rng.uniform(-8, 8, 2)))

    lo = np.array([-(axes[0] + 32), -(axes[1] + 38), -(axes[2] + 25)]) + centre
    hi = np.array([axes[0] + 32, axes[1] + 32, axes[2] + 45]) + centre
    n = np.ceil((hi - lo) / FINE_MM).astype(int)
    v2w = np.diag([FINE_MM] * 3 + [1.0])
    v2w[:3, 3] = lo
    x, y, z = (lo[a] + FINE_MM * np.arange(n[a], dtype=np.float32) for a in range(3))
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]

    # Gland frame coordinates and normalised radius s (< 1 inside), in a box around the gland.
    reach = 1.35 * axes.max() + 2.0
    box = tuple(slice(max(0, int((centre[a] - reach - lo[a]) / FINE_MM)),
                      min(int(n[a]), int((centre[a] + reach - lo[a]) / FINE_MM) + 2))
                for a in range(3))
    xb, yb, zb = x[box[0]], y[:, box[1]], z[:, :, box[2]]
    dx, dy, dz = (xb - centre[0]), (yb - centre[1]), (zb - centre[2])
    g = [rot[0, a] * dx + rot[1, a] * dy + rot[2, a] * dz for a in range(3)]  # R^T (p - c)
    rho = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) + 1e-6
    s = (rho / _gland_radius(np.stack([g[0] / rho, g[1] / rho, g[2] / rho]), axes, shape)
         ).astype(np.float32)
    gland_b = s < 1.0
    gland = np.zeros(tuple(n), dtype=bool)
    gland[box] = gland_b

    tissue = np.full(tuple(n), FAT, dtype=np.uint8)
    # Muscles: obturator internus laterally, levator ani as a shell below the base.
    lateral = np.abs(x - centre[0]) > axes[0] + rng.uniform(20, 28)
    tissue[np.broadcast_to(lateral, tissue.shape)] = MUSCLE
    ex, ey = axes[0] + rng.uniform(6, 10), axes[1] + rng.uniform(12, 18)
    ell = np.sqrt(((x - centre[0]) / ex) ** 2 + ((y - centre[1] + 0.5 * axes[1]) / ey) ** 2)
    shell = (np.abs(ell - 1.0) * min(ex, ey) < rng.uniform(2.0, 3.0)) & (
        y < centre[1] + 0.3 * axes[1]) & (z < centre[2] + 0.4 * axes[2])
    tissue[shell] = MUSCLE

    # Pubic bone: an elliptic bar across the midline, anterior to the gland.
    y_bone, z_bone = centre[1] + axes[1] + rng.uniform(12, 22), centre[2] + rng.uniform(-2, 8)
    bone = (((y - y_bone) / rng.uniform(4, 6)) ** 2 + ((z - z_bone) / rng.uniform(15, 20)) ** 2
            < 1) & (
        np.abs(x - centre[0]) < rng.uniform(25, 35))
    tissue[bone] = BONE

    # Bladder: a rounded box above the base.
    bh = np.array([rng.uniform(20, 35), rng.uniform(15, 25), rng.uniform(12, 24)])
    bc = centre + np.array([rng.uniform(-4, 4), axes[1] * rng.uniform(0.0, 0.4),
                            axes[2] * rng.uniform(0.6, 0.9) + bh[2] * rng.uniform(0.7, 0.95)])
    bq = (((x - bc[0]) / bh[0]) ** 4 + ((y - bc[1]) / bh[1]) ** 4 + ((z - bc[2]) / bh[2]) ** 4)
    wall = rng.uniform(2.0, 4.0) / bh.min()
    tissue[bq < (1 + wall) ** 4] = BLADDER_WALL
    tissue[bq < 1] = URINE

    # Seminal vesicles: posterior-superior to the base, rising laterally.
    for side in (-1, 1):
        c = centre + np.array([side * rng.uniform(10, 16), -0.55 * axes[1],
                               0.85 * axes[2] + rng.uniform(3, 7)])
        r = _rotation(0.0, side * np.deg2rad(rng.uniform(20, 35)), 0.0)
        h = np.array([rng.uniform(12, 18), rng.uniform(3, 5), rng.uniform(5, 8)])
        q = sum((((x - c[0]) * r[0, a] + (y - c[1]) * r[1, a] + (z - c[2]) * r[2, a]) / h[a]) ** 2
                for a in range(3))
        tissue[q < 1] = VESICLE

    # Rectum: curved tube behind the gland, a thin fat gap away from its posterior surface.
    lumen, wall_mm, gap = rng.uniform(8, 10), rng.uniform(2.5, 4.0), rng.uniform(1.0, 3.0)
    x_r = centre[0] + rng.uniform(-3, 3)
    dirs = _fibonacci_sphere(4000)
    surf = centre[:, None] + rot @ (dirs * _gland_radius(dirs, axes, shape))
    near = np.abs(surf[0] - x_r) < 5.0
    rectum = Rectum(x_mm=float(x_r), y0_mm=float(surf[1][near].min() - gap - wall_mm - lumen),
                    z0_mm=float(centre[2]), curvature=float(rng.uniform(0.002, 0.006)),
                    lumen_mm=float(lumen))
    yc = rectum.y0_mm - rectum.curvature * (z - rectum.z0_mm) ** 2
    rd = np.sqrt((x - x_r) ** 2 + (y - yc) ** 2)
    tissue[rd < lumen + wall_mm] = RECTAL_WALL
    tissue[rd < lumen] = RECTAL_LUMEN

    # Neurovascular bundles: posterolateral tubes just outside the capsule.
    for side in (-1, 1):
        d = np.array([side * 0.7, -0.7, 0.0]) / np.hypot(0.7, 0.7)
        p = centre + rot @ (d * (_gland_radius(d[:, None], axes, shape)[0] + 3.0))
        tube = ((x - p[0]) ** 2 + (y - p[1]) ** 2 < rng.uniform(1.5, 2.5) ** 2) & (
            np.abs(z - centre[2]) < axes[2] * 1.1)
        tissue[tube & ~gland] = BUNDLE

    # Zones (in the box): PZ by default; two TZ (BPH) lobes; CZ at the posterior base; stroma.
    tb = tissue[box]  # a view: writes go to tissue
    tb[gland_b] = PZ
    k = rng.uniform(0.7, 1.4)
    for side in (-1, 1):
        q = (((g[0] - side * 0.2 * np.sqrt(k) * axes[0]) / (0.3 * k * axes[0])) ** 2
             + ((g[1] - 0.12 * axes[1]) / (0.38 * k * axes[1])) ** 2
             + ((g[2] - 0.05 * axes[2]) / (0.45 * k * axes[2])) ** 2)
        tb[gland_b & (q < 1) & (s < 0.9)] = TZ
    tz = tb == TZ
    tb[gland_b & ~tz & (g[2] > 0.3 * axes[2]) & (g[1] < 0.15 * axes[1])
       & (np.abs(g[0]) < 0.55 * axes[0])] = CZ
    tb[gland_b & ~tz & (g[1] > 0.55 * rho) & (s > 0.55)] = STROMA
    y_u = axes[1] * (0.05 + 0.2 * g[2] / axes[2])
    tb[gland_b & (g[0] ** 2 + (g[1] - y_u) ** 2 < rng.uniform(1.3, 2.2) ** 2)] = URETHRA

    def ball(c: np.ndarray, r2: float) -> np.ndarray:
        return (xb - c[0]) ** 2 + (yb - c[1]) ** 2 + (zb - c[2]) ** 2 < r2

    origin_b = lo + FINE_MM * np.array([b.start for b in box])
    # Calcifications: small bright spheres in the inner gland.
    sites = np.flatnonzero(gland_b & (s > 0.4) & (s < 0.85))
    for flat in sites[rng.integers(sites.size, size=int(rng.integers(0, 9)))]:
        c = np.array(np.unravel_index(flat, gland_b.shape)) * FINE_MM + origin_b
        tb[gland_b & ball(c, max(rng.uniform(0.5, 1.5), 0.7) ** 2)] = CALCIFICATION

    # Lesions: 1-3 lobulated blobs, 70 % in the PZ, each with its own TRUS echogenicity.
    kinds, zones = [], []
    for k_les in range(int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))):
        zone = PZ if rng.random() < 0.7 else TZ
        cand = np.flatnonzero((tb == zone) & (s < 0.8))
        if cand.size == 0:
            cand = np.flatnonzero(gland_b & (s < 0.8))
        c0 = np.array(np.unravel_index(cand[rng.integers(cand.size)], gland_b.shape)
                      ) * FINE_MM + origin_b
        diam = rng.uniform(4.0, 15.0)
        blob = np.zeros(gland_b.shape, dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            blob |= ball(c0 + rng.normal(0.0, 0.25 * diam, 3),
                         (0.5 * diam * rng.uniform(0.6, 1.0)) ** 2)
        tb[blob & gland_b] = LESION0 + k_les
        kinds.append(str(rng.choice(LESION_KINDS, p=[0.55, 0.2, 0.25])))
        zones.append(zone)
    del g, rho, s

    labels = np.full(N_TISSUES, BACKGROUND, dtype=np.uint8)
    labels[list(GLAND_TISSUES)] = PROSTATE
    labels[LESION0:] = LESION
    truth = labels[tissue]
    acoustics, t2 = _tables(rng, kinds, zones)
    texture = _value_noise(rng, tuple(int(v) for v in np.ceil(n / 3)), 10)
    tex_v2w = v2w.copy()
    tex_v2w[:3, :3] *= 3.0
    tex_v2w[:3, 3] = lo + FINE_MM  # centre of the 3x3x3 block of fine voxels
    fine = Volume(tissue, v2w)
    mri, mri_labels = _acquire_mri(rng, fine, truth, t2, texture, mri_spacing_mm)
    return Case(mri=mri, labels=mri_labels, tissue=fine, truth_labels=Volume(truth, v2w.copy()),
                texture=Volume(texture, tex_v2w), acoustics=acoustics,
                gland_centre=centre, gland_axes_mm=axes, rectum=rectum,
                lesion_kinds=tuple(kinds), seed=seed)


def _tables(rng: np.random.Generator, kinds: list[str],
            zones: list[int]) -> tuple[Acoustics, np.ndarray]:
    """The case's acoustic table (per-case jitter, lesion echo vs its host zone) and T2 levels."""
    t = np.zeros((N_TISSUES, 6), dtype=np.float32)
    for cls, row in _TABLE.items():
        t[cls] = row
    t[:LESION0, 0] += rng.uniform(-2.0, 2.0, LESION0)
    t[:LESION0, 5] *= rng.uniform(0.85, 1.15, LESION0)
    for k in range(MAX_LESIONS):
        host, kind = (zones[k], kinds[k]) if k < len(kinds) else (PZ, "hypo")
        offset = {"hypo": rng.uniform(-9, -5), "mild": rng.uniform(-4, -2),
                  "iso": rng.uniform(-0.5, 0.5)}[kind]
        t[LESION0 + k] = t[host]
        t[LESION0 + k, 0] = t[host, 0] + offset
        t[LESION0 + k, 1] += 0.02
        t[LESION0 + k, 3] = 10.0
        t[LESION0 + k, 5] = t[host, 5] * rng.uniform(0.35, 0.65)  # T2-dark on MRI
    acoustics = Acoustics(*(np.ascontiguousarray(t[:, i]) for i in range(5)))
    return acoustics, t[:, 5].copy()


def _acquire_mri(rng: np.random.Generator, fine: Volume, truth: np.ndarray, t2: np.ndarray,
                 texture: np.ndarray, spacing: tuple[float, float, float]
                 ) -> tuple[Volume, Volume]:
    """Oblique axial T2 stack of the fine anatomy: slice profile, bias, Rician noise; its labels."""
    tex_amp = np.full(N_TISSUES, 0.06, dtype=np.float32)
    tex_amp[TZ], tex_amp[PZ], tex_amp[FAT] = 0.25, 0.05, 0.08
    tex = F.interpolate(torch.from_numpy(texture)[None, None], size=fine.data.shape,
                        mode="trilinear", align_corners=False)[0, 0].numpy()
    image = t2[fine.data] * (1.0 + tex_amp[fine.data] * tex)
    shape = np.asarray(fine.data.shape)
    extent = shape * FINE_MM
    angle = np.deg2rad(rng.uniform(-12, 12))
    axes = np.array([[1, 0, 0], [0, np.cos(angle), np.sin(angle)],
                     [0, -np.sin(angle), np.cos(angle)]]).T  # columns: i, j, k directions
    n = np.ceil(extent / np.asarray(spacing)).astype(int)
    v2w = np.eye(4)
    v2w[:3, :3] = axes * np.asarray(spacing)
    centre_world = fine.voxel_to_world[:3, 3] + 0.5 * (shape - 1) * FINE_MM
    v2w[:3, 3] = centre_world - v2w[:3, :3] @ (0.5 * (n - 1))

    # Sample positions: voxel centres, plus sub-slice offsets across the slice thickness.
    world_to_norm = index_to_normalised(shape) @ invert(fine.voxel_to_world)
    ii, jj, kk = (np.arange(v, dtype=np.float32) for v in n)
    src = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 1, 0)))[None, None]
    lab = torch.from_numpy(np.ascontiguousarray(truth.transpose(2, 1, 0)).astype(np.float32))
    acc = None
    offsets, weights = np.linspace(-0.4, 0.4, 5), np.array([0.5, 0.85, 1.0, 0.85, 0.5])
    for off, w in zip(offsets, weights, strict=True):
        grid = _grid(world_to_norm @ v2w, ii, jj, kk + off)
        sample = F.grid_sample(src, grid, mode="bilinear", padding_mode="border",
                               align_corners=False)[0, 0]
        acc = sample * w if acc is None else acc + sample * w
    mri = (acc / weights.sum()).numpy().transpose(2, 1, 0)
    labels = F.grid_sample(lab[None, None], _grid(world_to_norm @ v2w, ii, jj, kk),
                           mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
    labels = labels.numpy().transpose(2, 1, 0).astype(np.uint8)

    # Polynomial bias field over the normalised volume, then Rician noise and a global scale.
    c = [np.linspace(-1, 1, v, dtype=np.float32) for v in n]
    cx, cy, cz = c[0][:, None, None], c[1][None, :, None], c[2][None, None, :]
    b = rng.normal(0.0, 0.15, 6)
    mri = mri * np.exp(b[0] * cx + b[1] * cy + b[2] * cz + b[3] * cx * cx + b[4] * cy * cy
                       + b[5] * cx * cy)
    sigma = rng.uniform(0.015, 0.04) * t2[PZ]
    n1, n2 = (rng.standard_normal(mri.shape, dtype=np.float32) for _ in range(2))
    mri = np.sqrt((mri + sigma * n1) ** 2 + (sigma * n2) ** 2) * rng.uniform(0.3, 3.0) * 1000.0
    return Volume(mri.astype(np.float32), v2w), Volume(labels, v2w.copy())


def _grid(index_to_norm: np.ndarray, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> torch.Tensor:
    """(1, K, J, I, 3) grid_sample grid of index points (i, j, k) through a 4x4 map."""
    m = torch.as_tensor(index_to_norm, dtype=torch.float32)
    ti, tj, tk = (torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in (i, j, k))
    pts = (m[:3, 0] * ti[None, None, :, None] + m[:3, 1] * tj[None, :, None, None]
           + (m[:3, 2] * tk[:, None, None, None] + m[:3, 3]))
    return pts[None]
