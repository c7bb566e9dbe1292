"""Family B session: a tracked TRUS probe sweeping a case, with a tracking error of set magnitude.

The probe rolls about its axis in the rectum (and slides and levers a little), imaging the gland.
Each frame's tracked pose carries an in-plane rigid error of exactly ``tracking_shift_mm`` and
``tracking_rot_deg`` (direction and rotation centre fixed per session, slowly drifting), plus a
small out-of-plane error; the tissue is indented by the probe (pressure varies over time) and
moved by smooth Gaussian bulges. Frames look like family A's: ``Frame.image_to_reference`` maps
pixel (i, j, 0, 1) to Reference mm, Reference = MRI world, and ``truth`` carries the true plane
and the true labels on the frame. Deterministic per (case, config, seed, index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import clock
from regseg.errors import InputError
from regseg.sim.family_b.anatomy import Case, make_case
from regseg.sim.family_b.probe import ENDFIRE, SIDEFIRE, draw_geometry, make_beams
from regseg.sim.family_b.render import BmodeRenderer, draw_settings, sample_step_mm
from regseg.spatial import index_to_normalised, invert
from regseg.types import Frame, GroundTruth


@dataclass(frozen=True)
class SessionConfig:
    """Session settings. ``probe``: "endfire", "sidefire" or "mixed" (seed picks; 2/3 end-fire)."""

    probe: str = "mixed"
    tracking_shift_mm: float = 0.0  # in-plane translation error, exact magnitude
    tracking_rot_deg: float = 0.0  # in-plane rotation error, exact magnitude
    out_of_plane_mm: float = 0.5  # bound on the shift along the plane normal
    tilt_deg: float = 0.5  # bound on the out-of-plane rotation
    pressure_mm: float = 3.0  # indentation at the probe face
    pressure_range_mm: float = 8.0  # depth scale of the indentation
    bulge_mm: float = 1.2  # bound on each of the two smooth tissue bulges
    fps: float = 20.0

    def __post_init__(self) -> None:
        if self.probe not in (ENDFIRE, SIDEFIRE, "mixed"):
            raise InputError(f"SessionConfig.probe={self.probe!r}: 'endfire', 'sidefire' or "
                             "'mixed' expected")
        for name in ("tracking_shift_mm", "tracking_rot_deg", "out_of_plane_mm", "tilt_deg",
                     "pressure_mm", "bulge_mm"):
            if not getattr(self, name) >= 0:
                raise InputError(f"SessionConfig.{name}={getattr(self, name)}: >= 0 expected")
        if self.fps <= 0 or self.pressure_range_mm <= 0:
            raise InputError(f"SessionConfig: fps={self.fps}, pressure_range_mm="
                             f"{self.pressure_range_mm}: > 0 expected")


def tracking_error_matrix(shift_mm: float, rot_deg: float, *, direction_rad: float,
                          centre_ij: np.ndarray, pixel_mm: float, normal_mm: float = 0.0,
                          tilt_deg: float = 0.0) -> np.ndarray:
    """(4, 4) rigid pixel-space tracking error ``E`` (``image_to_reference = true @ E``).

    In plane: a rotation by ``rot_deg`` about ``centre_ij`` and a shift of ``shift_mm`` along
    ``direction_rad``; out of plane: a tilt of the rows into the normal about the row through
    the centre and a shift of ``normal_mm`` along the normal. Square pixels of ``pixel_mm``.
    """
    rot, tilt = np.deg2rad(rot_deg), np.deg2rad(tilt_deg)
    e = np.eye(4)
    e[:2, :2] = [[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]]
    tilt_m = np.eye(4)
    tilt_m[1:3, 1:3] = [[np.cos(tilt), -np.sin(tilt)], [np.sin(tilt), np.cos(tilt)]]
    to_c, from_c = np.eye(4), np.eye(4)
    to_c[:2, 3], from_c[:2, 3] = centre_ij, -np.asarray(centre_ij)
    shift = np.eye(4)
    shift[:2, 3] = shift_mm / pixel_mm * np.array([np.cos(direction_rad), np.sin(direction_rad)])
    shift[2, 3] = normal_mm / pixel_mm
    return shift @ to_c @ e @ tilt_m @ from_c


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


class Session:
    """Frames of one tracked family-B session over ``case``.

    Args:
        case: the anatomy (:func:`regseg.sim.family_b.anatomy.make_case`), or a seed to make it.
        config: session settings.
        seed: the session (probe, scanner settings, trajectory, error direction, speckle).
    """

    def __init__(self, case: Case | int, config: SessionConfig = SessionConfig(),
                 seed: int = 0, device: str = "cpu") -> None:
        self.case = make_case(case) if isinstance(case, int) else case
        self.config, self.seed = config, int(seed)
        self.clock_origin_s = clock.wall_s()  # the scanner's clock (s since 1970) at frame 0
        rng = np.random.default_rng([self.seed, 0xB5])
        kind = config.probe if config.probe != "mixed" else (
            ENDFIRE if rng.random() < 2 / 3 else SIDEFIRE)
        self.geometry = draw_geometry(rng, kind)
        self.settings = draw_settings(rng)
        self.beams = make_beams(self.geometry, sample_step_mm(self.settings), device)
        self.renderer = BmodeRenderer(self.case, self.beams, self.settings, seed=self.seed)
        self.device = device
        c = self.case
        # Trajectory parameters: roll sweep, slide and lever wobble.
        self._roll = (rng.uniform(25, 40), rng.uniform(150, 300), rng.uniform(0, 2 * np.pi))
        self._slide = (rng.uniform(2, 5), rng.uniform(90, 200), rng.uniform(0, 2 * np.pi))
        self._lever = (rng.uniform(2, 5), rng.uniform(60, 160), rng.uniform(0, 2 * np.pi))
        self._z_probe = (c.gland_centre[2] - c.gland_axes_mm[2] * rng.uniform(0.8, 1.2) - 5.0
                         if kind == ENDFIRE else c.gland_centre[2] + rng.uniform(-3, 3))
        # Tracking error: fixed in-plane direction, rotation sign and centre; slow drift.
        h, w = self.geometry.frame_hw
        self._err_dir = rng.uniform(0, 2 * np.pi)
        self._err_sign = rng.choice([-1.0, 1.0])
        self._err_centre = np.array([w, h]) * (0.5 + rng.uniform(-0.15, 0.15, 2))
        self._err_drift = rng.uniform(0, 2 * np.pi, 3)
        # Tissue motion: two Gaussian bulges in frame pixels, and the pressure cycle.
        px = self.geometry.pixel_mm
        self._bulge_c = np.stack([rng.uniform(0.2, 0.8, 2) * [w, h] for _ in range(2)])
        self._bulge_s = rng.uniform(8, 15, 2) / px
        ang = rng.uniform(0, 2 * np.pi, 2)
        self._bulge_v = np.stack([np.cos(ang), np.sin(ang)], -1) * rng.uniform(0.5, 1.0, (2, 1))
        self._bulge_t = (rng.uniform(40, 120, 2), rng.uniform(0, 2 * np.pi, 2))
        self._press_t = (rng.uniform(60, 200), rng.uniform(0, 2 * np.pi))
        self._labels = torch.as_tensor(c.truth_labels.data.transpose(2, 1, 0).astype(np.float32),
                                       device=device)[None, None]
        self._labels_w2n = index_to_normalised(c.truth_labels.data.shape) @ invert(
            c.truth_labels.voxel_to_world)
        b = self.beams
        h, w = self.geometry.frame_hw
        jj, ii = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                torch.arange(w, dtype=torch.float32, device=device),
                                indexing="ij")
        self._pixels_ij = torch.stack([ii, jj], -1)
        self._pixel_maps = self._motion_maps(self._pixels_ij, b.pixel_radial_ij,
                                             b.pixel_depth_mm)
        self._beam_maps = self._motion_maps(b.coarse_rows(b.sample_ij), b.coarse_rows(b.radial_ij),
                                            b.coarse_rows(b.depth_mm)[:, None].expand(
                                                -1, b.sample_ij.shape[1]))

    # ------------------------------------------------------------------ geometry
    def true_plane(self, index: int) -> np.ndarray:
        """(4, 4) true frame pixel (i, j, 0) -> MRI world mm of frame ``index``."""
        t, geo, rect = float(index), self.geometry, self.case.rectum
        roll = np.deg2rad(self._roll[0] * np.sin(2 * np.pi * t / self._roll[1] + self._roll[2]))
        slide = self._slide[0] * np.sin(2 * np.pi * t / self._slide[1] + self._slide[2])
        z = self._z_probe + slide
        axis = rect.tangent(z)
        anterior = _unit(np.array([0.0, 1.0, 0.0]) - axis[1] * axis)
        lateral = np.cross(anterior, axis)
        roll_dir = np.cos(roll) * anterior + np.sin(roll) * lateral
        px = geo.pixel_mm
        out = np.eye(4)
        if geo.kind == ENDFIRE:
            tip = rect.point(z)
            to_gland = _unit(self.case.gland_centre - tip)
            beta = np.arccos(np.clip(to_gland @ axis, -1, 1)) + np.deg2rad(
                self._lever[0] * np.sin(2 * np.pi * t / self._lever[1] + self._lever[2]))
            fan = np.cos(beta) * axis + np.sin(beta) * roll_dir  # rows
            cols = _unit(axis - (axis @ fan) * fan)
            out[:3, 0], out[:3, 1], out[:3, 2] = cols * px, fan * px, np.cross(cols, fan) * px
            out[:3, 3] = tip - geo.centre_i * px * cols - geo.apex_j * px * fan
        else:
            face = rect.point(z) + (rect.lumen_mm - 0.5) * roll_dir
            out[:3, 0], out[:3, 1] = axis * px, roll_dir * px
            out[:3, 2] = np.cross(axis, roll_dir) * px
            out[:3, 3] = face - geo.centre_i * px * axis - geo.top_mm * roll_dir
        return out

    def tracking_error(self, index: int) -> np.ndarray:
        """(4, 4) pixel-space error ``E``: ``image_to_reference = true_plane @ E``."""
        cfg, t, d = self.config, float(index), self._err_drift
        return tracking_error_matrix(
            cfg.tracking_shift_mm, self._err_sign * cfg.tracking_rot_deg,
            direction_rad=self._err_dir + 0.3 * np.sin(2 * np.pi * t / 400 + d[0]),
            centre_ij=self._err_centre, pixel_mm=self.geometry.pixel_mm,
            normal_mm=cfg.out_of_plane_mm * np.sin(2 * np.pi * t / 500 + d[2]),
            tilt_deg=cfg.tilt_deg * np.sin(2 * np.pi * t / 350 + d[1]))

    def _motion_maps(self, points_ij: Tensor, radial_ij: Tensor,
                     depth_mm: Tensor) -> tuple[Tensor, Tensor]:
        """Static parts of the tissue motion at some in-plane points (..., 2): the indentation
        direction and profile (..., 2), and the two bulges' Gaussian weights (2, ...)."""
        push = radial_ij / (1.0 + (depth_mm.clamp_min(0) / self.config.pressure_range_mm)
                            ** 2)[..., None]
        c = torch.as_tensor(self._bulge_c, dtype=torch.float32, device=points_ij.device)
        s2 = torch.as_tensor(self._bulge_s ** 2, dtype=torch.float32, device=points_ij.device)
        r2 = ((points_ij[None] - c.reshape(2, *[1] * (points_ij.ndim - 1), 2)) ** 2).sum(-1)
        return push, torch.exp(-0.5 * r2 / s2.reshape(2, *[1] * (r2.ndim - 1)))

    def displacement(self, index: int, maps: tuple[Tensor, Tensor]) -> Tensor:
        """Sampling displacement (pixels, (..., 2)) of frame ``index`` at points whose
        :meth:`_motion_maps` are ``maps``: probe indentation plus the bulges."""
        cfg, px, t = self.config, self.geometry.pixel_mm, float(index)
        push, bulges = maps
        press = cfg.pressure_mm * (0.6 + 0.4 * np.sin(2 * np.pi * t / self._press_t[0]
                                                      + self._press_t[1]))
        period, phase = self._bulge_t
        coef = cfg.bulge_mm / px * np.sin(2 * np.pi * t / period + phase)  # (2,)
        v = torch.as_tensor(self._bulge_v * coef[:, None], dtype=torch.float32,
                            device=push.device)  # (2, 2)
        out = -(press / px) * push
        for k in range(2):
            out = out + bulges[k][..., None] * v[k]
        return out

    # ------------------------------------------------------------------ frames
    def truth_labels(self, index: int, plane: np.ndarray,
                     displacement: Tensor | None = None) -> np.ndarray:
        """(H, W) uint8 true labels: the fine label volume at ``plane(p + displacement(p))``
        (``displacement``: the frame pixels' (H, W, 2), default computed here)."""
        if displacement is None:
            displacement = self.displacement(index, self._pixel_maps)
        pts = self._pixels_ij + displacement
        m = torch.as_tensor(self._labels_w2n @ plane, dtype=torch.float32, device=self.device)
        grid = pts[..., :1] * m[:3, 0] + pts[..., 1:] * m[:3, 1] + m[:3, 3]
        lab = F.grid_sample(self._labels, grid[None, None], mode="nearest", padding_mode="zeros",
                            align_corners=False)[0, 0, 0]
        return lab.to(torch.uint8).cpu().numpy()

    def frame(self, index: int) -> Frame:
        """Frame ``index`` of the session, with its ground truth."""
        if index < 0:
            raise InputError(f"Session.frame({index}): frame indices start at 0")
        plane = self.true_plane(index)
        ddf = self.displacement(index, self._beam_maps)
        noise_seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        pixels = self.renderer.render(plane, ddf, noise_seed).cpu().numpy()
        px = self.geometry.pixel_mm
        motion = self.displacement(index, self._pixel_maps)
        return Frame(seq=index, acquired_ns=clock.now_ns(), pixels=pixels, spacing_mm=(px, px),
                     image_to_reference=plane @ self.tracking_error(index),
                     source_ts=self.clock_origin_s + index / self.config.fps,
                     truth=GroundTruth(image_to_mri=plane,
                                       labels=self.truth_labels(index, plane, motion),
                                       displacement_px=motion.float().cpu().numpy()))
