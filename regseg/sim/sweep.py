"""A simulated 3-D TRUS sweep of a phantom case, with every truth the sweep workflow is scored on.

One seed is one patient: its MRI and labels (:func:`regseg.sim.phantom.make_phantom`), a 3-D TRUS
volume on an axis-aligned grid in the tracker's Reference frame, the true labels on that grid, the
coverage of the sweep, the true ``reference_to_mri`` and an initial one that is off by a given
misalignment (what tracking alone gives before the MRI is registered to the sweep).

The TRUS tissue is the MRI tissue moved rigidly (Reference -> MRI) and deformed: the probe pushes
tissue away from the rectum (``pressure_mm`` at the probe face, falling off with ``decay`` mm of
distance), plus a smooth random displacement of up to ``DEFORM_MM``. A Reference point ``p``
shows the MRI tissue at ``x + d(x)``, ``x = reference_to_mri_true @ p``; the labels on the TRUS
grid are the MRI labels through that same map, so they are exact.

Two renderings:
    ``volume``: direct 3-D B-mode in cylinder coordinates about the probe axis (beams radial from
        the axis, as a rotating side-fire array): echo and attenuation of the tissue
        (:func:`regseg.sim.bmode.tissue_properties`), Rayleigh speckle through a small PSF,
        attenuation accumulated down each beam (calcification shadows), TGC, log compression,
        then scan conversion onto the Cartesian grid. A couple of seconds at 1 mm.
    ``frames``: a real sagittal fan sweep of 2-D frames from :class:`SimulatedScanner` (no
        tracking error: the tracker is exact; the misalignment is in ``reference_to_mri``),
        compounded by :class:`regseg.reconstruct.VolumeReconstructor`. The true labels are the
        frames' true labels compounded the same way. Slower (tens of seconds).

Seeds: ``TRAIN_SEEDS`` (training), ``ATLAS_SEEDS`` (labelled MRI atlases for multi-atlas
segmentation) and ``EVAL_SEEDS`` (held-out targets) are disjoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regseg import spatial
from regseg.imageio import Volume, save_volume
from regseg.sim import bmode
from regseg.sim.phantom import Phantom, make_phantom, smooth_noise
from regseg.sim.probe_path import ProbeAxis, find_probe_axis
from regseg.types import BACKGROUND

TRAIN_SEEDS = range(11_000, 12_000)
ATLAS_SEEDS = range(12_000, 12_100)
EVAL_SEEDS = range(13_000, 13_100)
RENDERS = ("volume", "frames")

PROBE_RADIUS_MM = 11.0  # probe axis to transducer face
DEPTH_MM = 55.0  # imaging depth below the face
HALF_ANGLE_DEG = 40.0  # the sweep's half angle about anterior
DEFORM_MM = 1.5  # bound on the smooth random displacement
GAIN_DB, DYNAMIC_RANGE_DB = -14.0, 50.0  # as the 2-D scanner: the gland near mid-grey


@dataclass
class SweepCase:
    """A simulated case with its sweep; see the module docstring for the frames."""

    seed: int
    trus: Volume  # float32 [0, 1], voxel_to_world: voxel -> Reference mm
    trus_labels: Volume  # uint8 0 background, 1 gland, 2 lesion, on the TRUS grid
    coverage: Volume  # uint8 1 where the sweep reached
    mri: Volume  # the patient's MRI, voxel -> MRI mm
    mri_labels: Volume  # uint8 0/1/2 on the MRI grid
    reference_to_mri_true: np.ndarray  # (4, 4) Reference mm -> MRI mm
    reference_to_mri_initial: np.ndarray  # (4, 4) off by the requested misalignment


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def rigid_about(centre: np.ndarray, rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """(4, 4): x -> R (x - c) + c + t (a rotation about ``centre``, then a shift)."""
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre - rotation @ centre + shift
    return out


def misalignment(rng: np.random.Generator, centre: np.ndarray, mm: float, deg: float
                 ) -> np.ndarray:
    """A rigid error of exactly ``deg`` degrees about a random axis through ``centre`` and a shift
    of exactly ``mm`` in a random direction (MRI mm -> MRI mm)."""
    axis = rng.standard_normal(3)
    direction = rng.standard_normal(3)
    shift = mm * direction / np.linalg.norm(direction)
    return rigid_about(centre, _rotation(axis, np.deg2rad(deg)), shift)


class _Geometry:
    """Cylinder coordinates about the probe axis and the tissue deformation, in MRI mm."""

    def __init__(self, axis: ProbeAxis, rng: np.random.Generator, phantom: Phantom) -> None:
        self.axis = axis
        self.frame = np.stack([axis.lateral, axis.anterior, axis.direction])  # rows
        self.z_range = (axis.apex_mm - 10.0, axis.base_mm + 10.0)
        self.pressure_mm = float(rng.uniform(1.5, 3.5))
        self.decay_mm = float(rng.uniform(8.0, 14.0))
        # Smooth random displacement: three fields on the phantom grid, scaled to DEFORM_MM.
        shape = phantom.tissue.data.shape
        field = np.stack([smooth_noise(rng, shape, 3) for _ in range(3)])
        self.random_field = field * (DEFORM_MM / max(float(np.abs(field).max()), 1e-6))
        self.field_to_voxel = spatial.invert(phantom.tissue.voxel_to_world)

    def cylinder(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) MRI mm -> (N, 3) (rho mm from the axis, phi rad from anterior, z mm along)."""
        local = (x - self.axis.origin) @ self.frame.T
        return np.stack([np.hypot(local[:, 0], local[:, 1]),
                         np.arctan2(local[:, 0], local[:, 1]), local[:, 2]], -1)

    def source(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) MRI mm where the TRUS shows tissue -> where that tissue is in the MRI."""
        local = (x - self.axis.origin) @ self.frame.T
        rho = np.hypot(local[:, 0], local[:, 1])
        radial = np.zeros_like(x)
        safe = np.maximum(rho, 1e-6)
        radial[:] = (local[:, :1] / safe[:, None]) * self.frame[0] \
            + (local[:, 1:2] / safe[:, None]) * self.frame[1]
        push = self.pressure_mm * np.exp(-np.maximum(rho - PROBE_RADIUS_MM, 0.0) / self.decay_mm)
        vox = x @ self.field_to_voxel[:3, :3].T + self.field_to_voxel[:3, 3]
        rand = _sample(self.random_field, vox, "bilinear").T
        return x - push[:, None] * radial + rand


def _sample(data: np.ndarray, voxels: np.ndarray, mode: str) -> np.ndarray:
    """Sample (C, I, J, K) or (I, J, K) at (N, 3) voxels (zero outside): (C, N) or (N,)."""
    squeeze = data.ndim == 3
    arr = data[None] if squeeze else data
    src = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 2, 1)).astype(np.float32))
    norm = spatial.index_to_normalised(arr.shape[1:])
    grid = voxels @ norm[:3, :3].T + norm[:3, 3]
    g = torch.from_numpy(grid.astype(np.float32)).reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(src[None], g, mode=mode, padding_mode="zeros", align_corners=False)
    out = out[0, :, 0, 0].numpy()
    return out[0] if squeeze else out


def _trus_grid(geo: _Geometry, mri_to_reference: np.ndarray, spacing_mm: float):
    """Axis-aligned Reference grid around the swept wedge."""
    from regseg.reconstruct import grid_around

    rho = np.array([PROBE_RADIUS_MM, PROBE_RADIUS_MM + DEPTH_MM])
    phi = np.deg2rad(np.linspace(-HALF_ANGLE_DEG, HALF_ANGLE_DEG, 9))
    z = np.array(geo.z_range)
    r, p, zz = (a.ravel() for a in np.meshgrid(rho, phi, z, indexing="ij"))
    local = np.stack([r * np.sin(p), r * np.cos(p), zz], -1)
    corners = local @ geo.frame + geo.axis.origin
    corners = corners @ mri_to_reference[:3, :3].T + mri_to_reference[:3, 3]
    return grid_around(corners, spacing_mm, margin_mm=0.0)


def _render_volume(phantom: Phantom, geo: _Geometry, rng: np.random.Generator,
                   points_mri: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """B-mode in cylinder coordinates, scan-converted to ``points_mri`` (N, 3): (grey, covered)."""
    step = 0.5 * spacing_mm
    n_rho = int(np.ceil(DEPTH_MM / step))
    z0, z1 = geo.z_range
    n_z = int(np.ceil((z1 - z0) / spacing_mm)) + 1
    half = np.deg2rad(HALF_ANGLE_DEG)
    n_phi = int(np.ceil(2 * half * (PROBE_RADIUS_MM + DEPTH_MM) / spacing_mm)) + 1
    rho = PROBE_RADIUS_MM + (np.arange(n_rho) + 0.5) * step
    phi = np.linspace(-half, half, n_phi)
    z = np.linspace(z0, z1, n_z)
    r, p, zz = np.meshgrid(rho, phi, z, indexing="ij")
    local = np.stack([r * np.sin(p), r * np.cos(p), zz], -1).reshape(-1, 3)
    x = local @ geo.frame + geo.axis.origin
    props = bmode.tissue_properties(phantom.tissue.data, np.random.default_rng([phantom.seed, 7]))
    w2v = spatial.invert(phantom.tissue.voxel_to_world)
    src = geo.source(x)
    echo, atten = _sample(props, src @ w2v[:3, :3].T + w2v[:3, 3], "bilinear")
    # Outside the phantom's field of view: soft tissue.
    outside = echo == 0
    echo[outside] = 10.0 ** (bmode.ECHO_DB[0] / 20.0)
    atten[outside] = bmode.ATTENUATION_DB_PER_MM[0]
    echo = torch.from_numpy(echo.reshape(n_rho, n_phi, n_z))
    atten = torch.from_numpy(atten.reshape(n_rho, n_phi, n_z))
    depth = torch.from_numpy((rho - PROBE_RADIUS_MM).astype(np.float32))[:, None, None]
    lost = torch.cumsum(atten, 0) - 0.5 * atten
    gain = torch.pow(10.0, (GAIN_DB + bmode.NOMINAL_ATTENUATION_DB_PER_MM * depth
                            - lost * step) / 20.0)
    scat = torch.from_numpy(rng.standard_normal((2, n_rho, n_phi, n_z), dtype=np.float32))
    iq = scat * (echo * gain)
    psf = bmode.psf_kernels(0.6, 1.0)
    iq = bmode.convolve_along(bmode.convolve_along(iq, psf[0], 1), psf[1], 2)
    iq.add_(torch.from_numpy(rng.standard_normal(iq.shape, dtype=np.float32)),
            alpha=10.0 ** (-47.0 / 20.0))
    env_db = 10.0 * torch.log10(iq.square().sum(0) + 1e-12)
    grey = ((env_db + DYNAMIC_RANGE_DB) / DYNAMIC_RANGE_DB).clamp(0.0, 1.0)
    # Scan conversion: every output point's cylinder coordinates -> fractional polar indices.
    cyl = geo.cylinder(points_mri)
    idx = np.stack([(cyl[:, 0] - PROBE_RADIUS_MM) / step - 0.5,
                    (cyl[:, 1] + half) / (2 * half) * (n_phi - 1),
                    (cyl[:, 2] - z0) / (z1 - z0) * (n_z - 1)], -1)
    size = (n_rho, n_phi, n_z)
    covered = np.all((idx >= 0) & (idx <= np.asarray(size) - 1), axis=1)
    out = _sample(grey.numpy(), idx, "bilinear")
    return np.where(covered, out, 0.0).astype(np.float32), covered


def _render_frames(phantom: Phantom, geo: _Geometry, reference_to_mri: np.ndarray,
                   grid, n_frames: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sagittal fan sweep through the scanner, compounded: (grey, labels, coverage)."""
    from regseg.reconstruct import VolumeReconstructor
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner

    config = ScannerConfig(frame_hw=(160, 160), pixel_mm=0.4, tracking_rot_deg=0.0,
                           tracking_shift_mm=0.0, tracking_scale=0.0, out_of_plane_mm=0.0,
                           sweep_frames=2 * n_frames, sweep_angle_deg=HALF_ANGLE_DEG,
                           n_depth=160, n_beams=128)
    scanner = SimulatedScanner(phantom, config, seed=seed)
    mri_to_reference = spatial.invert(reference_to_mri)
    image = VolumeReconstructor(grid, "linear")
    onehot = [VolumeReconstructor(grid, "linear") for _ in range(3)]
    # The first quarter of the sagittal sweep goes 0 -> +max, the next half +max -> -max: take
    # frames from a quarter to three quarters, one pass across the gland.
    for index in np.linspace(n_frames // 2, n_frames // 2 + n_frames - 1, n_frames).astype(int):
        frame = scanner.frame(int(index))
        pose = mri_to_reference @ frame.image_to_reference
        image.add(frame.pixels.astype(np.float32) / 255.0, pose, scanner.sector_mask)
        for c, recon in enumerate(onehot):
            recon.add((frame.truth.labels == c).astype(np.float32), pose, scanner.sector_mask)
    grey, coverage = image.result(fill_holes=3)
    probs = np.stack([r.result(fill_holes=3)[0] for r in onehot])
    labels = np.where(coverage > 0, probs.argmax(0), BACKGROUND).astype(np.uint8)
    return grey, labels, (coverage > 0).astype(np.uint8)


def make_sweep_case(seed: int, *, spacing_mm: float = 1.0, misalign_mm: float = 10.0,
                    misalign_deg: float = 10.0, render: str = "volume",
                    reference_is_mri: bool = False, n_frames: int = 60) -> SweepCase:
    """Simulate case ``seed`` and its sweep (deterministic per seed and arguments).

    Args:
        spacing_mm: the TRUS grid's voxel size (the MRI is 1 mm isotropic).
        misalign_mm, misalign_deg: how far ``reference_to_mri_initial`` is from the truth: a
            rotation of exactly that many degrees about the gland centre and a shift of exactly
            that many mm (random axis and direction).
        render: ``volume`` (fast direct 3-D) or ``frames`` (2-D scanner frames, reconstructed).
        reference_is_mri: the tracker's Reference is the MRI frame (true ReferenceToMRI =
            identity, as the live simulator ``sim://`` has it); otherwise a random rigid map.
        n_frames: frames of the sweep with ``render="frames"``.
    """
    if render not in RENDERS:
        raise ValueError(f"render {render!r}: one of {RENDERS} expected")
    rng = np.random.default_rng([seed, 11])
    phantom = make_phantom(seed, spacing_mm=1.0)
    axis = find_probe_axis(phantom)
    geo = _Geometry(axis, rng, phantom)
    gland = np.argwhere(phantom.labels.data != BACKGROUND)
    v2w = phantom.labels.voxel_to_world
    centre = (gland @ v2w[:3, :3].T + v2w[:3, 3]).mean(0)
    if reference_is_mri:
        reference_to_mri = np.eye(4)
    else:
        reference_to_mri = rigid_about(centre, _rotation(rng.standard_normal(3),
                                                         np.deg2rad(rng.uniform(0, 20))),
                                       rng.uniform(-20, 20, 3))
    initial = misalignment(rng, centre, misalign_mm, misalign_deg) @ reference_to_mri
    grid = _trus_grid(geo, spatial.invert(reference_to_mri), spacing_mm)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    points_ref = idx.reshape(-1, 3) @ grid.voxel_to_world[:3, :3].T + grid.voxel_to_world[:3, 3]
    points_mri = points_ref @ reference_to_mri[:3, :3].T + reference_to_mri[:3, 3]
    if render == "volume":
        grey, covered = _render_volume(phantom, geo, rng, points_mri, spacing_mm)
        src = geo.source(points_mri)
        w2v = spatial.invert(v2w)
        labels = _sample(phantom.labels.data.astype(np.float32), src @ w2v[:3, :3].T + w2v[:3, 3],
                         "nearest").astype(np.uint8).reshape(grid.shape)
        grey = grey.reshape(grid.shape)
        coverage = covered.reshape(grid.shape).astype(np.uint8)
    else:
        grey, labels, coverage = _render_frames(phantom, geo, reference_to_mri, grid, n_frames,
                                                seed)
    g2w = grid.voxel_to_world
    return SweepCase(
        seed=seed, trus=Volume(grey.astype(np.float32), g2w.copy()),
        trus_labels=Volume(labels, g2w.copy()), coverage=Volume(coverage, g2w.copy()),
        mri=replace(phantom.mri), mri_labels=replace(phantom.labels),
        reference_to_mri_true=reference_to_mri, reference_to_mri_initial=initial)


def true_correspondence(case: SweepCase, points_ref: np.ndarray) -> np.ndarray:
    """Where Reference points (N, 3) of the TRUS tissue are in the MRI, deformation included.

    Recomputed from the seed's geometry (cheap: no rendering)."""
    rng = np.random.default_rng([case.seed, 11])
    phantom = make_phantom(case.seed, spacing_mm=1.0)
    geo = _Geometry(find_probe_axis(phantom), rng, phantom)
    x = points_ref @ case.reference_to_mri_true[:3, :3].T + case.reference_to_mri_true[:3, 3]
    return geo.source(x)


def write_sweep_case(case: SweepCase, folder: str | Path) -> dict[str, str]:
    """Write the case as files: NIfTI volumes, transforms (.tfm ITK and .txt 4x4) and a JSON index.

    Returns:
        name -> path: ``trus``, ``trus_labels``, ``coverage``, ``mri``, ``mri_labels``,
        ``reference_to_mri_true_tfm``/``_txt``, ``reference_to_mri_initial_tfm``/``_txt``.
    """
    from regseg.calibration import transforms_io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for name in ("trus", "trus_labels", "coverage", "mri", "mri_labels"):
        path = folder / f"{name}.nii.gz"
        save_volume(getattr(case, name), path)
        paths[name] = str(path)
    for which in ("true", "initial"):
        matrix = getattr(case, f"reference_to_mri_{which}")
        for ext in ("tfm", "txt"):
            path = folder / f"reference_to_mri_{which}.{ext}"
            transforms_io.write_transform(path, matrix, from_name="Reference", to_name="MRI")
            paths[f"reference_to_mri_{which}_{ext}"] = str(path)
    (folder / "case.json").write_text(json.dumps({"seed": case.seed, **paths}, indent=1))
    return paths
