"""Paired-point registration (rigid or similarity) with the errors Fitzpatrick predicts for it.

Frames: ``moving`` points are in frame a, ``fixed`` points the same physical points in frame b;
the result is ``a_to_b`` (4 x 4, mm). Points are (N, 3) in mm.

References:
    Arun, Huang, Blostein, "Least-squares fitting of two 3-D point sets", IEEE PAMI 9(5), 1987
    (SVD solution), with the reflection fix of Umeyama, IEEE PAMI 13(4), 1991 (also the scale of
    the similarity case).
    Fitzpatrick, West, Maurer, "Predicting error in rigid-body point-based registration", IEEE TMI
    17(5), 1998: expected FRE^2 = (1 - 2/N) FLE^2 (eq. 10) and TRE^2(r) = FLE^2/N (1 + 1/3
    sum_k d_k^2 / f_k^2) (eq. 46).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regseg.errors import InputError


@dataclass(frozen=True)
class PointRegistration:
    """The result of :func:`register_points`."""

    moving_to_fixed: np.ndarray  # (4, 4)
    fre_mm: float  # RMS distance between fixed and mapped moving points
    residuals_mm: np.ndarray  # (N,) per-point distance after registration
    scale: float  # 1.0 for rigid


def check_points(points, what: str, n_min: int = 3) -> np.ndarray:
    """(N, 3) finite float64 with N >= ``n_min``; InputError naming ``what`` otherwise."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or len(p) < n_min or not np.isfinite(p).all():
        raise InputError(f"{what}: points of shape {p.shape}; (N, 3) finite mm with N >= {n_min} "
                         "expected")
    return p


def register_points(moving, fixed, *, similarity: bool = False) -> PointRegistration:
    """Least-squares rigid (or similarity) map from ``moving`` to ``fixed`` (paired rows).

    Args:
        moving: (N, 3) mm in frame a.
        fixed: (N, 3) mm in frame b, row n the same point as ``moving[n]``.
        similarity: also fit one isotropic scale (Umeyama).
    Raises:
        InputError: shapes differ, fewer than 3 points, or the points are collinear.
    """
    a = check_points(moving, "moving points")
    b = check_points(fixed, "fixed points")
    if a.shape != b.shape:
        raise InputError(f"moving points {a.shape} and fixed points {b.shape}: the same number "
                         "of paired points expected")
    ca, cb = a.mean(0), b.mean(0)
    qa, qb = a - ca, b - cb
    u, s, vt = np.linalg.svd(qa.T @ qb)
    if s[1] < 1e-9 * max(s[0], 1e-12):
        raise InputError(f"{len(a)} points are (nearly) collinear: the rotation is undefined; "
                         "use at least 3 well spread points")
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])  # no reflections
    rotation = vt.T @ d @ u.T
    scale = float((s * np.diag(d)).sum() / np.square(qa).sum()) if similarity else 1.0
    m = np.eye(4)
    m[:3, :3] = scale * rotation
    m[:3, 3] = cb - m[:3, :3] @ ca
    residuals = np.linalg.norm(apply(m, a) - b, axis=1)
    return PointRegistration(m, float(np.sqrt(np.mean(residuals ** 2))), residuals, scale)


def apply(a_to_b: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 3) points by a (4, 4) matrix."""
    p = np.asarray(points, dtype=np.float64)
    return p @ a_to_b[:3, :3].T + a_to_b[:3, 3]


def expected_fre_mm(fle_mm: float, n: int) -> float:
    """Fitzpatrick 1998 eq. 10: RMS FRE expected for ``n`` fiducials with RMS error ``fle_mm``."""
    return float(fle_mm * np.sqrt(max(1.0 - 2.0 / n, 0.0)))


def predicted_tre_mm(fiducials, targets, fle_mm: float) -> np.ndarray:
    """Fitzpatrick 1998 eq. 46: expected RMS TRE at each target.

    Args:
        fiducials: (N, 3) fiducial positions, mm (either frame: the prediction is rigid-invariant).
        targets: (M, 3) target positions in the same frame, mm.
        fle_mm: RMS fiducial localisation error (3-D, isotropic, independent; with noise in both
            point sets, sqrt(FLE_a^2 + FLE_b^2)).
    Returns:
        (M,) expected RMS TRE, mm.
    """
    f = check_points(fiducials, "fiducials")
    t = np.atleast_2d(np.asarray(targets, dtype=np.float64))
    centre = f.mean(0)
    _, _, axes = np.linalg.svd(f - centre)  # principal axes (rows)
    q, r = (f - centre) @ axes.T, (t - centre) @ axes.T

    def dist2_from_axis(p: np.ndarray, k: int) -> np.ndarray:
        return np.square(p).sum(1) - np.square(p[:, k])

    ratio = sum(dist2_from_axis(r, k) / np.mean(dist2_from_axis(q, k)) for k in range(3))
    return fle_mm * np.sqrt((1.0 + ratio / 3.0) / len(f))
