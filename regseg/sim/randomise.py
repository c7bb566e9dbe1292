"""Domain randomisation of the family-A simulator: a random scanner and anatomy per training case.

A model trained on one fixed simulator learns that simulator. :func:`randomise` draws, from one
``numpy`` generator, everything a real case varies: the probe (side-fire biplane or end-fire,
convex sector or linear, its radius and opening), the frame (size and pixel spacing; the network
input is resampled by ``regseg.planes``), the imaging physics (PSF, speckle density and texture,
gain, time-gain compensation, dynamic range, noise, shadowing, reverberation, needles), tissue
echogenicity (iso- to hypo-echoic lesions: some invisible on TRUS), the anatomy (gland size and
shape, zones, lesions, calcifications), the MRI's contrast and resolution, tissue deformation and
the tracking error (up to 12 degrees and 10 mm per axis). :data:`RANGES` lists the ranges.

The demo's scanner and phantom stay the deterministic defaults (``ScannerConfig()``,
``PhantomOptions()``); only training data generation draws from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regseg.sim import phantom as ph
from regseg.sim.phantom import PhantomOptions
from regseg.sim.scanner import ScannerConfig

#: The ranges drawn from (uniform unless stated), for the documentation and the tests.
RANGES: dict[str, tuple[float, float]] = {
    "endfire_fraction": (0.25, 0.25),  # chance of an end-fire probe (else side-fire biplane)
    "linear_fraction": (0.35, 0.35),  # chance that a side-fire probe is a linear array
    "linear_width_mm": (35.0, 60.0),
    "probe_radius_mm": (6.0, 14.0),  # side-fire convex; end-fire 4-8 mm
    "sector_half_angle_deg": (30.0, 65.0),  # side-fire; end-fire 55-80 degrees
    "endfire_tilt_deg": (40.0, 70.0),
    "face_row_mm": (1.0, 5.0),
    "fov_mm": (40.0, 90.0),  # frame height in mm
    "aspect": (0.8, 1.4),  # frame width / height
    "frame_px": (200, 800),  # each side; log-uniform
    "pixel_mm": (0.1, 0.5),
    "n_beams": (128, 256),
    "n_depth": (192, 320),
    "axial_psf_mm": (0.08, 0.4),  # about 12 to 3 MHz
    "lateral_psf_beams": (0.8, 4.0),
    "scatterer_mm": (0.15, 0.5),
    "speckle_shape": (0.5, 5.0),  # half the cases: 0 (fully developed speckle)
    "texture_scale": (0.3, 2.0),
    "gain_db": (-22.0, -6.0),
    "dynamic_range_db": (35.0, 70.0),
    "noise_db": (-60.0, -35.0),
    "tgc_slope_db_per_mm": (-0.15, 0.15),
    "shadow_scale": (0.0, 2.0),
    "reverb_amplitude": (0.05, 0.35),  # half the cases: 0
    "reverb_period_mm": (2.0, 8.0),
    "needle_prob": (0.0, 0.3),
    "lesion_echo_db": (-8.0, 9.0),  # tumour re. its default -24 dB: +9 is iso with the PZ
    "tissue_echo_db": (-5.0, 5.0),  # every other tissue's shift
    "deform_mm": (0.0, 3.5),
    "deform_modes": (2, 6),
    "pressure_mm": (0.0, 5.0),
    "pressure_decay_mm": (5.0, 15.0),
    "tracking_rot_deg": (2.0, 12.0),
    "tracking_shift_mm": (2.0, 10.0),
    "tracking_scale": (0.0, 0.06),
    "out_of_plane_mm": (0.2, 2.0),
    "sweep_angle_deg": (25.0, 45.0),
    "gland_scale": (0.75, 1.3),  # overall, times 0.9-1.1 per axis
    "tz_scale": (0.7, 1.3),
    "lesion_mm": (2.0, 9.0),
    "mri_gain": (0.75, 1.33),  # per tissue, log-uniform; tumour 0.7-1.8
    "mri_blur_vox": (0.3, 1.5),
    "mri_slice_blur_vox": (0.3, 4.0),
    "mri_noise": (5.0, 40.0),
    "mri_bias": (0.0, 0.3),
}


@dataclass(frozen=True)
class Randomised:
    """One randomised case: the scanner's settings and the phantom's."""

    scanner: ScannerConfig
    phantom: PhantomOptions


def _u(rng: np.random.Generator, key: str) -> float:
    lo, hi = RANGES[key]
    return float(rng.uniform(lo, hi))


def _frame(rng: np.random.Generator) -> tuple[tuple[int, int], float]:
    """Frame (H, W) in 200-800 px and a square pixel in 0.1-0.5 mm, for a 40-90 mm deep view."""
    lo_px, hi_px = RANGES["frame_px"]
    lo_mm, hi_mm = RANGES["pixel_mm"]
    fov = _u(rng, "fov_mm")
    h = float(np.exp(rng.uniform(np.log(lo_px), np.log(hi_px))))
    pixel_mm = float(np.clip(fov / h, lo_mm, hi_mm))
    h = int(np.clip(round(fov / pixel_mm), lo_px, hi_px))
    w = int(np.clip(round(h * _u(rng, "aspect")), lo_px, hi_px))
    return (h, w), pixel_mm


def randomise_scanner(rng: np.random.Generator) -> ScannerConfig:
    """A random but valid :class:`ScannerConfig` (see :data:`RANGES`)."""
    frame_hw, pixel_mm = _frame(rng)
    endfire = rng.random() < RANGES["endfire_fraction"][0]
    linear = not endfire and rng.random() < RANGES["linear_fraction"][0]
    if endfire:
        probe = dict(array="endfire", probe_radius_mm=float(rng.uniform(4.0, 8.0)),
                     sector_half_angle_deg=float(rng.uniform(55.0, 80.0)))
        lo, hi = sorted(rng.uniform(*RANGES["endfire_tilt_deg"], 2))
        probe["endfire_tilt_deg"] = (float(lo), float(max(hi, lo + 1.0)))
    else:
        probe = dict(array="biplane", probe_radius_mm=_u(rng, "probe_radius_mm"),
                     sector_half_angle_deg=_u(rng, "sector_half_angle_deg"))
    if linear:
        probe["linear_width_mm"] = _u(rng, "linear_width_mm")
    offsets = [(ph.TUMOUR, _u(rng, "lesion_echo_db"))]
    offsets += [(t, _u(rng, "tissue_echo_db")) for t in ph.TISSUE_NAMES
                if t not in (ph.TUMOUR, ph.URINE)]
    lo_m, hi_m = RANGES["deform_modes"]
    return ScannerConfig(
        frame_hw=frame_hw, pixel_mm=pixel_mm, **probe,
        face_row_mm=_u(rng, "face_row_mm"),
        n_beams=int(rng.integers(*RANGES["n_beams"], endpoint=True)),
        n_depth=int(rng.integers(*RANGES["n_depth"], endpoint=True)),
        axial_psf_mm=_u(rng, "axial_psf_mm"), lateral_psf_beams=_u(rng, "lateral_psf_beams"),
        scatterer_mm=_u(rng, "scatterer_mm"),
        speckle_shape=_u(rng, "speckle_shape") if rng.random() < 0.5 else 0.0,
        texture_scale=_u(rng, "texture_scale"),
        gain_db=_u(rng, "gain_db"), dynamic_range_db=_u(rng, "dynamic_range_db"),
        noise_db=_u(rng, "noise_db"), tgc_slope_db_per_mm=_u(rng, "tgc_slope_db_per_mm"),
        shadow_scale=_u(rng, "shadow_scale"),
        reverb_amplitude=_u(rng, "reverb_amplitude") if rng.random() < 0.5 else 0.0,
        reverb_period_mm=_u(rng, "reverb_period_mm"), needle_prob=_u(rng, "needle_prob"),
        echo_offsets_db=tuple((int(t), float(v)) for t, v in offsets),
        deform_mm=_u(rng, "deform_mm"),
        deform_modes=int(rng.integers(lo_m, hi_m, endpoint=True)),
        pressure_mm=_u(rng, "pressure_mm"), pressure_decay_mm=_u(rng, "pressure_decay_mm"),
        tracking_rot_deg=_u(rng, "tracking_rot_deg"),
        tracking_shift_mm=_u(rng, "tracking_shift_mm"),
        tracking_scale=_u(rng, "tracking_scale"), out_of_plane_mm=_u(rng, "out_of_plane_mm"),
        sweep_angle_deg=_u(rng, "sweep_angle_deg"))


def randomise_phantom(rng: np.random.Generator) -> PhantomOptions:
    """Random but valid :class:`PhantomOptions` (see :data:`RANGES`)."""
    scale = _u(rng, "gland_scale") * rng.uniform(0.9, 1.1, 3)
    lo_g, hi_g = np.log(RANGES["mri_gain"])
    gains = [(t, float(np.exp(rng.uniform(lo_g, hi_g)))) for t in ph.TISSUE_NAMES
             if t != ph.TUMOUR]
    gains.append((ph.TUMOUR, float(rng.uniform(0.7, 1.8))))
    return PhantomOptions(
        gland_scale=tuple(float(s) for s in scale), tz_scale=_u(rng, "tz_scale"),
        lesion_count=(1, 4), lesion_mm=RANGES["lesion_mm"], calcifications=(0, 10),
        mri_gain=tuple((int(t), g) for t, g in gains),
        mri_blur_vox=_u(rng, "mri_blur_vox"), mri_slice_blur_vox=_u(rng, "mri_slice_blur_vox"),
        mri_noise=_u(rng, "mri_noise"), mri_bias=_u(rng, "mri_bias"))


def randomise(rng: np.random.Generator) -> Randomised:
    """A random scanner and anatomy: the same generator state gives the same case."""
    return Randomised(scanner=randomise_scanner(rng), phantom=randomise_phantom(rng))
