"""B-mode rendering: tissue echo and attenuation along the beams of a sector probe, to uint8 pixels.

The scanner samples the scene in beam coordinates (depth rows x beam columns, the "polar" image),
where the physics is simplest: scatterers scaled by echogenicity are convolved with a separable
point-spread function (narrow axially, wide laterally), attenuation accumulates down each beam
(so calcifications cast shadows and fluid gives posterior enhancement), time-gain compensation
undoes the nominal tissue loss, and log compression maps the envelope to grey levels. Scan
conversion then resamples the polar image onto the frame's square pixels inside the fan.

References:
    Wagner et al., "Statistics of speckle in ultrasound B-scans", IEEE Trans. Sonics Ultrason.
    30(3), 1983 (complex Gaussian scatterers give Rayleigh speckle). The tissue levels below are our
    own choice, after typical descriptions of prostate TRUS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg.sim import phantom as ph
from regseg.spatial import index_to_normalised

# Echogenicity in dB re. the capsule; per-tissue heterogeneity (dB, std) and attenuation in dB per
# mm of depth, round trip, at about 7 MHz (0.5 dB/cm/MHz in soft tissue).
ECHO_DB = {
    ph.SOFT_TISSUE: -25.0, ph.FAT: -12.0, ph.RECTAL_WALL: -6.0, ph.RECTAL_LUMEN: -14.0,
    ph.BLADDER_WALL: -9.0, ph.URINE: -70.0, ph.CAPSULE: 0.0, ph.PERIPHERAL_ZONE: -15.0,
    ph.TRANSITION_ZONE: -19.0, ph.URETHRA: -26.0, ph.TUMOUR: -24.0, ph.CALCIFICATION: 10.0,
}
TEXTURE_DB = {ph.TRANSITION_ZONE: 3.5, ph.FAT: 3.0, ph.SOFT_TISSUE: 2.5, ph.PERIPHERAL_ZONE: 1.0,
              ph.TUMOUR: 1.5, ph.RECTAL_WALL: 2.0}
ATTENUATION_DB_PER_MM = {
    ph.SOFT_TISSUE: 0.7, ph.FAT: 0.6, ph.RECTAL_WALL: 0.7, ph.RECTAL_LUMEN: 0.7,
    ph.BLADDER_WALL: 0.7, ph.URINE: 0.02, ph.CAPSULE: 0.9, ph.PERIPHERAL_ZONE: 0.7,
    ph.TRANSITION_ZONE: 0.7, ph.URETHRA: 0.7, ph.TUMOUR: 0.8, ph.CALCIFICATION: 25.0,
}
NOMINAL_ATTENUATION_DB_PER_MM = 0.7  # what the time-gain compensation assumes


def tissue_properties(tissue: np.ndarray, rng: np.random.Generator,
                      shadow_scale: float = 1.0,
                      echo_offsets_db: Sequence[tuple[int, float]] = (),
                      texture_scale: float = 1.0) -> np.ndarray:
    """Acoustic property volumes of a tissue map.

    Args:
        tissue: (I, J, K) uint8 tissue classes of :mod:`regseg.sim.phantom`.
        shadow_scale: multiplies the calcifications' attenuation (0 = no shadows).
        echo_offsets_db: (tissue class, dB) pairs added to :data:`ECHO_DB` (e.g. an iso-echoic
            lesion, a brighter transition zone).
        texture_scale: multiplies the per-tissue heterogeneity of :data:`TEXTURE_DB`.
    Returns:
        (2, I, J, K) float32: linear echo amplitude (with smooth per-tissue texture) and
        attenuation in dB/mm.
    """
    n = len(ph.TISSUE_NAMES)
    echo_db = np.array([ECHO_DB[t] for t in range(n)], dtype=np.float32)
    for cls, offset in echo_offsets_db:
        echo_db[int(cls)] += float(offset)
    texture = np.array([TEXTURE_DB.get(t, 0.0) for t in range(n)], dtype=np.float32)
    texture *= np.float32(texture_scale)
    atten = np.array([ATTENUATION_DB_PER_MM[t] for t in range(n)], dtype=np.float32)
    atten[ph.CALCIFICATION] *= shadow_scale
    level = echo_db[tissue] + texture[tissue] * ph.smooth_noise(rng, tissue.shape, 20)
    return np.stack([10.0 ** (level / 20.0), atten[tissue]]).astype(np.float32)


@dataclass(frozen=True)
class SectorGeometry:
    """A sector probe's beams on a frame, precomputed once per scanner."""

    beam_ij: Tensor  # (R, B, 2) frame pixel coordinates (i, j) of every polar sample
    radial_ij: Tensor  # (R, B, 2) unit vector along the beam, in pixels (points away from apex)
    depth_mm: Tensor  # (R,) depth of each sample row below the transducer face
    scan_grid: Tensor  # (1, H, W, 2) normalised grid into the (R, B) polar image, per frame pixel
    mask: Tensor  # (H, W) bool, True inside the fan
    pixel_depth_mm: Tensor  # (H, W) depth of each frame pixel below the transducer face
    pixel_radial_ij: Tensor  # (H, W, 2) unit vector away from the apex, per frame pixel
    sample_mm: float  # depth step between polar rows


def sector_geometry(frame_hw: tuple[int, int], pixel_mm: float, apex_mm: float,
                    face_row_mm: float, half_angle_deg: float, n_depth: int, n_beams: int,
                    device: torch.device | str = "cpu") -> SectorGeometry:
    """Beam geometry of a convex sector probe on the frame.

    The fan apex (the centre of the probe's curvature) lies on the centre column, ``apex_mm -
    face_row_mm`` above the top row; beams start at the transducer face, ``apex_mm`` from the apex.

    Args:
        frame_hw: (H, W) of the frame.
        pixel_mm: frame pixel size.
        apex_mm: distance from the fan apex to the transducer face (the probe radius).
        face_row_mm: depth of the face's centre below the top row, so the curved face shows.
        half_angle_deg: half the fan's opening angle.
        n_depth, n_beams: polar image size (R, B).
    """
    h, w = frame_hw
    ci, cj = 0.5 * (w - 1), (face_row_mm - apex_mm) / pixel_mm  # fan apex in pixel coordinates
    jj, ii = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    di, dj = ii - ci, jj - cj
    r_mm = np.hypot(di, dj) * pixel_mm
    theta = np.arctan2(di, dj)
    half = np.deg2rad(half_angle_deg)
    in_angle = np.abs(theta) <= half
    r_max = float(r_mm[in_angle].max())
    mask = in_angle & (r_mm >= apex_mm) & (r_mm <= r_max)
    step_r = (r_max - apex_mm) / n_depth
    step_t = 2 * half / n_beams
    # Polar sample centres: row d at depth (d + 0.5) steps, beam b at angle (b + 0.5) steps.
    r_s = apex_mm + (np.arange(n_depth) + 0.5) * step_r
    t_s = -half + (np.arange(n_beams) + 0.5) * step_t
    radial = np.stack([np.sin(t_s), np.cos(t_s)], -1)[None].repeat(n_depth, 0)  # (R, B, 2)
    beam_ij = np.array([ci, cj]) + (r_s / pixel_mm)[:, None, None] * radial
    # Fractional polar indices of each frame pixel, then normalised for grid_sample.
    idx = np.stack([(theta + half) / step_t - 0.5, (r_mm - apex_mm) / step_r - 0.5,
                    np.ones_like(r_mm)], -1)
    grid = idx @ index_to_normalised((n_beams, n_depth))[:2].T
    pixel_radial = np.stack([di, dj], -1) / np.maximum(np.hypot(di, dj), 1e-6)[..., None]

    def t(a: np.ndarray) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)

    return SectorGeometry(
        beam_ij=t(beam_ij), radial_ij=t(radial), depth_mm=t(r_s - apex_mm),
        scan_grid=t(grid)[None], mask=torch.as_tensor(mask, device=device),
        pixel_depth_mm=t(np.maximum(r_mm - apex_mm, 0.0)), pixel_radial_ij=t(pixel_radial),
        sample_mm=float(step_r))


def linear_geometry(frame_hw: tuple[int, int], pixel_mm: float, width_mm: float,
                    face_row_mm: float, n_depth: int, n_beams: int,
                    device: torch.device | str = "cpu") -> SectorGeometry:
    """Beam geometry of a linear array: parallel beams down from a flat face.

    The face is ``width_mm`` wide (clipped to the frame), centred on the centre column, at depth
    ``face_row_mm`` below the top row; beams run straight down to the bottom row.
    """
    h, w = frame_hw
    ci, face_j = 0.5 * (w - 1), face_row_mm / pixel_mm
    half_w = min(0.5 * width_mm, 0.5 * w * pixel_mm)
    jj, ii = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                         indexing="ij")
    x_mm, depth = (ii - ci) * pixel_mm, (jj - face_j) * pixel_mm
    d_max = (h - 0.5 - face_j) * pixel_mm
    mask = (np.abs(x_mm) <= half_w) & (depth >= 0)
    step_r, step_x = d_max / n_depth, 2 * half_w / n_beams
    r_s = (np.arange(n_depth) + 0.5) * step_r
    x_s = -half_w + (np.arange(n_beams) + 0.5) * step_x
    beam_ij = np.stack(np.broadcast_arrays(ci + x_s[None, :] / pixel_mm,
                                           face_j + r_s[:, None] / pixel_mm), -1)
    radial = np.zeros((n_depth, n_beams, 2))
    radial[..., 1] = 1.0
    idx = np.stack([(x_mm + half_w) / step_x - 0.5, depth / step_r - 0.5, np.ones_like(x_mm)], -1)
    grid = idx @ index_to_normalised((n_beams, n_depth))[:2].T
    pixel_radial = np.zeros((h, w, 2))
    pixel_radial[..., 1] = 1.0

    def t(a: np.ndarray) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)

    return SectorGeometry(
        beam_ij=t(beam_ij), radial_ij=t(radial), depth_mm=t(r_s), scan_grid=t(grid)[None],
        mask=torch.as_tensor(mask, device=device), pixel_depth_mm=t(np.maximum(depth, 0.0)),
        pixel_radial_ij=t(pixel_radial), sample_mm=float(step_r))


def psf_kernels(axial_sigma: float, lateral_sigma: float) -> tuple[tuple[float, ...], ...]:
    """Separable Gaussian point-spread function.

    Args:
        axial_sigma: standard deviation along the beam, in polar depth samples.
        lateral_sigma: standard deviation across beams, in beams.
    Returns:
        (axial, lateral) 1-D kernels of odd length as plain floats (no device sync to read them),
        each scaled to unit energy so that speckle keeps its level whatever the widths.
    """
    def gauss(sigma: float) -> tuple[float, ...]:
        radius = max(1, int(np.ceil(3 * sigma)))
        k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / max(sigma, 1e-3)) ** 2)
        return tuple(float(v) for v in k / np.sqrt(np.square(k).sum()))

    return gauss(axial_sigma), gauss(lateral_sigma)


def convolve_along(x: Tensor, kernel: Sequence[float], dim: int) -> Tensor:
    """Zero-padded 'same' 1-D convolution of ``x`` along ``dim`` with a short symmetric kernel.

    A sum of shifted copies: for kernels of a few to ~20 taps this is several times faster on
    CPU than a grouped (depthwise) conv2d, and it runs unchanged on GPU.
    """
    dim = dim % x.ndim
    radius = len(kernel) // 2
    padded = F.pad(x, [0, 0] * (x.ndim - 1 - dim) + [radius, radius])
    n = x.shape[dim]
    out = padded.narrow(dim, 0, n) * kernel[0]
    for t in range(1, len(kernel)):
        out.add_(padded.narrow(dim, t, n), alpha=kernel[t])
    return out


def render_bmode(echo: Tensor, attenuation: Tensor, scatterers: Tensor, noise: Tensor,
                 geometry: SectorGeometry, psf: tuple[Sequence[float], Sequence[float]], *,
                 gain_db: float = 0.0, dynamic_range_db: float = 50.0,
                 noise_db: float = -47.0, tgc_slope_db_per_mm: float = 0.0,
                 reverb: tuple[float, int] = (0.0, 0)) -> Tensor:
    """B-mode frame from echo, attenuation and scatterers sampled along the beams.

    Args:
        echo: (R, B) linear echo amplitude.
        attenuation: (R, B) attenuation in dB per mm (round trip).
        scatterers: (2, R, B) real and imaginary parts of the scatterer field (unit variance).
        noise: (2, R, B) unit-variance electronic noise added after beamforming.
        geometry: from :func:`sector_geometry`.
        psf: from :func:`psf_kernels`.
        gain_db: overall gain; 0 dB puts the capsule near the top of the grey scale.
        dynamic_range_db: dB span of the grey scale.
        noise_db: electronic noise level re. the top of the grey scale (after gain).
        tgc_slope_db_per_mm: time-gain compensation error: extra gain per mm of depth (a
            darker or brighter far field).
        reverb: (amplitude, period in depth samples): the near field's echoes repeat at
            multiples of the period with amplitude**k (reverberation between the face and the
            rectal wall); amplitude 0 turns it off.
    Returns:
        (H, W) uint8, zero outside the fan.
    """
    depth = geometry.depth_mm[:, None]
    # Attenuation accumulated above each sample (shadows, enhancement) against the nominal loss
    # the time-gain compensation assumes; half a step of the sample's own tissue counts.
    lost = torch.cumsum(attenuation, 0) - 0.5 * attenuation
    gain = torch.pow(10.0, (gain_db + (NOMINAL_ATTENUATION_DB_PER_MM + tgc_slope_db_per_mm)
                            * depth - lost * geometry.sample_mm) / 20.0)
    iq = scatterers * (echo * gain)
    amp, period = reverb
    if amp > 0 and 0 < period < iq.shape[1]:
        near = iq[:, :period].clone()
        for k in range(1, 4):
            start = k * period
            if start >= iq.shape[1]:
                break
            n = min(period, iq.shape[1] - start)
            iq[:, start:start + n].add_(near[:, :n], alpha=amp ** k)
    iq = convolve_along(convolve_along(iq, psf[0], 1), psf[1], 2)
    iq.add_(noise, alpha=10.0 ** (noise_db / 20.0))
    envelope_db = 10.0 * torch.log10(iq.square().sum(0) + 1e-12)
    grey = (envelope_db + dynamic_range_db) * (255.0 / dynamic_range_db)
    frame = F.grid_sample(grey[None, None], geometry.scan_grid, mode="bilinear",
                          padding_mode="border", align_corners=False)[0, 0]
    return (frame.clamp(0.0, 255.0) * geometry.mask).to(torch.uint8)
