"""Where the simulated TRUS probe is: its axis in the rectum, the session's sweeps, tracking errors.

A biopsy-like session alternates sagittal fan sweeps (the probe turns about its long axis) with
transverse sweeps (the probe slides along it from apex to base and back). Poses vary smoothly with
the frame index inside each sweep; switching between the sagittal and transverse arrays of a
biplane probe is a jump, as on a real scanner. The tracking error (an in-plane affine plus a small
out-of-plane shift) is a per-session offset plus a slow drift, bounded by the configured scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regseg.sim.phantom import RECTAL_LUMEN, Phantom
from regseg.types import BACKGROUND

SAGITTAL, TRANSVERSE, ENDFIRE = "sagittal", "transverse", "endfire"
#: Probe arrays a session can use: a side-fire biplane probe (sagittal and transverse arrays) or
#: an end-fire probe (one array at the tip, its fan tilted forward from the probe axis).
ARRAYS = ("biplane", "endfire")


@dataclass(frozen=True)
class ProbeAxis:
    """The probe's long axis in the rectum and the gland's extent along it (all in MRI world mm)."""

    origin: np.ndarray  # (3,) on the rectal centreline, level with the gland's centre
    direction: np.ndarray  # (3,) unit, the probe's long axis, pointing superior (apex -> base)
    anterior: np.ndarray  # (3,) unit, perpendicular to direction, towards the gland
    lateral: np.ndarray  # (3,) unit, anterior x direction: towards the patient's right (+x)
    apex_mm: float  # gland extent along direction, measured from origin
    base_mm: float
    gland_anterior_mm: float = 25.0  # distance from the axis to the gland's centre


@dataclass(frozen=True)
class ProbePose:
    """One frame's probe pose, tracking error and tissue state, all as plain numbers."""

    mode: str  # SAGITTAL or TRANSVERSE: which array images
    angle_deg: float  # rotation about the probe axis (0 = imaging straight anterior)
    slide_mm: float  # position along the axis, from ProbeAxis.origin
    tilt_deg: tuple[float, float]  # pivot about the anal verge: (about lateral, about anterior)
    error_rot_deg: float  # tracking error: in-plane rotation about the image centre
    error_shift_mm: tuple[float, float]  # in-plane translation (column, row)
    error_scale: tuple[float, float]  # in-plane scale - 1 (column, row)
    error_normal_mm: float  # out-of-plane translation
    deform: tuple[float, ...]  # coefficients in [-1, 1] of the scanner's displacement modes
    pressure: float  # fraction in [0, 1] of the configured probe pressure
    beam_tilt_deg: float = 0.0  # ENDFIRE only: angle between the probe axis and the fan centre


def _rotate_about(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """3x3 rotation by ``angle_rad`` about unit vector ``axis`` (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def find_probe_axis(phantom: Phantom) -> ProbeAxis:
    """Fit the probe axis to the rectal lumen (principal axis of its voxels) and measure the gland.

    Raises:
        ValueError: if the phantom has no rectal lumen or no gland.
    """
    v2w = phantom.tissue.voxel_to_world
    lumen = np.argwhere(phantom.tissue.data == RECTAL_LUMEN) @ v2w[:3, :3].T + v2w[:3, 3]
    gland = np.argwhere(phantom.labels.data != BACKGROUND) @ v2w[:3, :3].T + v2w[:3, 3]
    if len(lumen) < 10 or len(gland) < 10:
        raise ValueError(f"phantom has {len(lumen)} rectal-lumen and {len(gland)} gland voxels; "
                         "a rectum and a prostate are needed to place the probe")
    centre = lumen.mean(0)
    direction = np.linalg.svd(lumen - centre, full_matrices=False)[2][0]
    direction = direction if direction[2] >= 0 else -direction
    along = (gland - centre) @ direction
    gland_centre = gland.mean(0)
    origin = centre + direction * float((gland_centre - centre) @ direction)
    anterior = gland_centre - origin
    anterior = anterior - direction * (anterior @ direction)
    anterior /= np.linalg.norm(anterior)
    offset = float((origin - centre) @ direction)
    apex_mm, base_mm = (float(v) - offset for v in np.percentile(along, [0.5, 99.5]))
    return ProbeAxis(origin=origin, direction=direction, anterior=anterior,
                     lateral=np.cross(anterior, direction), apex_mm=apex_mm, base_mm=base_mm,
                     gland_anterior_mm=float((gland_centre - origin) @ anterior))


def probe_plane(axis: ProbeAxis, pose: ProbePose, *, frame_hw: tuple[int, int], pixel_mm: float,
                apex_to_top_mm: float, pivot_mm: float = 45.0) -> np.ndarray:
    """True image plane of a pose: (4, 4) from pixel (i = column, j = row, k, 1) to world mm.

    The fan apex sits on the probe axis, ``apex_to_top_mm`` above the top-centre pixel; rows go
    away from the transducer. Sagittal columns run along the probe axis (towards the base),
    transverse columns across it (towards the patient's left, as radiological displays show).
    An end-fire fan has its apex on the axis at ``slide_mm`` (the probe tip) and its centre beam
    tilted ``beam_tilt_deg`` from the axis towards the (rotated) anterior direction.
    The third column is the plane normal times ``pixel_mm``, so k counts pixel-sized steps.

    Args:
        pivot_mm: distance below the gland's apex of the point the probe pivots about (the anal
            verge) when it tilts.
    """
    tilt = (_rotate_about(axis.lateral, np.deg2rad(pose.tilt_deg[0]))
            @ _rotate_about(axis.anterior, np.deg2rad(pose.tilt_deg[1])))
    d, a, lat = tilt @ axis.direction, tilt @ axis.anterior, tilt @ axis.lateral
    pivot_s = axis.apex_mm - pivot_mm
    point = axis.origin + pivot_s * axis.direction + (pose.slide_mm - pivot_s) * d
    theta = np.deg2rad(pose.angle_deg)
    v = np.cos(theta) * a + np.sin(theta) * lat
    if pose.mode == ENDFIRE:
        beta = np.deg2rad(pose.beam_tilt_deg)
        v, u = np.cos(beta) * d + np.sin(beta) * v, np.sin(beta) * d - np.cos(beta) * v
    else:
        u = d if pose.mode == SAGITTAL else -(np.cos(theta) * lat - np.sin(theta) * a)
    n = np.cross(u, v)
    centre_i = 0.5 * (frame_hw[1] - 1)
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2] = u * pixel_mm, v * pixel_mm, n * pixel_mm
    out[:3, 3] = point - centre_i * pixel_mm * u + apex_to_top_mm * v
    return out


def tracking_error(pose: ProbePose, frame_hw: tuple[int, int], pixel_mm: float) -> np.ndarray:
    """(4, 4) pixel-space error ``E``: ``image_to_reference = image_to_mri @ E``.

    In plane, ``E`` scales along the image axes and rotates about the image centre, then shifts;
    out of plane it shifts along k. The registration's job is to undo the in-plane part.
    """
    c = np.array([0.5 * (frame_hw[1] - 1), 0.5 * (frame_hw[0] - 1)])
    t = np.deg2rad(pose.error_rot_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    lin = rot @ np.diag([1.0 + pose.error_scale[0], 1.0 + pose.error_scale[1]])
    out = np.eye(4)
    out[:2, :2] = lin
    out[:2, 3] = c - lin @ c + np.asarray(pose.error_shift_mm) / pixel_mm
    out[2, 3] = pose.error_normal_mm / pixel_mm
    return out


class SessionPath:
    """The session's poses over time, fixed by a seed; see the module docstring.

    Args:
        axis: where the probe is.
        seed: the session.
        sweep_frames: frames per sagittal sweep and per transverse sweep; one cycle is both.
        sweep_angle_deg: largest sagittal rotation either side of anterior.
        errors: scales (rot_deg, shift_mm, scale, normal_mm) bounding the tracking error.
        n_modes: number of tissue-displacement modes whose coefficients the poses carry.
        array: one of :data:`ARRAYS`; an end-fire session rotates its one array about the axis.
        endfire_tilt_deg: (low, high) range of the end-fire fan's tilt from the probe axis.
    """

    def __init__(self, axis: ProbeAxis, seed: int, *, sweep_frames: int, sweep_angle_deg: float,
                 errors: tuple[float, float, float, float], n_modes: int,
                 array: str = "biplane",
                 endfire_tilt_deg: tuple[float, float] = (50.0, 65.0)) -> None:
        if array not in ARRAYS:
            raise ValueError(f"SessionPath: array {array!r}, expected one of {ARRAYS}")
        self.array, self.endfire_tilt_deg = array, endfire_tilt_deg
        self.axis, self.seed = axis, seed
        self.sweep_frames, self.sweep_angle_deg = sweep_frames, sweep_angle_deg
        self.errors, self.n_modes = errors, n_modes
        rng = np.random.default_rng([seed, 1])
        self._wobble_phase = rng.uniform(0, 2 * np.pi, 5)
        # Six error components (rot, shift i/j, scale i/j, normal): offset + 3 slow sinusoids
        # with weights summing to 1, so each stays within its scale.
        self._err_offset = rng.uniform(-1, 1, 6)
        self._err_weight = rng.dirichlet(np.ones(3), size=6)
        self._err_period = rng.uniform(300, 3000, (6, 3))
        self._err_phase = rng.uniform(0, 2 * np.pi, (6, 3))
        self._mode_period = rng.uniform(60, 300, n_modes)
        self._mode_phase = rng.uniform(0, 2 * np.pi, n_modes)
        self._pressure_period = rng.uniform(90, 240)
        self._pressure_phase = rng.uniform(0, 2 * np.pi)

    def _sweep_range(self) -> tuple[float, float]:
        # A little inside the gland's ends so that most transverse frames show prostate.
        return self.axis.apex_mm + 2.0, self.axis.base_mm - 2.0

    def _error_scaled(self, unit: np.ndarray) -> dict:
        rot, shift, scale, normal = self.errors
        return dict(error_rot_deg=float(rot * unit[0]),
                    error_shift_mm=(float(shift * unit[1]), float(shift * unit[2])),
                    error_scale=(float(scale * unit[3]), float(scale * unit[4])),
                    error_normal_mm=float(normal * unit[5]))

    def pose(self, index: int) -> ProbePose:
        """The pose of frame ``index`` (deterministic for the seed)."""
        t = float(index)
        cycle, step = divmod(index, 2 * self.sweep_frames)
        cyc = np.random.default_rng([self.seed, 2, cycle])  # each cycle sweeps a little differently
        amp, mid_jitter = cyc.uniform(0.85, 1.0) * self.sweep_angle_deg, cyc.uniform(-2.0, 2.0)
        ph = self._wobble_phase
        tilt = (np.sin(2 * np.pi * t / 157 + ph[0]), np.sin(2 * np.pi * t / 263 + ph[1]))  # deg
        lo, hi = self._sweep_range()
        if step < self.sweep_frames:
            mode, tau = SAGITTAL, step / self.sweep_frames
            angle = amp * np.sin(2 * np.pi * tau)
            slide = 0.5 * (lo + hi) + mid_jitter + 2.0 * np.sin(2 * np.pi * t / 211 + ph[2])
        else:
            mode, tau = TRANSVERSE, (step - self.sweep_frames) / self.sweep_frames
            angle = 4.0 * np.sin(2 * np.pi * t / 191 + ph[3])
            slide = lo + (hi - lo) * 0.5 * (1 - np.cos(2 * np.pi * tau))
        drift = (self._err_weight * np.sin(2 * np.pi * t / self._err_period + self._err_phase))
        unit = 0.5 * self._err_offset + 0.5 * drift.sum(1)
        deform = np.sin(2 * np.pi * t / self._mode_period + self._mode_phase)
        pressure = 0.8 + 0.2 * np.sin(2 * np.pi * t / self._pressure_period + self._pressure_phase)
        beta = 0.0
        if self.array == "endfire":  # one array: rotate it through the sweep, tilt it slowly
            lo_b, hi_b = self.endfire_tilt_deg
            beta = lo_b + (hi_b - lo_b) * 0.5 * (1 + np.sin(2 * np.pi * t / 173 + ph[4]))
            mode, slide = ENDFIRE, self._endfire_slide(beta) + 2.0 * np.sin(2 * np.pi * t / 211)
            angle = amp * np.sin(2 * np.pi * step / (2 * self.sweep_frames))
        return ProbePose(mode=mode, angle_deg=float(angle), slide_mm=float(slide),
                         beam_tilt_deg=float(beta),
                         tilt_deg=(float(tilt[0]), float(tilt[1])),
                         deform=tuple(float(c) for c in deform), pressure=float(pressure),
                         **self._error_scaled(unit))

    def _endfire_slide(self, beta_deg: float) -> float:
        """Tip position along the axis whose centre beam, tilted ``beta_deg``, hits the gland."""
        return -self.axis.gland_anterior_mm / np.tan(np.deg2rad(beta_deg))

    def random_pose(self, rng: np.random.Generator) -> ProbePose:
        """A pose drawn from the whole session's range, with independent random errors."""
        lo, hi = self._sweep_range()
        beta = 0.0
        if self.array == "endfire":
            mode, beta = ENDFIRE, rng.uniform(*self.endfire_tilt_deg)
            angle = rng.uniform(-self.sweep_angle_deg, self.sweep_angle_deg)
            slide = self._endfire_slide(beta) + rng.uniform(-4.0, 4.0)
        elif rng.random() < 0.5:
            mode = SAGITTAL
            angle = rng.uniform(-self.sweep_angle_deg, self.sweep_angle_deg)
            slide = 0.5 * (lo + hi) + rng.uniform(-4.0, 4.0)
        else:
            mode, angle, slide = TRANSVERSE, rng.uniform(-4.0, 4.0), rng.uniform(lo, hi)
        tilt = rng.uniform(-1.0, 1.0, 2)
        return ProbePose(mode=mode, angle_deg=float(angle), slide_mm=float(slide),
                         beam_tilt_deg=float(beta),
                         tilt_deg=(float(tilt[0]), float(tilt[1])),
                         deform=tuple(float(c) for c in rng.uniform(-1, 1, self.n_modes)),
                         pressure=float(rng.uniform(0.6, 1.0)),
                         **self._error_scaled(rng.uniform(-1, 1, 6)))
