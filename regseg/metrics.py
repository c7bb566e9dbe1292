"""Evaluation metrics on plain arrays: label Dice, target registration error, true 2-D affine."""

from __future__ import annotations

import numpy as np

from regseg import spatial
from regseg.types import PROSTATE


def label_mask(labels: np.ndarray, label: int) -> np.ndarray:
    """Boolean mask of one structure in a label map (0 background, 1 prostate, 2 lesion).

    The prostate mask includes the lesion: the lesion lies inside the gland, and the gland is
    what a clinician outlines (the same convention as ``regseg.planes.labels_onehot``). Every
    other label is matched exactly.
    """
    labels = np.asarray(labels)
    if label == PROSTATE:
        return labels >= PROSTATE
    return labels == label


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    """Dice overlap of one structure between two label maps of the same shape.

    Args:
        pred, truth: integer label maps, any equal shape.
        label: the structure (:func:`label_mask` says what the prostate mask includes).
    Returns:
        ``2 |P & T| / (|P| + |T|)`` in [0, 1]; NaN when the structure is absent from both maps
        (nothing to overlap, so neither 0 nor 1 would be honest). Callers average with
        ``np.nanmean`` to skip those frames.
    Raises:
        ValueError: if the shapes differ.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"dice: prediction shape {pred.shape} differs from truth {truth.shape}")
    p, t = label_mask(pred, label), label_mask(truth, label)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def tre_mm(pred_image_to_mri: np.ndarray, true_image_to_mri: np.ndarray,
           points_ij: np.ndarray) -> float:
    """Target registration error: mean distance in mm between frame points mapped both ways.

    Args:
        pred_image_to_mri: (4, 4) estimated frame pixel (i, j, 0) -> MRI world mm.
        true_image_to_mri: (4, 4) true frame pixel -> MRI world mm.
        points_ij: (N, 2) frame pixel coordinates (i = column, j = row), e.g. the prostate pixels.
    Returns:
        mean Euclidean distance in mm; NaN for no points.
    """
    points_ij = np.asarray(points_ij, dtype=np.float64).reshape(-1, 2)
    if len(points_ij) == 0:
        return float("nan")
    points = np.concatenate([points_ij, np.zeros((len(points_ij), 1))], axis=1)
    diff = spatial.apply(pred_image_to_mri, points) - spatial.apply(true_image_to_mri, points)
    return float(np.linalg.norm(diff, axis=1).mean())



def tissue_tre_mm(pred_image_to_mri: np.ndarray, true_image_to_mri: np.ndarray,
                  true_displacement_px: np.ndarray, points_ij: np.ndarray,
                  pred_ddf: np.ndarray | None = None) -> float:
    """Target registration error against the tissue: mean mm between where a registration puts
    the MRI under each frame point and where that point's tissue truly lies in the MRI.

    A simulator moves tissue inside the plane (probe pressure, bulges): frame pixel p shows the
    tissue at ``true_image_to_mri (p + d(p))``, not at ``true_image_to_mri (p)``. A deformable
    registration maps p to ``pred_image_to_mri (p + u(p))``. :func:`tre_mm` compares planes only;
    this compares what is drawn (plane and field) with where the anatomy is.

    Args:
        pred_image_to_mri, true_image_to_mri: (4, 4) frame pixel (i, j, 0) -> MRI world mm.
        true_displacement_px: (H, W, 2) the tissue motion as (di, dj) pixels
            (:class:`regseg.types.GroundTruth` ``displacement_px``).
        points_ij: (N, 2) integer frame pixels (i = column, j = row).
        pred_ddf: (2, H, W) the registration's displacement as (dj, di) pixels
            (:class:`regseg.types.Result` ``ddf``); None for a plane-only registration.
    Returns:
        mean Euclidean distance in mm; NaN for no points.
    """
    points_ij = np.asarray(points_ij, dtype=np.int64).reshape(-1, 2)
    if len(points_ij) == 0:
        return float("nan")
    i, j = points_ij[:, 0], points_ij[:, 1]
    p = points_ij.astype(np.float64)
    true_p = p + np.asarray(true_displacement_px, dtype=np.float64)[j, i]
    pred_p = p if pred_ddf is None else p + np.asarray(pred_ddf, dtype=np.float64)[::-1, j, i].T
    zeros = np.zeros((len(p), 1))
    diff = (spatial.apply(pred_image_to_mri, np.concatenate([pred_p, zeros], axis=1))
            - spatial.apply(true_image_to_mri, np.concatenate([true_p, zeros], axis=1)))
    return float(np.linalg.norm(diff, axis=1).mean())

def true_theta(tracked_image_to_mri: np.ndarray, true_image_to_mri: np.ndarray,
               frame_hw: tuple[int, int]) -> np.ndarray:
    """The in-plane correction a registration should find, as a normalised (2, 3) theta.

    ``inv(tracked) @ true`` maps a frame pixel to where the tracked plane shows the anatomy that
    truly lies under it. Its in-plane (i, j) part is what a 2-D affine of the tracked MRI plane
    can correct; the out-of-plane part (rows and column k) is dropped, so a frame whose tracking
    error tilts the plane keeps a residual error after a perfect 2-D registration.

    Args:
        tracked_image_to_mri: (4, 4) frame pixel -> MRI world mm by tracking.
        true_image_to_mri: (4, 4) the true map.
        frame_hw: the frame's (H, W).
    Returns:
        (2, 3) theta such that ``regseg.spatial.warp_affine(mri_plane, theta)`` shows, on any grid
        covering the frame's field of view, the MRI at the true plane.
    """
    correction = spatial.invert(tracked_image_to_mri) @ np.asarray(true_image_to_mri, np.float64)
    a3 = np.eye(3)
    a3[:2, :2] = correction[:2, :2]
    a3[:2, 2] = correction[:2, 3]
    return spatial.pixel_to_theta(a3, frame_hw)


def registered_image_to_mri(theta: np.ndarray, tracked_image_to_mri: np.ndarray,
                            frame_hw: tuple[int, int]) -> np.ndarray:
    """The frame pixel -> MRI world map after a 2-D registration ``theta`` of the tracked plane.

    The inverse of :func:`true_theta` for in-plane errors:
    ``registered_image_to_mri(true_theta(tracked, true, hw), tracked, hw) == true`` when ``true``
    differs from ``tracked`` only in plane.
    """
    a3 = spatial.theta_to_pixel(np.asarray(theta, np.float64), frame_hw)
    return np.asarray(tracked_image_to_mri, np.float64) @ spatial.lift_2d(a3)
