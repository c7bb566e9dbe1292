"""Overlay composition: the B-mode frame with predicted and registered-MRI outlines burned in.

What the user sees, per frame:
- the segmentation of the frame: gland outline green, lesion tinted and outlined red;
- the MRI labels through the full registration (affine + deformable): gland outline yellow, and
  the MRI lesion — the biopsy target — as a dashed magenta outline with a cross at its centroid
  and a dotted circle of the target margin (the calibrated error bound) around it;
- a flagged frame: a red border and "UNVERIFIED: <reasons>", and no MRI outlines (they would be
  shown as truth); an unflagged one: the estimated error in the corner, "tracking only" when
  do-no-harm published the tracked plane instead of the registration, and "sweep to check depth
  (k/6 planes)" while the 3-D consensus has not seen the sweep that checks the registration along
  the planes' normals (regseg.stream.consensus; a flag only with --consensus strict); the
  estimate reads "(estimate failed its check)" once --estimate-check's verdict is failed.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from regseg.stream.consensus import ConsensusConfig
from regseg.types import LESION

PROSTATE_RGB = (40, 220, 60)  # predicted gland outline
LESION_RGB = (235, 40, 40)  # predicted lesion, filled and outlined
MRI_RGB = (250, 210, 40)  # gland outline of the registered MRI labels
TARGET_RGB = (255, 60, 255)  # MRI lesion (the biopsy target): dashed outline, centroid, margin
FLAG_RGB = (255, 0, 0)
LESION_ALPHA = 0.35
DASH = 5  # contour points per dash (and per gap)
SWEEP_PLANES = ConsensusConfig().min_keyframes  # the distinct planes a sweep needs


def _outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], width: int) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        cv2.drawContours(rgb, contours, -1, colour, width, lineType=cv2.LINE_AA)


def _dashed_outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    dashes = [c[k:k + DASH + 1] for c in contours for k in range(0, len(c), 2 * DASH)]
    if dashes:
        cv2.polylines(rgb, dashes, False, colour, 2, lineType=cv2.LINE_AA)


def _text(rgb: np.ndarray, text: str, org: tuple[int, int], colour: tuple[int, int, int],
          scale: float) -> None:
    cv2.putText(rgb, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(rgb, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def mark_unverified(rgb: np.ndarray, flags: tuple[str, ...]) -> None:
    """Red border and "UNVERIFIED: reasons" burned into ``rgb`` in place."""
    h, w = rgb.shape[:2]
    border = max(2, min(h, w) // 64)
    cv2.rectangle(rgb, (0, 0), (w - 1, h - 1), FLAG_RGB, 2 * border)
    scale = max(0.35, min(h, w) / 600)
    _text(rgb, "UNVERIFIED: " + ", ".join(flags), (2 * border + 2, 2 * border + int(22 * scale)),
          FLAG_RGB, scale)


def draw_target(rgb: np.ndarray, warped_labels: np.ndarray, target_ij: tuple[float, float] | None,
                margin_px: float) -> None:
    """The MRI lesion: dashed magenta outline, centroid cross, dotted margin circle."""
    _dashed_outline(rgb, warped_labels == LESION, TARGET_RGB)
    if target_ij is None:
        return
    c = (int(round(target_ij[0])), int(round(target_ij[1])))
    cv2.drawMarker(rgb, c, TARGET_RGB, cv2.MARKER_CROSS, 9, 1, cv2.LINE_AA)
    if math.isfinite(margin_px) and margin_px >= 1:
        r = int(round(margin_px))
        steps = max(12, int(2 * math.pi * r / 6))
        for k in range(0, steps, 2):
            cv2.ellipse(rgb, c, (r, r), 0, 360 * k / steps, 360 * (k + 1) / steps, TARGET_RGB, 1,
                        cv2.LINE_AA)


def compose_overlay(pixels: np.ndarray, labels: np.ndarray, warped_labels: np.ndarray,
                    out: np.ndarray | None = None, *, flags: tuple[str, ...] = (),
                    target_ij: tuple[float, float] | None = None, margin_px: float = math.nan,
                    error_mm: float = math.nan, tracking_only: bool = False,
                    sweep: tuple[int, bool | None] = (-1, None),
                    estimate_check: str | None = None) -> np.ndarray:
    """Burn the labels into an RGB copy of the frame.

    Args:
        pixels: (H, W) uint8 B-mode.
        labels: (H, W) uint8 predicted labels (1 prostate, 2 lesion).
        warped_labels: (H, W) uint8 MRI labels through the registration.
        out: optional (H, W, 3) uint8 buffer to write into (avoids a per-frame allocation).
        flags: the frame's flag reasons; any flag marks the overlay and hides the MRI outlines.
        target_ij, margin_px: the MRI lesion centroid (frame pixels) and its margin in pixels.
        error_mm: the estimated registration error, written in a corner when not flagged.
        tracking_only: the tracked plane was published, not the registration (``--do-no-harm``);
            said in the same corner, so the user knows no correction was applied.
        sweep: (distinct planes since the registration, sweep still pending) from the 3-D
            consensus (None: off); while pending, said in the same corner.
        estimate_check: ``--estimate-check``'s status; once ``failed``, the corner's estimate
            says it failed its check (regseg.stream.estimate_check), so an unflagged frame's
            number is not read as vouched for.
    Returns:
        (H, W, 3) uint8 RGB.
    """
    rgb = out if out is not None else np.empty((*pixels.shape, 3), np.uint8)
    rgb[...] = pixels[..., None]
    lesion = labels == LESION
    if lesion.any():
        tint = np.asarray(LESION_RGB, np.float32)
        rgb[lesion] = (rgb[lesion] * (1 - LESION_ALPHA) + tint * LESION_ALPHA).astype(np.uint8)
    if not flags:
        _outline(rgb, warped_labels > 0, MRI_RGB, 1)
    _outline(rgb, labels > 0, PROSTATE_RGB, 2)
    _outline(rgb, lesion, LESION_RGB, 1)
    if flags:
        mark_unverified(rgb, flags)
    else:
        draw_target(rgb, warped_labels, target_ij, margin_px)
        failed = " (estimate failed its check)" if estimate_check == "failed" else ""
        parts = ([f"est. error {error_mm:.1f} mm{failed}"] if math.isfinite(error_mm) else []) + (
            ["tracking only, not registered"] if tracking_only else []) + (
            [f"sweep to check depth ({sweep[0]}/{SWEEP_PLANES} planes)"] if sweep[1] else [])
        if parts:
            h = rgb.shape[0]
            _text(rgb, ", ".join(parts), (4, h - 6), (255, 255, 255), max(0.35, h / 700))
    return rgb
