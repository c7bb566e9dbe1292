"""Pivot calibration of a tracked stylus: the tip in the stylus (marker) frame and the pivot point.

Each pose ``stylus_to_tracker`` = (R_i, p_i) of a stylus pivoting about a fixed point satisfies
R_i tip_stylus + p_i = pivot_tracker. Stacked over poses: [R_i  -I] [tip; pivot] = -p_i, a linear
least-squares problem (the "algebraic one-step" formulation). Outliers (a tip that slipped) are
dropped in rounds: residuals above ``max(k * median, floor)`` go and the system is solved again.
Units: mm.

References:
    Yaniv, "Which pivot calibration?", Proc. SPIE 9415, 2015 (algebraic one-step least squares;
    precision about 0.25 mm with an NDI Polaris Vicra). The rejection rule is our own choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regseg.errors import InputError


@dataclass(frozen=True)
class PivotResult:
    """What :func:`pivot_calibrate` found."""

    tip_in_stylus: np.ndarray  # (3,) mm: the tip in the stylus marker frame (StylusTipToStylus)
    pivot_in_tracker: np.ndarray  # (3,) mm: the fixed pivot point in the tracker frame
    rms_mm: float  # RMS distance of the tip, over the inlier poses, from the pivot point
    residuals_mm: np.ndarray  # (N,) per pose, all poses
    inliers: np.ndarray  # (N,) bool

    @property
    def tip_to_stylus(self) -> np.ndarray:
        """(4, 4) StylusTipToStylus: a translation to the tip (PLUS's convention)."""
        m = np.eye(4)
        m[:3, 3] = self.tip_in_stylus
        return m


def check_poses(poses, what: str, n_min: int) -> np.ndarray:
    """(N, 4, 4) finite poses with N >= ``n_min``; InputError naming ``what`` otherwise."""
    p = np.asarray(poses, dtype=np.float64)
    if p.ndim != 3 or p.shape[1:] != (4, 4) or len(p) < n_min or not np.isfinite(p).all():
        raise InputError(f"{what}: poses of shape {p.shape}; (N, 4, 4) finite with N >= {n_min} "
                         "expected")
    return p


def _solve(poses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(poses)
    a = np.zeros((3 * n, 6))
    a[:, :3] = poses[:, :3, :3].reshape(3 * n, 3)
    a[:, 3:] = -np.tile(np.eye(3), (n, 1))
    x, *_ = np.linalg.lstsq(a, -poses[:, :3, 3].reshape(3 * n), rcond=None)
    return x[:3], x[3:]


def _residuals(poses: np.ndarray, tip: np.ndarray, pivot: np.ndarray) -> np.ndarray:
    return np.linalg.norm(poses[:, :3, :3] @ tip + poses[:, :3, 3] - pivot, axis=1)


def pivot_calibrate(stylus_to_tracker, *, reject_k: float = 3.0, floor_mm: float = 0.5,
                    max_rounds: int = 5, min_rotation_deg: float = 10.0) -> PivotResult:
    """Tip offset and pivot point from poses of a stylus pivoting about its tip.

    Args:
        stylus_to_tracker: (N, 4, 4) StylusToTracker poses, mm, N >= 6.
        reject_k: drop poses whose residual exceeds ``reject_k`` times the median residual...
        floor_mm: ...and this floor (so that clean data loses nothing).
        max_rounds: rounds of rejection at most.
        min_rotation_deg: the poses must turn at least this much about some axis, or the tip is
            not observable.
    Raises:
        InputError: too few poses, or too little rotation (the message says how much there was).
    """
    poses = check_poses(stylus_to_tracker, "pivot calibration", 6)
    r0 = poses[0, :3, :3]
    spread = max(np.degrees(np.arccos(np.clip((np.trace(r0.T @ p[:3, :3]) - 1) / 2, -1, 1)))
                 for p in poses)
    if spread < min_rotation_deg:
        raise InputError(f"pivot calibration: the stylus turned at most {spread:.1f} degrees over "
                         f"{len(poses)} poses; pivot it by at least {min_rotation_deg:g} degrees "
                         "(PLUS asks for about 30) in two directions")
    inliers = np.ones(len(poses), dtype=bool)
    for _ in range(max_rounds):
        tip, pivot = _solve(poses[inliers])
        residuals = _residuals(poses, tip, pivot)
        limit = max(reject_k * float(np.median(residuals[inliers])), floor_mm)
        keep = residuals <= limit
        if keep.sum() < 6 or np.array_equal(keep, inliers):
            break
        inliers = keep
    tip, pivot = _solve(poses[inliers])
    residuals = _residuals(poses, tip, pivot)
    rms = float(np.sqrt(np.mean(residuals[inliers] ** 2)))
    return PivotResult(tip, pivot, rms, residuals, inliers)
