"""A second appearance for family A's scenes: restyled frames, for training only.

Family A renders every scene with one physical model (:mod:`regseg.sim.bmode`: scatterers
convolved with a point-spread function in beam coordinates, attenuation, log compression), and
its randomisation (:mod:`regseg.sim.randomise`) varies that model's parameters. Networks trained
on it do not read other renderers' images: QualityNet trained on family-A pairs, randomised or
not, separates family B's good from bad registrations at ROC AUC 0.67-0.75, where the same network
trained on family-B pairs reaches 0.995 (``bench/quality_domain_gap.py``, README "The error
estimate and the flags"). The information is in the pair; the renderer is the gap.

This module draws a *style* per case and re-renders a family-A frame's scene with it, in the
frame's own pixel grid: no beams, no pulse, no envelope. It shares nothing with ``bmode`` and was
written without family B's renderer (which stays evaluation-only):

- each tissue class gets its own level (dB), half the cases near family A's ordering with wide
  jitter, half at random, so no fixed contrast between gland, zones, lesion and surroundings is
  learnable;
- tissue boundaries get an edge response of random strength and sign (a line where classes meet);
- speckle is a multiplicative gamma field (random shape: from spiky to smooth) blurred by an
  anisotropic Gaussian grain of random size and scaled to a random spread in dB, with a smooth
  macro texture on top;
- a random depth ramp (gain against depth in the fan) and a random display: dynamic range, gamma,
  then blur or unsharp masking;
- the fan and the truth are the frame's own.

The scene's tissue classes come from the phantom sampled at the frame's true plane, with the gland
and lesion taken from the frame's truth labels (which carry the tissue's displacement), so the
restyled image shows the gland exactly where the truth has it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from regseg import spatial
from regseg.sim import phantom as ph
from regseg.sim.bmode import ECHO_DB
from regseg.types import Frame

N_CLASSES = max(ECHO_DB) + 1


@dataclass(frozen=True)
class Style:
    """One case's appearance (:func:`draw_style`)."""

    level_db: tuple[float, ...]  # per tissue class, re. the brightest
    edge_db: float  # boundary response (dB at a full class step; negative: dark lines)
    speckle_shape: float  # gamma shape of the speckle intensity (small: spiky)
    speckle_db: float  # the speckle's spread after the grain (std of its dB)
    grain_mm: tuple[float, float]  # Gaussian grain (rows = depth, columns = across), sigma mm
    texture_db: float  # macro texture amplitude
    ramp_db_per_mm: float  # gain change with depth
    dynamic_range_db: float
    gamma: float  # grey map exponent
    post: float  # > 0: blur sigma (px); < 0: unsharp amount


def draw_style(rng: np.random.Generator) -> Style:
    """A random style: see the module docstring for what varies and how far."""
    base = np.array([ECHO_DB[c] for c in range(N_CLASSES)], np.float64)
    if rng.random() < 0.5:  # near family A's ordering, with wide jitter
        levels = base + rng.normal(0.0, 6.0, N_CLASSES)
    else:  # any contrast at all
        levels = rng.uniform(-40.0, 0.0, N_CLASSES)
    others = np.delete(levels, ph.URINE).max()
    levels[ph.URINE] = min(levels[ph.URINE], others + rng.uniform(-40.0, -20.0))  # fluid: dark
    levels -= levels.max()
    blur = rng.random() < 0.5
    return Style(level_db=tuple(float(v) for v in levels),
                 edge_db=float(rng.uniform(-4.0, 10.0)),
                 speckle_shape=float(np.exp(rng.uniform(np.log(0.6), np.log(6.0)))),
                 speckle_db=float(rng.uniform(2.5, 9.0)),
                 grain_mm=(float(rng.uniform(0.08, 0.5)), float(rng.uniform(0.2, 1.2))),
                 texture_db=float(rng.uniform(0.0, 4.0)),
                 ramp_db_per_mm=float(rng.uniform(-0.25, 0.15)),
                 dynamic_range_db=float(rng.uniform(30.0, 70.0)),
                 gamma=float(np.exp(rng.uniform(np.log(0.6), np.log(1.7)))),
                 post=float(rng.uniform(0.0, 1.2) if blur else -rng.uniform(0.0, 1.0)))


def scene_classes(phantom: ph.Phantom, frame: Frame) -> np.ndarray:
    """(H, W) uint8 tissue classes at the frame's true plane; gland and lesion from its truth
    labels (TZ / PZ where the phantom has them, else PZ; the lesion as TUMOUR)."""
    tissue = phantom.tissue
    hw = tuple(frame.pixels.shape)
    grid = spatial.plane_grid(tissue.data.shape, spatial.invert(tissue.voxel_to_world),
                              frame.truth.image_to_mri, hw)
    volume = torch.from_numpy(np.ascontiguousarray(tissue.data.transpose(2, 1, 0)))
    classes = F.grid_sample(volume[None, None].float(), grid, mode="nearest",
                            padding_mode="border", align_corners=False)[0, 0, 0]
    classes = classes.numpy().astype(np.uint8)
    truth = frame.truth.labels
    zones = np.isin(classes, (ph.PERIPHERAL_ZONE, ph.TRANSITION_ZONE, ph.URETHRA))
    classes = np.where((truth == 0) & (zones | (classes == ph.TUMOUR)), ph.SOFT_TISSUE, classes)
    classes = np.where((truth > 0) & ~zones, ph.PERIPHERAL_ZONE, classes)
    return np.where(truth == 2, ph.TUMOUR, classes).astype(np.uint8)


def render(classes: np.ndarray, mask: np.ndarray, depth_mm: np.ndarray, pixel_mm: float,
           style: Style, rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8 pixels of a scene (``classes``) in ``style``; zero outside ``mask``;
    ``depth_mm``: each pixel's depth in the fan; ``rng``: this frame's speckle."""
    level = np.asarray(style.level_db, np.float32)[classes]
    smooth = cv2.GaussianBlur(level, (0, 0), 0.6 / pixel_mm)
    gy, gx = np.gradient(smooth)
    step = np.hypot(gy, gx) * (0.6 / pixel_mm) / 20.0  # 0.4 at a sharp 20 dB step, 1 at 50 dB
    db = level + style.edge_db * np.clip(step, 0.0, 1.0)
    db = cv2.GaussianBlur(db, (0, 0), sigmaX=max(style.grain_mm[1] / pixel_mm, 0.3),
                          sigmaY=max(style.grain_mm[0] / pixel_mm, 0.3))  # the grain blurs edges
    macro = cv2.GaussianBlur(rng.standard_normal(classes.shape).astype(np.float32), (0, 0),
                             3.0 / pixel_mm)
    db += style.texture_db * macro / max(float(macro.std()), 1e-6)
    db += style.ramp_db_per_mm * depth_mm
    speckle = rng.gamma(style.speckle_shape, 1.0 / style.speckle_shape,
                        classes.shape).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), sigmaX=max(style.grain_mm[1] / pixel_mm, 0.3),
                               sigmaY=max(style.grain_mm[0] / pixel_mm, 0.3))
    log_speckle = np.log(np.maximum(speckle, 1e-6))
    log_speckle = (log_speckle - log_speckle.mean()) / max(float(log_speckle.std()), 1e-6)
    intensity_db = db + style.speckle_db * log_speckle
    grey = np.clip(1.0 + intensity_db / style.dynamic_range_db, 0.0, 1.0) ** style.gamma
    if style.post > 0:
        grey = cv2.GaussianBlur(grey, (0, 0), style.post)
    elif style.post < 0:
        grey = grey + (-style.post) * (grey - cv2.GaussianBlur(grey, (0, 0), 1.5))
    return (np.clip(grey, 0.0, 1.0) * 255.0 * mask).round().astype(np.uint8)


class RestyledScanner:
    """A family-A scanner whose frames are re-rendered in one drawn :class:`Style`: the same
    poses, truth and fan; other pixels. ``random_frame`` as the scanner's (for training)."""

    def __init__(self, scanner, seed: int) -> None:
        self.scanner, self.seed = scanner, int(seed)
        self.style = draw_style(np.random.default_rng([self.seed, 0xC5]))
        geometry = scanner.geometry
        self._mask = geometry.mask.cpu().numpy()
        self._depth = geometry.pixel_depth_mm.cpu().numpy().astype(np.float32)

    def restyle(self, frame: Frame, noise_seed: int) -> Frame:
        """The frame with its pixels re-rendered (speckle seeded by ``noise_seed``)."""
        classes = scene_classes(self.scanner.phantom, frame)
        pixels = render(classes, self._mask, self._depth, float(frame.spacing_mm[0]), self.style,
                        np.random.default_rng([self.seed, noise_seed]))
        return dataclasses.replace(frame, pixels=pixels)

    def random_frame(self, rng: np.random.Generator) -> Frame:
        frame = self.scanner.random_frame(rng)
        return self.restyle(frame, int(rng.integers(2**62)))
