"""Overlay composition: the B-mode frame with predicted and registered-MRI outlines burned in."""

from __future__ import annotations

import cv2
import numpy as np

from regseg.types import LESION

PROSTATE_RGB = (40, 220, 60)  # predicted gland outline
LESION_RGB = (235, 40, 40)  # predicted lesion, filled and outlined
MRI_RGB = (250, 210, 40)  # gland outline of the registered MRI labels
LESION_ALPHA = 0.35


def _outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], width: int) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        cv2.drawContours(rgb, contours, -1, colour, width, lineType=cv2.LINE_AA)


def compose_overlay(pixels: np.ndarray, labels: np.ndarray, warped_labels: np.ndarray,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Burn the labels into an RGB copy of the frame.

    Args:
        pixels: (H, W) uint8 B-mode.
        labels: (H, W) uint8 predicted labels (1 prostate, 2 lesion).
        warped_labels: (H, W) uint8 MRI labels through the registration.
        out: optional (H, W, 3) uint8 buffer to write into (avoids a per-frame allocation).
    Returns:
        (H, W, 3) uint8 RGB.
    """
    rgb = out if out is not None else np.empty((*pixels.shape, 3), np.uint8)
    rgb[...] = pixels[..., None]
    lesion = labels == LESION
    if lesion.any():
        tint = np.asarray(LESION_RGB, np.float32)
        rgb[lesion] = (rgb[lesion] * (1 - LESION_ALPHA) + tint * LESION_ALPHA).astype(np.uint8)
    _outline(rgb, warped_labels > 0, MRI_RGB, 1)
    _outline(rgb, labels > 0, PROSTATE_RGB, 2)
    _outline(rgb, lesion, LESION_RGB, 1)
    return rgb
