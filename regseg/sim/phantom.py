"""Synthetic prostate phantom: a seeded T2-like MRI, its labels, and the tissue map to image.

The anatomy is built from implicit shapes on a RAS millimetre grid centred on the prostate: a
tapered, randomly perturbed superellipsoid gland split into transition and peripheral zones, 1-2
lesions inside the gland, urethra, capsule, periprostatic fat, rectum (wall + lumen, where the
TRUS probe goes), bladder, calcifications and surrounding soft tissue. Every random choice comes
from ``np.random.default_rng(seed)``, so a seed is a case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regseg.imageio import Volume, save_volume
from regseg.types import BACKGROUND, LESION, PROSTATE

# Tissue classes of ``Phantom.tissue``. 0 is the generic soft tissue, so anything sampled outside
# the volume with zero padding reads as soft tissue.
SOFT_TISSUE = 0  # muscle and other soft tissue
FAT = 1
RECTAL_WALL = 2
RECTAL_LUMEN = 3
BLADDER_WALL = 4
URINE = 5
CAPSULE = 6
PERIPHERAL_ZONE = 7
TRANSITION_ZONE = 8
URETHRA = 9
TUMOUR = 10  # the lesion as tissue (label value LESION)
CALCIFICATION = 11
TISSUE_NAMES = {
    SOFT_TISSUE: "soft tissue", FAT: "fat", RECTAL_WALL: "rectal wall",
    RECTAL_LUMEN: "rectal lumen", BLADDER_WALL: "bladder wall", URINE: "urine", CAPSULE: "capsule",
    PERIPHERAL_ZONE: "peripheral zone", TRANSITION_ZONE: "transition zone", URETHRA: "urethra",
    TUMOUR: "tumour", CALCIFICATION: "calcification",
}
#: Label value of every tissue class: ``labels == TISSUE_TO_LABEL[tissue]`` holds voxelwise.
TISSUE_TO_LABEL = np.full(len(TISSUE_NAMES), BACKGROUND, dtype=np.uint8)
TISSUE_TO_LABEL[[PERIPHERAL_ZONE, TRANSITION_ZONE, URETHRA, CALCIFICATION]] = PROSTATE
TISSUE_TO_LABEL[TUMOUR] = LESION

# T2-weighted appearance, arbitrary units: fluid and fat bright, PZ bright, TZ intermediate,
# tumour, muscle, capsule and the rectal wall dark (after PI-RADS descriptions of T2 images).
_MRI_LEVEL = {
    SOFT_TISSUE: 270.0, FAT: 800.0, RECTAL_WALL: 170.0, RECTAL_LUMEN: 50.0, BLADDER_WALL: 210.0,
    URINE: 950.0, CAPSULE: 170.0, PERIPHERAL_ZONE: 700.0, TRANSITION_ZONE: 430.0, URETHRA: 560.0,
    TUMOUR: 250.0, CALCIFICATION: 150.0,
}


@dataclass(frozen=True)
class PhantomOptions:
    """Anatomy and MRI-appearance settings (regseg.sim.randomise draws them; defaults: the demo).

    With the defaults a seed gives the same case as ever: the options scale the random draws,
    they never add any.
    """

    gland_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # R-L, A-P, S-I size factors
    tz_scale: float = 1.0  # transition-zone size factor (BPH: larger)
    lesion_count: tuple[int, int] = (1, 3)  # lesions drawn from [low, high)
    lesion_mm: tuple[float, float] = (2.5, 7.0)  # range of each lesion semi-axis
    calcifications: tuple[int, int] = (2, 7)  # count drawn from [low, high)
    mri_gain: tuple[tuple[int, float], ...] = ()  # (tissue class, factor) on the T2 levels
    mri_blur_vox: float = 0.6  # in-plane partial-volume blur (voxels)
    mri_slice_blur_vox: float = 0.6  # blur along S-I: thick slices blur more
    mri_noise: float = 15.0  # Rician noise sigma
    mri_bias: float = 0.1  # receive-coil bias field strength (log scale)


@dataclass(frozen=True)
class Phantom:
    """One synthetic case; the three volumes share one RAS grid."""

    mri: Volume  # float32 (I, J, K), T2-like, roughly 0..1000
    labels: Volume  # uint8 (I, J, K): 0 background, 1 prostate gland (TZ + PZ), 2 lesion
    tissue: Volume  # uint8 (I, J, K): the tissue classes above, what the scanner renders
    seed: int


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Zero-mean, unit-variance random field that varies over about ``1 / cells`` of each axis.

    Args:
        shape: output shape, 2-D or 3-D.
        cells: number of random control values per axis (fewer = smoother).
    Returns:
        float32 array of ``shape``, trilinear (bilinear) interpolation of Gaussian control values.
    """
    coarse = torch.from_numpy(rng.standard_normal((cells + 1,) * len(shape)).astype(np.float32))
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    field = F.interpolate(coarse[None, None], size=shape, mode=mode, align_corners=True)[0, 0]
    field = field - field.mean()
    return (field / field.std().clamp_min(1e-6)).numpy()


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _signed_distance(f: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Approximate signed distance in mm to the level set ``f == 1`` (negative inside).

    First order: ``(f - 1) / |grad f|``, exact for a plane and good within a few mm of a smooth
    surface, which is all the shells (capsule, fat, walls) need.
    """
    grad = np.gradient(f, spacing_mm)
    norm = np.sqrt(grad[0] ** 2 + grad[1] ** 2 + grad[2] ** 2)
    return ((f - 1.0) / np.maximum(norm, 1e-3)).astype(np.float32)


def _blur(data: np.ndarray, sigma_vox: float, sigma_z_vox: float | None = None) -> np.ndarray:
    """Separable Gaussian blur of a 3-D array (partial-volume smoothing of the MRI).

    ``sigma_z_vox`` (default ``sigma_vox``) is the blur along the third axis (S-I).
    """
    x = torch.from_numpy(np.ascontiguousarray(data))[None, None]
    for axis in range(3):
        sigma = sigma_vox if axis < 2 or sigma_z_vox is None else sigma_z_vox
        radius = max(1, int(np.ceil(3 * sigma)))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / max(sigma, 1e-3)) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.reshape(shape))
    return x[0, 0].numpy()


def _grid(shape: tuple[int, int, int], spacing_mm: float) -> tuple[np.ndarray, ...]:
    """voxel_to_world centred on world (0, 0, 0), and broadcastable x, y, z coordinates in mm."""
    voxel_to_world = np.diag([spacing_mm] * 3 + [1.0])
    voxel_to_world[:3, 3] = -0.5 * (np.asarray(shape) - 1) * spacing_mm
    axes = [(np.arange(n, dtype=np.float32) * spacing_mm + voxel_to_world[a, 3]).astype(np.float32)
            for a, n in enumerate(shape)]
    return voxel_to_world, axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _gland(rng, x, y, z, spacing_mm, shape, scale=(1.0, 1.0, 1.0)):
    """Gland implicit function pieces: signed distance, gland-frame coordinates and sizes."""
    half = np.array([rng.uniform(17.5, 23.5), rng.uniform(13.0, 17.0), rng.uniform(15.0, 22.0)])
    half = half * np.asarray(scale, dtype=np.float64)
    posterior = rng.uniform(0.78, 0.92)  # the posterior face is flatter (it lies on the rectum)
    power = rng.uniform(2.2, 3.0)
    taper = rng.uniform(0.3, 0.5)  # how much narrower the apex (inferior) is than the base
    tilt = np.deg2rad(rng.uniform(-15.0, 5.0))  # base tipped anteriorly, as in most patients
    centre = rng.uniform(-1.5, 1.5, 3).astype(np.float32)
    gx = x - centre[0]
    gy = np.cos(tilt) * (y - centre[1]) - np.sin(tilt) * (z - centre[2])
    gz = np.sin(tilt) * (y - centre[1]) + np.cos(tilt) * (z - centre[2])
    shrink = 1.0 - taper * np.clip(-gz / half[2], 0.0, 1.0) ** 2
    ay = np.where(gy > 0, half[1], half[1] * posterior)
    f = (np.abs(gx / (half[0] * shrink)) ** power + np.abs(gy / (ay * shrink)) ** power
         + np.abs(gz / half[2]) ** power) ** (1.0 / power)
    f = f / (1.0 + rng.uniform(0.05, 0.1) * smooth_noise(rng, shape, 4))
    return _signed_distance(f, spacing_mm), (gx, gy, gz), half


def _ellipsoid_in_box(centre_vox, axes_mm, rotation, spacing_mm, shape, noise=None):
    """Boolean ellipsoid (optionally lumpy) inside its bounding box: returns (slices, mask)."""
    r = int(np.ceil(axes_mm.max() * 1.2 / spacing_mm)) + 1
    lo = np.maximum(np.asarray(centre_vox) - r, 0)
    hi = np.minimum(np.asarray(centre_vox) + r + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    idx = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij"), -1)
    local = ((idx - np.asarray(centre_vox)) * spacing_mm) @ rotation  # into the ellipsoid's axes
    f = np.sqrt(((local / axes_mm) ** 2).sum(-1))
    if noise is not None:
        f = f / (1.0 + 0.12 * noise[box])
    return box, f < 1.0


def make_phantom(seed: int = 0, *, spacing_mm: float = 0.7,
                 size_mm: tuple[float, float, float] = (90.0, 90.0, 80.0),
                 options: PhantomOptions | None = None) -> Phantom:
    """Generate a synthetic prostate case.

    Args:
        seed: the case; the same seed gives identical arrays, another seed another anatomy.
        spacing_mm: isotropic voxel size in mm.
        size_mm: field of view (R-L, A-P, S-I) in mm, centred on world (0, 0, 0) near the gland.
        options: anatomy and MRI appearance (default :class:`PhantomOptions`).
    Returns:
        A :class:`Phantom`; ``labels`` equals ``TISSUE_TO_LABEL[tissue]`` voxelwise.
    """
    opts = options or PhantomOptions()
    rng = np.random.default_rng(seed)
    shape = tuple(int(round(s / spacing_mm)) for s in size_mm)
    voxel_to_world, x, y, z = _grid(shape, spacing_mm)
    tissue = np.full(shape, SOFT_TISSUE, dtype=np.uint8)

    gland_sd, (gx, gy, gz), half = _gland(rng, x, y, z, spacing_mm, shape, opts.gland_scale)
    gland = gland_sd < 0

    # Fat lobules scattered through the soft tissue, painted first so organs cover them.
    tissue[smooth_noise(rng, shape, 9) > 1.1] = FAT

    # Rectum: a straight tube posterior to the gland, leaving a thin fat gap (Denonvilliers).
    lumen_r, wall_t, gap = rng.uniform(7.0, 8.5), rng.uniform(3.0, 4.0), rng.uniform(1.5, 3.0)
    slope_y, slope_x = np.tan(np.deg2rad(rng.uniform(-5.0, 5.0, 2)))
    x_r = rng.uniform(-2.0, 2.0)
    gi = np.nonzero(gland)
    gxw, gyw, gzw = x[gi[0], 0, 0], y[0, gi[1], 0], z[0, 0, gi[2]]
    near_mid = np.abs(gxw - x_r - slope_x * gzw) < 6.0
    y_r = float(np.min((gyw - slope_y * gzw)[near_mid])) - (lumen_r + wall_t + gap)
    rect_dist = np.sqrt((x - x_r - slope_x * z) ** 2 + (y - y_r - slope_y * z) ** 2)
    wall = rect_dist < lumen_r + wall_t * (1.0 + 0.15 * smooth_noise(rng, shape, 6))
    behind = (y - y_r - slope_y * z) < 3.0  # mesorectal fat lies behind and beside the rectum
    tissue[(rect_dist < lumen_r + wall_t + rng.uniform(5.0, 9.0)) & behind] = FAT

    # Periprostatic fat, thicker anteriorly (retropubic space), then the capsule.
    capsule_t = rng.uniform(0.8, 1.2)
    fat_t = capsule_t + 1.5 + 1.5 * np.abs(smooth_noise(rng, shape, 5)) + 3.0 * (gy > 0)
    tissue[(gland_sd >= 0) & (gland_sd < fat_t)] = FAT

    # Bladder above and in front of the base; the gland is painted over the bladder neck.
    b_centre = np.array([rng.uniform(-3, 3), rng.uniform(8, 14), half[2] + rng.uniform(12, 18)])
    b_half = np.array([rng.uniform(22, 30), rng.uniform(16, 22), rng.uniform(14, 20)])
    b_f = np.sqrt(((x - b_centre[0]) / b_half[0]) ** 2 + ((y - b_centre[1]) / b_half[1]) ** 2
                  + ((z - b_centre[2]) / b_half[2]) ** 2)
    tissue[b_f < 1.0 + rng.uniform(1.5, 2.5) / b_half.min()] = BLADDER_WALL
    tissue[b_f < 1.0] = URINE
    tissue[wall] = RECTAL_WALL
    tissue[rect_dist < lumen_r] = RECTAL_LUMEN
    tissue[(gland_sd >= 0) & (gland_sd < capsule_t)] = CAPSULE

    # Zones: the TZ is an anterior-central ellipsoid (size varies, as with BPH); PZ the rest.
    tissue[gland] = PERIPHERAL_ZONE
    tz_half = half * np.array([0.7, 0.68, 0.75]) * rng.uniform(0.85, 1.15) * opts.tz_scale
    tz_f = np.sqrt((gx / tz_half[0]) ** 2 + ((gy - 0.3 * half[1]) / tz_half[1]) ** 2
                   + ((gz - 0.15 * half[2]) / tz_half[2]) ** 2)
    tz_f = tz_f / (1.0 + 0.08 * smooth_noise(rng, shape, 5))
    tz = gland & (tz_f < 1.0)
    tissue[tz] = TRANSITION_ZONE
    # Urethra: bladder neck to apex through the TZ, bending anteriorly above the verumontanum.
    u_y = half[1] * (0.1 + 0.2 * np.clip(gz / half[2], 0.0, 1.0))
    tissue[gland & ((gx ** 2 + (gy - u_y) ** 2) < rng.uniform(1.5, 2.2) ** 2)] = URETHRA

    noise = smooth_noise(rng, shape, 12)
    lesion = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(*opts.lesion_count))):
        zone = (tissue == PERIPHERAL_ZONE) if rng.random() < 0.8 else tz
        candidates = np.flatnonzero(zone & (gland_sd < -2.5))
        centre = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
        box, blob = _ellipsoid_in_box(centre, rng.uniform(*opts.lesion_mm, 3), random_rotation(rng),
                                      spacing_mm, shape, noise)
        lesion[box] |= blob
    lesion &= gland
    tissue[lesion] = TUMOUR

    # Calcifications: small spheres in the TZ, mostly along its border (the "surgical capsule").
    calc_sites = np.flatnonzero(tz & ~lesion & (tz_f > 0.7))
    n_calc = int(rng.integers(*opts.calcifications))
    for flat in calc_sites[rng.integers(calc_sites.size, size=n_calc)]:
        centre = np.unravel_index(flat, shape)
        box, blob = _ellipsoid_in_box(centre, np.full(3, rng.uniform(0.6, 1.3)), np.eye(3),
                                      spacing_mm, shape)
        region = tissue[box]
        region[blob & (region == TRANSITION_ZONE)] = CALCIFICATION

    labels = TISSUE_TO_LABEL[tissue]
    mri = _render_mri(rng, tissue, shape, opts)
    return Phantom(mri=Volume(mri, voxel_to_world), labels=Volume(labels, voxel_to_world.copy()),
                   tissue=Volume(tissue, voxel_to_world.copy()), seed=seed)


def _render_mri(rng: np.random.Generator, tissue: np.ndarray, shape,
                opts: PhantomOptions) -> np.ndarray:
    """T2-like image of a tissue map: levels, textures, partial volume, bias field, Rician noise."""
    levels = np.array([_MRI_LEVEL[t] for t in range(len(TISSUE_NAMES))], dtype=np.float32)
    for cls, factor in opts.mri_gain:
        levels[int(cls)] *= np.float32(factor)
    image = levels[tissue]
    # Texture: the TZ is nodular (BPH), the PZ and fat nearly homogeneous.
    texture = np.array([0.06] * len(TISSUE_NAMES), dtype=np.float32)
    texture[TRANSITION_ZONE], texture[PERIPHERAL_ZONE], texture[TUMOUR] = 0.22, 0.07, 0.1
    image *= 1.0 + texture[tissue] * smooth_noise(rng, shape, 18)
    image = _blur(image, opts.mri_blur_vox, opts.mri_slice_blur_vox)
    image *= np.exp(opts.mri_bias * smooth_noise(rng, shape, 2))  # receive-coil bias field
    sigma = opts.mri_noise
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n2 = rng.standard_normal(shape, dtype=np.float32)
    return np.sqrt((image + sigma * n1) ** 2 + (sigma * n2) ** 2).astype(np.float32)


def write_phantom(phantom: Phantom, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``case.nii.gz`` (MRI) and ``case_labels.nii.gz`` into ``out_dir``.

    Returns:
        (mri_path, labels_path).
    """
    out_dir = Path(out_dir)
    mri_path, labels_path = out_dir / "case.nii.gz", out_dir / "case_labels.nii.gz"
    save_volume(phantom.mri, mri_path)
    save_volume(phantom.labels, labels_path)
    return mri_path, labels_path
