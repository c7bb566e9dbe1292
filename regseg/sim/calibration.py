"""Simulated calibration sessions with ground truth: a pivoting stylus, a probe imaging an N-wire
phantom (B-mode), a probe bobbing over a water-bath bottom with a known clock lag, and landmark
pairs with localisation noise.

Frames follow PLUS: ``Tracker`` (the camera), ``Stylus``/``Probe`` (marker frames), ``Phantom``
(the N-wire phantom), ``Image`` in pixels (i = column, j = row). All lengths mm, times s.
Noise is stated where it is drawn: a tracked pose is the true pose turned by a random rotation of
``angle_deg`` RMS about its own origin and shifted by ``position_mm`` RMS (3-D), as an optical
tracker's marker jitter (NDI Polaris: about 0.25 mm RMS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from regseg.calibration.nwire import intersect_wires
from regseg.calibration.points import register_points
from regseg.sim import bmode

TRACKER_POSITION_MM = 0.25  # RMS, 3-D, per pose
TRACKER_ANGLE_DEG = 0.1  # RMS rotation per pose
FRAME_HW = (256, 256)
PIXEL_MM = 0.2


def jitter(pose: np.ndarray, rng: np.random.Generator, position_mm: float = TRACKER_POSITION_MM,
           angle_deg: float = TRACKER_ANGLE_DEG) -> np.ndarray:
    """``pose`` as a tracker reports it: turned about its origin and shifted by random errors
    (isotropic Gaussian, ``position_mm`` and ``angle_deg`` RMS)."""
    out = np.array(pose, dtype=np.float64)
    rotvec = rng.normal(0.0, np.radians(angle_deg) / np.sqrt(3), 3)
    out[:3, :3] = out[:3, :3] @ Rotation.from_rotvec(rotvec).as_matrix()
    out[:3, 3] += rng.normal(0.0, position_mm / np.sqrt(3), 3)
    return out


def _rigid(rotvec_deg, translation) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(np.radians(rotvec_deg)).as_matrix()
    m[:3, 3] = translation
    return m


# ---- pivot ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PivotSession:
    stylus_to_tracker: np.ndarray  # (N, 4, 4) as tracked (noisy, with outliers)
    tip_in_stylus: np.ndarray  # (3,) truth
    pivot_in_tracker: np.ndarray  # (3,) truth
    outliers: np.ndarray  # (N,) bool: poses where the tip slipped


def simulate_pivot(seed: int = 0, n_poses: int = 200, *, max_angle_deg: float = 30.0,
                   outlier_fraction: float = 0.05, slip_mm: float = 3.0,
                   position_mm: float = TRACKER_POSITION_MM,
                   angle_deg: float = TRACKER_ANGLE_DEG) -> PivotSession:
    """A stylus (tip 160 mm from its markers) pivoting in a divot up to ``max_angle_deg`` from
    upright, tracked with jitter; a fraction of poses has the tip slipped by ``slip_mm``."""
    rng = np.random.default_rng([seed, 11])
    tip = np.array([2.0, -1.5, -160.0]) + rng.normal(0, 1.0, 3)
    pivot = np.array([10.0, 20.0, -1200.0]) + rng.normal(0, 20.0, 3)
    upright = Rotation.from_rotvec(rng.normal(0, 0.2, 3))
    poses, outliers = [], rng.random(n_poses) < outlier_fraction
    for n in range(n_poses):
        tilt = np.radians(max_angle_deg) * np.sqrt(rng.random())
        azimuth = rng.uniform(0, 2 * np.pi)
        spin = rng.uniform(-np.pi / 4, np.pi / 4)
        r = (upright * Rotation.from_rotvec([tilt * np.cos(azimuth), tilt * np.sin(azimuth), 0])
             * Rotation.from_rotvec([0, 0, spin])).as_matrix()
        where = pivot + (rng.normal(0, 1, 3) * slip_mm / np.sqrt(3) if outliers[n] else 0.0)
        pose = np.eye(4)
        pose[:3, :3] = r
        pose[:3, 3] = where - r @ tip
        poses.append(jitter(pose, rng, position_mm, angle_deg))
    return PivotSession(np.array(poses), tip, pivot, outliers)


# ---- B-mode of bright reflectors -------------------------------------------------------------

class ReflectorRenderer:
    """B-mode frames of a water tank holding bright reflectors (wires, a flat bottom), rendered by
    :func:`regseg.sim.bmode.render_bmode` on a linear array: weak speckle, electronic noise, and
    each reflector a coherent echo blurred by the point-spread function."""

    def __init__(self, frame_hw=FRAME_HW, pixel_mm: float = PIXEL_MM, seed: int = 0,
                 background_db: float = -38.0) -> None:
        h, w = frame_hw
        self.frame_hw, self.pixel_mm = frame_hw, pixel_mm
        self.geometry = bmode.linear_geometry(frame_hw, pixel_mm, w * pixel_mm, 0.0, h, w)
        self.psf = bmode.psf_kernels(0.25 / self.geometry.sample_mm, 1.5)
        beam_ij = self.geometry.beam_ij.numpy().astype(np.float64)
        # A linear array's samples are separable: column from the beam, row from the depth.
        self.beam_i, self.sample_j = beam_ij[0, :, 0], beam_ij[:, 0, 1]
        self.shape = beam_ij.shape[:2]
        self.rng = np.random.default_rng([seed, 13])
        self.background = 10.0 ** (background_db / 20.0)

    def render(self, amplitude: np.ndarray) -> np.ndarray:
        """(H, W) uint8 from ``amplitude``: (R, B) coherent reflector amplitude at the polar
        samples (``beam_ij``), 1 = as bright as the top of the grey scale."""
        shape = amplitude.shape
        scat = self.rng.standard_normal((2, *shape)).astype(np.float32) * self.background
        scat[0] += amplitude.astype(np.float32)
        noise = torch.from_numpy(self.rng.standard_normal((2, *shape)).astype(np.float32))
        ones = torch.ones(shape)
        frame = bmode.render_bmode(ones, ones * bmode.NOMINAL_ATTENUATION_DB_PER_MM,
                                   torch.from_numpy(scat), noise, self.geometry, self.psf,
                                   gain_db=-3.0, dynamic_range_db=50.0, noise_db=-50.0)
        return frame.numpy()

    def dots(self, dots_ij: np.ndarray, radius_px: float = 1.2,
             tail: tuple[float, ...] = (0.35, 0.12)) -> np.ndarray:
        """A frame of round wire cross-sections at pixel (i, j) ``dots_ij`` (N, 2).

        Each wire's echo varies in strength (0.5-1, its angle to the beam) and rings: weaker
        copies (``tail``) follow it every 0.6 mm down the beam (the comet tail of a metal wire),
        which pulls an intensity centroid deeper than the wire, as on real scans.
        """
        amp = np.zeros(self.shape)
        ring_px = 0.6 / self.pixel_mm
        for i, j in dots_ij:
            if not np.isfinite(i):
                continue
            across = np.exp(-0.5 * np.square(self.beam_i - i) / radius_px ** 2)
            strength = self.rng.uniform(0.5, 1.0)
            for k, a in enumerate((1.0, *tail)):
                along = np.exp(-0.5 * np.square(self.sample_j - j - k * ring_px) / radius_px ** 2)
                amp += strength * a * np.outer(along, across)
        return self.render(amp)

    def line(self, row_j: float, tilt: float = 0.0, width_px: float = 1.2) -> np.ndarray:
        """A frame of a flat reflector at row ``row_j`` (+ ``tilt`` * (i - W/2))."""
        i, j = self.beam_i[None, :], self.sample_j[:, None]
        centre = row_j + tilt * (i - 0.5 * self.frame_hw[1])
        return self.render(0.7 * np.exp(-0.5 * np.square(j - centre) / width_px ** 2))


# ---- N-wire probe calibration -----------------------------------------------------------------

@dataclass(frozen=True)
class NWireSession:
    pixels: np.ndarray  # (N, H, W) uint8 B-mode frames
    probe_to_tracker: np.ndarray  # (N, 4, 4) as tracked (jitter)
    phantom_to_tracker: np.ndarray  # (4, 4) as registered with a stylus (landmark error)
    true_image_to_probe: np.ndarray  # (4, 4) pixel -> probe mm (the answer)
    true_probe_to_tracker: np.ndarray  # (N, 4, 4)
    true_phantom_to_tracker: np.ndarray  # (4, 4)
    true_dots_ij: np.ndarray  # (N, 9, 2) where the wires cross each frame, pixels
    pixel_mm: float


#: fCal-like landmarks on the phantom's frame (mm), touched with the stylus to register it.
PHANTOM_LANDMARKS = np.array([[0, 0, -5], [95, 0, -5], [0, 40, -5], [95, 40, -5],
                              [0, 0, 25], [95, 0, 25], [0, 40, 25], [95, 40, 25]], dtype=float)
TRUE_IMAGE_TO_PROBE_ROTVEC_DEG = (-90.0, 5.0, 3.0)
TRUE_IMAGE_TO_PROBE_MM = (-25.0, 12.0, -40.0)


def true_image_to_probe(pixel_mm: float = PIXEL_MM) -> np.ndarray:
    """The simulated probe's ImageToProbe (pixel -> probe mm), the answer calibration seeks."""
    m = _rigid(TRUE_IMAGE_TO_PROBE_ROTVEC_DEG, TRUE_IMAGE_TO_PROBE_MM)
    m[:3, :2] *= pixel_mm
    return m


def simulate_nwire(seed: int = 0, n_frames: int = 120, *, frame_hw=FRAME_HW,
                   pixel_mm: float = PIXEL_MM, position_mm: float = TRACKER_POSITION_MM,
                   angle_deg: float = TRACKER_ANGLE_DEG, landmark_fle_mm: float = 0.3,
                   renderer: ReflectorRenderer | None = None) -> NWireSession:
    """The probe held over the :data:`FCAL2_WIRES` phantom in a water tank, ``n_frames`` poses
    spread by +-10 degrees and +-12 mm along the wires; tracked with jitter; the phantom
    registered to the tracker from :data:`PHANTOM_LANDMARKS` touched with ``landmark_fle_mm``
    RMS error."""
    rng = np.random.default_rng([seed, 17])
    h, w = frame_hw
    renderer = renderer or ReflectorRenderer(frame_hw, pixel_mm, seed)
    image_to_probe = true_image_to_probe(pixel_mm)
    phantom_to_tracker = _rigid(rng.normal(0, 20, 3), rng.normal([0, 0, -1000], 50))
    # Nominal plane: image columns along +x, rows (depth) along +z, centred on the wires.
    nominal = np.eye(4)
    nominal[:3, 0], nominal[:3, 1], nominal[:3, 2] = [pixel_mm, 0, 0], [0, 0, pixel_mm], [0, -1, 0]
    nominal[:3, 3] = [47.5 - 0.5 * w * pixel_mm, 20.0, 10.0 - 0.5 * h * pixel_mm]
    centre = np.array([0.5 * w, 0.5 * h, 0, 1.0])
    pixels, tracked, truth, dots = [], [], [], []
    while len(pixels) < n_frames:
        turn = _rigid(rng.uniform(-10, 10, 3), [0, 0, 0])
        shift = rng.uniform([-3, -12, -3], [3, 12, 3])
        c = (nominal @ centre)[:3]
        image_to_phantom = _rigid([0, 0, 0], c + shift) @ turn @ _rigid([0, 0, 0], -c) @ nominal
        ij = intersect_wires(image_to_phantom)
        if not (np.isfinite(ij).all() and (ij > 8).all() and (ij[:, 0] < w - 8).all()
                and (ij[:, 1] < h - 8).all()):
            continue
        probe_to_tracker = phantom_to_tracker @ image_to_phantom @ np.linalg.inv(image_to_probe)
        pixels.append(renderer.dots(ij))
        truth.append(probe_to_tracker)
        tracked.append(jitter(probe_to_tracker, rng, position_mm, angle_deg))
        dots.append(ij)
    touched = (PHANTOM_LANDMARKS @ phantom_to_tracker[:3, :3].T + phantom_to_tracker[:3, 3]
               + rng.normal(0, landmark_fle_mm / np.sqrt(3), PHANTOM_LANDMARKS.shape))
    registered = register_points(PHANTOM_LANDMARKS, touched).moving_to_fixed
    return NWireSession(np.array(pixels), np.array(tracked), registered, image_to_probe,
                        np.array(truth), phantom_to_tracker, np.array(dots), pixel_mm)


# ---- temporal calibration -------------------------------------------------------------------

@dataclass(frozen=True)
class TemporalSession:
    tracker_times_s: np.ndarray  # (M,) tracker clock
    probe_to_tracker: np.ndarray  # (M, 4, 4) tracked (jitter)
    image_times_s: np.ndarray  # (N,) image clock: true time - lag_s (+ timestamp jitter)
    pixels: np.ndarray  # (N, H, W) uint8
    lag_s: float  # truth: add to image times to get tracker times


def simulate_temporal(seed: int = 0, *, duration_s: float = 12.0, lag_s: float = 0.087,
                      tracker_hz: float = 60.0, image_fps: float = 30.0,
                      amplitude_mm: float = 8.0, timestamp_jitter_s: float = 0.0005,
                      position_mm: float = TRACKER_POSITION_MM,
                      renderer: ReflectorRenderer | None = None) -> TemporalSession:
    """The probe moved up and down (about 5 irregular periods over ``duration_s``) above a flat
    tank bottom. The images' clock runs ``lag_s`` behind the tracker's (their stamps are the
    true times minus ``lag_s``), with ``timestamp_jitter_s`` RMS stamp noise on both."""
    rng = np.random.default_rng([seed, 19])
    renderer = renderer or ReflectorRenderer(seed=seed)
    h = renderer.frame_hw[0]
    freqs = rng.uniform(0.3, 0.6, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)

    def height_mm(t):  # probe height above its mean, mm
        t = np.asarray(t)[..., None]
        return amplitude_mm / 2 * np.sin(2 * np.pi * freqs * t + phases).sum(-1) / 1.5

    base = _rigid(rng.normal(0, 10, 3), [50.0, -20.0, -900.0])
    up = base[:3, :3] @ np.array([0, 0, 1.0])
    tt = np.arange(0, duration_s, 1 / tracker_hz)
    poses = []
    for z in height_mm(tt):
        pose = base.copy()
        pose[:3, 3] += z * up
        poses.append(jitter(pose, rng, position_mm))
    it = np.arange(0.2, duration_s - 0.2, 1 / image_fps)
    depth_row = 0.5 * h + height_mm(it) / renderer.pixel_mm  # probe up -> bottom deeper
    pixels = np.array([renderer.line(j, tilt=0.02) for j in depth_row])
    return TemporalSession(tt + rng.normal(0, timestamp_jitter_s, tt.shape), np.array(poses),
                           it - lag_s + rng.normal(0, timestamp_jitter_s, it.shape), pixels,
                           lag_s)


# ---- landmarks --------------------------------------------------------------------------------

def localise(points: np.ndarray, fle_mm: float, rng: np.random.Generator) -> np.ndarray:
    """``points`` as a person clicks or touches them: isotropic Gaussian error, ``fle_mm`` RMS
    (3-D)."""
    return points + rng.normal(0.0, fle_mm / np.sqrt(3), np.shape(points))
