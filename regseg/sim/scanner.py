"""Simulated tracked TRUS scanner: B-mode frames of a phantom with their ground truth, for the demo
and for training.

Each frame images the phantom on the true plane of a biopsy-like session (see
:mod:`regseg.sim.probe_path`), through a smooth in-plane tissue displacement and probe-pressure
compression, and reports a tracked plane that carries a bounded tracking error. The simulator's
reference frame is the MRI world: ``reference_to_mri`` is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import clock, spatial
from regseg.sim import bmode
from regseg.sim.phantom import Phantom, random_rotation
from regseg.sim.probe_path import (
    ProbePose,
    SessionPath,
    find_probe_axis,
    probe_plane,
    tracking_error,
)
from regseg.sim.volume_atlas import build_atlas, sample_atlas
from regseg.types import Frame, GroundTruth


@dataclass(frozen=True)
class ScannerConfig:
    """Probe, session and rendering settings. Lengths in mm, angles in degrees."""

    frame_hw: tuple[int, int] = (256, 256)
    pixel_mm: float = 0.2  # square pixels -> 51 mm field of view
    fps: float = 30.0
    tracking_rot_deg: float = 6.0  # bound on the in-plane rotation error
    tracking_shift_mm: float = 4.0  # bound on each in-plane translation error component
    tracking_scale: float = 0.04  # bound on each in-plane scale error (affine residual)
    out_of_plane_mm: float = 0.5  # bound on the out-of-plane shift (2-D registration can't undo)
    deform_mm: float = 1.5  # bound on the smooth random tissue displacement
    deform_modes: int = 4  # random low-frequency modes that make up that displacement
    deform_wavelength_mm: tuple[float, float] = (25.0, 60.0)
    pressure_mm: float = 2.5  # tissue displacement at the transducer face
    pressure_decay_mm: float = 10.0  # depth over which the pressure displacement falls by 1/e
    probe_radius_mm: float = 11.0  # fan apex to transducer face; the apex is on the probe axis
    face_row_mm: float = 3.0  # depth of the transducer face's centre below the top row
    sector_half_angle_deg: float = 42.0
    sweep_frames: int = 300  # frames per sagittal and per transverse sweep
    sweep_angle_deg: float = 35.0  # sagittal sweep, either side of anterior
    n_depth: int = 256  # polar samples along each beam
    n_beams: int = 192
    axial_psf_mm: float = 0.15  # PSF standard deviation along the beam
    lateral_psf_beams: float = 2.0  # PSF standard deviation across beams
    shadow_scale: float = 1.0  # calcification attenuation multiplier (0 = no shadows)
    gain_db: float = -14.0  # puts the gland at mid-grey
    dynamic_range_db: float = 50.0
    noise_db: float = -47.0  # electronic noise re. the top of the grey scale
    scatterer_mm: float = 0.25  # voxel size of the scatterer texture
    # Texture size per axis: it tiles space every size * voxel mm (16 mm), at an oblique angle so
    # that no plane shows the repeat. Small enough to stay in cache: the scatterer lookup is the
    # costliest step of a frame on CPU.
    scatterer_voxels: int = 64
    noise_frames: int = 8  # precomputed electronic-noise fields, cycled through
    # Domain randomisation (regseg.sim.randomise draws these; the defaults are the demo scanner).
    array: str = "biplane"  # or "endfire" (regseg.sim.probe_path.ARRAYS)
    endfire_tilt_deg: tuple[float, float] = (50.0, 65.0)  # end-fire fan tilt from the probe axis
    linear_width_mm: float = 0.0  # > 0: a linear array of that width instead of a convex sector
    tgc_slope_db_per_mm: float = 0.0  # time-gain compensation error (far field darker/brighter)
    echo_offsets_db: tuple[tuple[int, float], ...] = ()  # (tissue class, dB) echogenicity shifts
    texture_scale: float = 1.0  # multiplies the per-tissue echo heterogeneity
    speckle_shape: float = 0.0  # 0: dense scatterers (Rayleigh); > 0: gamma density, K-speckle
    reverb_amplitude: float = 0.0  # near-field reverberation echo amplitude (0 = none)
    reverb_period_mm: float = 4.0  # spacing of the reverberation echoes
    needle_prob: float = 0.0  # chance that a frame shows a biopsy needle (bright line + shadow)


class SimulatedScanner:
    """Frames of a tracked TRUS session over a phantom, deterministic per (phantom, config, seed).

    Args:
        phantom: the case to image.
        config: probe, session and rendering settings.
        seed: the session (trajectory, tracking error, tissue motion, speckle noise).
        device: torch device the rendering runs on.

    Attributes:
        sector_mask: (H, W) bool numpy array, True inside the fan (pixels outside are always 0).
        axis: the fitted probe axis (:class:`regseg.sim.probe_path.ProbeAxis`).
    """

    def __init__(self, phantom: Phantom, config: ScannerConfig = ScannerConfig(), seed: int = 0,
                 device: str = "cpu") -> None:
        self.phantom, self.config, self.seed = phantom, config, seed
        self.device = torch.device(device)
        self.clock_origin_s = clock.wall_s()  # the simulated scanner's clock: frame 0's timestamp
        cfg = config
        self.axis = find_probe_axis(phantom)
        self.path = SessionPath(
            self.axis, seed, sweep_frames=cfg.sweep_frames, sweep_angle_deg=cfg.sweep_angle_deg,
            errors=(cfg.tracking_rot_deg, cfg.tracking_shift_mm, cfg.tracking_scale,
                    cfg.out_of_plane_mm), n_modes=cfg.deform_modes, array=cfg.array,
            endfire_tilt_deg=cfg.endfire_tilt_deg)
        if cfg.linear_width_mm > 0:
            self.geometry = bmode.linear_geometry(
                cfg.frame_hw, cfg.pixel_mm, cfg.linear_width_mm, cfg.face_row_mm, cfg.n_depth,
                cfg.n_beams, self.device)
        else:
            self.geometry = bmode.sector_geometry(
                cfg.frame_hw, cfg.pixel_mm, cfg.probe_radius_mm, cfg.face_row_mm,
                cfg.sector_half_angle_deg, cfg.n_depth, cfg.n_beams, self.device)
        self.sector_mask = self.geometry.mask.cpu().numpy()
        self.psf = bmode.psf_kernels(cfg.axial_psf_mm / self.geometry.sample_mm,
                                     cfg.lateral_psf_beams)

        # Volumes on the device, once. Properties depend on the phantom only, so a case looks
        # the same in every session; the scatterers are the session's.
        tissue = phantom.tissue
        self._world_to_voxel = spatial.invert(tissue.voxel_to_world)
        self._volume_size = tissue.data.shape  # (I, J, K) = (W, H, D) of the tensors
        props = bmode.tissue_properties(tissue.data, np.random.default_rng([phantom.seed, 7]),
                                        cfg.shadow_scale, cfg.echo_offsets_db, cfg.texture_scale)
        self._props = build_atlas(self._to_tensor(props)[0])
        self._labels = self._to_tensor(phantom.labels.data[None].astype(np.float32))
        rng = np.random.default_rng([seed, 3])
        n = cfg.scatterer_voxels
        scatterers = torch.from_numpy(rng.standard_normal((2, n, n, n), dtype=np.float32))
        if cfg.speckle_shape > 0:  # sparse scatterers: gamma-distributed local density
            density = np.random.default_rng([seed, 5]).gamma(
                cfg.speckle_shape, 1.0 / cfg.speckle_shape, (n, n, n)).astype(np.float32)
            scatterers *= torch.from_numpy(np.sqrt(density))
        self._scatterers = build_atlas(scatterers.to(self.device), wrap=True)
        texture_to_world = np.eye(4)
        texture_to_world[:3, :3] = random_rotation(rng) * cfg.scatterer_mm
        self._world_to_texture = spatial.invert(texture_to_world)
        self._modes_polar, self._modes_pixel = self._displacement_modes(rng)
        self._noise = torch.from_numpy(rng.standard_normal(
            (cfg.noise_frames, 2, cfg.n_depth, cfg.n_beams), dtype=np.float32)).to(self.device)

    def _to_tensor(self, data: np.ndarray) -> Tensor:
        """(C, I, J, K) numpy -> (1, C, K, J, I) tensor, the layout of the spatial module."""
        return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 2, 1)))[None].to(
            self.device)

    def _displacement_modes(self, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """Random plane-wave displacement modes at the polar samples and at the frame pixels.

        Mode m displaces by ``a_m cos(k_m . p + phi_m)`` (pixels); the ``|a_m|`` sum to
        ``deform_mm``, so any coefficients in [-1, 1] keep the displacement within it.
        """
        cfg = self.config
        m = cfg.deform_modes
        wavelength = rng.uniform(*cfg.deform_wavelength_mm, m) / cfg.pixel_mm
        direction = rng.uniform(0, 2 * np.pi, m)
        k = np.stack([np.cos(direction), np.sin(direction)], -1) * (2 * np.pi / wavelength)[:, None]
        phase = rng.uniform(0, 2 * np.pi, m)
        amp = rng.dirichlet(np.ones(m)) * cfg.deform_mm / cfg.pixel_mm
        angle = rng.uniform(0, 2 * np.pi, m)
        vec = torch.as_tensor(np.stack([np.cos(angle), np.sin(angle)], -1) * amp[:, None],
                              dtype=torch.float32, device=self.device)  # (M, 2)
        kt = torch.as_tensor(k, dtype=torch.float32, device=self.device)
        ph = torch.as_tensor(phase, dtype=torch.float32, device=self.device)

        def at(points: Tensor) -> Tensor:  # (..., 2) -> (M, ..., 2)
            wave = torch.cos(points @ kt.T + ph).movedim(-1, 0)
            return wave[..., None] * vec.reshape(m, *([1] * (points.ndim - 1)), 2)

        h, w = cfg.frame_hw
        jj, ii = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=self.device),
                                torch.arange(w, dtype=torch.float32, device=self.device),
                                indexing="ij")
        return at(self.geometry.beam_ij), at(torch.stack([ii, jj], -1))

    def _displacement(self, pose: ProbePose, modes: Tensor, radial: Tensor,
                      depth_mm: Tensor) -> Tensor:
        """Sampling displacement (pixels, (..., 2) as (di, dj)) of a pose at some points.

        Pressure pushes tissue away from the transducer, most at the face: what is seen at depth
        r came from about ``r - p exp(-r / decay)``, i.e. compressed near the probe.
        """
        cfg = self.config
        coef = torch.as_tensor(pose.deform, dtype=torch.float32, device=self.device)
        disp = (coef @ modes.reshape(modes.shape[0], -1)).reshape(modes.shape[1:])
        push = (cfg.pressure_mm * pose.pressure / cfg.pixel_mm) * torch.exp(
            -depth_mm / cfg.pressure_decay_mm)
        return disp - push[..., None] * radial

    def _map_points(self, pixel_to_target: np.ndarray, points: Tensor,
                    offset: bool = True) -> Tensor:
        """Map in-plane pixel points (..., 2) = (i, j) (k = 0) through a (4, 4) matrix to (..., 3).

        With ``offset=False`` it maps displacements (vectors) instead of points.
        """
        m = torch.as_tensor(pixel_to_target[:3], dtype=torch.float32, device=self.device)
        # Elementwise: a (N, 2) @ (2, 3) matmul is slow for so small an inner size.
        out = points[..., :1] * m[:, 0] + points[..., 1:] * m[:, 1]
        return out + m[:, 3] if offset else out

    def render(self, pose: ProbePose, index: int, noise_seed: int) -> Frame:
        """Image one pose. ``frame`` and ``random_frame`` both come here."""
        cfg, geo = self.config, self.geometry
        image_to_mri = probe_plane(self.axis, pose, frame_hw=cfg.frame_hw, pixel_mm=cfg.pixel_mm,
                                   apex_to_top_mm=cfg.probe_radius_mm - cfg.face_row_mm)
        image_to_reference = image_to_mri @ tracking_error(pose, cfg.frame_hw, cfg.pixel_mm)

        # Along the beams: tissue properties and scatterers at the displaced positions.
        points = geo.beam_ij + self._displacement(pose, self._modes_polar, geo.radial_ij,
                                                  geo.depth_mm[:, None])
        props = sample_atlas(self._props,
                             self._map_points(self._world_to_voxel @ image_to_mri, points))
        scat = sample_atlas(self._scatterers,
                            self._map_points(self._world_to_texture @ image_to_mri, points))
        noise = self._noise[noise_seed % cfg.noise_frames].roll(noise_seed // cfg.noise_frames
                                                                % cfg.n_beams, dims=-1)
        echo, atten = props[0], props[1]
        if cfg.needle_prob > 0:
            echo, atten = self._needle(echo, atten, np.random.default_rng([noise_seed, 9]))
        reverb = (cfg.reverb_amplitude, int(round(cfg.reverb_period_mm / geo.sample_mm)))
        pixels = bmode.render_bmode(echo, atten, scat, noise, geo, self.psf,
                                    gain_db=cfg.gain_db, dynamic_range_db=cfg.dynamic_range_db,
                                    noise_db=cfg.noise_db,
                                    tgc_slope_db_per_mm=cfg.tgc_slope_db_per_mm, reverb=reverb)

        # True labels on the frame pixels, through the same displacement.
        grid = spatial.plane_grid(self._volume_size, self._world_to_voxel, image_to_mri,
                                  cfg.frame_hw, device=self.device)
        disp = self._displacement(pose, self._modes_pixel, geo.pixel_radial_ij,
                                  geo.pixel_depth_mm)
        to_norm = spatial.index_to_normalised(self._volume_size) @ self._world_to_voxel
        grid = grid + self._map_points(to_norm @ image_to_mri, disp, offset=False)
        labels = F.grid_sample(self._labels, grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[0, 0, 0]
        return Frame(
            seq=index, acquired_ns=clock.now_ns(), pixels=pixels.cpu().numpy(),
            spacing_mm=(cfg.pixel_mm, cfg.pixel_mm), image_to_reference=image_to_reference,
            truth=GroundTruth(image_to_mri=image_to_mri,
                              labels=labels.to(torch.uint8).cpu().numpy(),
                              displacement_px=disp.float().cpu().numpy()))

    def _needle(self, echo: Tensor, atten: Tensor,
                rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """With chance ``needle_prob``, a biopsy needle: a bright, shadowing straight segment.

        It leaves the transducer face near the centre at up to 60 degrees from the beam axis;
        18 G (1.2 mm) wide, 15-60 mm long, echo +6..+14 dB re. the capsule.
        """
        cfg = self.config
        if rng.random() >= cfg.needle_prob:
            return echo, atten
        w = cfg.frame_hw[1]
        start = torch.tensor([0.5 * (w - 1) + rng.uniform(-0.3, 0.3) * w,
                              cfg.face_row_mm / cfg.pixel_mm], dtype=torch.float32,
                             device=self.device)
        phi = np.deg2rad(rng.uniform(-60.0, 60.0))
        direction = torch.tensor([np.sin(phi), np.cos(phi)], dtype=torch.float32,
                                 device=self.device)
        rel = (self.geometry.beam_ij - start) * cfg.pixel_mm  # mm
        along = rel @ direction
        across = (rel[..., 0] * direction[1] - rel[..., 1] * direction[0]).abs()
        hit = (across < 0.6) & (along >= 0) & (along <= rng.uniform(15.0, 60.0))
        bright = float(10.0 ** (rng.uniform(6.0, 14.0) / 20.0))
        return torch.where(hit, bright, echo), torch.where(hit, atten + 15.0, atten)

    def pose(self, index: int) -> ProbePose:
        """The session's pose at frame ``index``."""
        return self.path.pose(index)

    def frame(self, index: int) -> Frame:
        """Frame ``index`` of the session; the same for the same (phantom, config, seed, index),
        but for ``source_ts``: the scanner's clock, seconds since 1970 (``clock_origin_s`` +
        index / fps), as a real scanner stamps its frames."""
        frame = self.render(self.path.pose(index), index, noise_seed=_mix(self.seed, index))
        return replace(frame, source_ts=self.clock_origin_s + index / self.config.fps)

    def random_frame(self, rng: np.random.Generator) -> Frame:
        """A frame at a pose drawn from the whole session's range, with random errors and motion.

        For training: reproducible for a given ``rng`` state. ``seq`` is 0 and ``source_ts`` 0.
        """
        pose = self.path.random_pose(rng)
        return self.render(pose, 0, noise_seed=int(rng.integers(2**62)))


def _mix(seed: int, index: int) -> int:
    """A distinct, deterministic torch seed per (session seed, frame index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)

