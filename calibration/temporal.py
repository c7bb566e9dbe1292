"""Temporal calibration: the lag between the tracker's and the image stream's clocks.

The probe moves up and down over a flat reflector (a water-bath bottom). The tracker gives the
probe's position along its main direction of motion; each image gives the depth of the reflector
line. Both signals are normalised (zero mean, unit deviation); the tracker signal, sampled
faster, is first smoothed onto a 1 ms grid by a zero-phase Gaussian kernel (tracker jitter, if
interpolated raw, makes the score ripple with the tracker period and biases the lag towards the
lags where image times fall between two tracker samples), then linearly interpolated at the
image times shifted by a candidate lag, and the lag with the largest absolute normalised
correlation (the two move in opposite senses) wins, first on a
grid of ``step_s``, then refined to sub-step resolution by a parabola through the peak.

Convention: ``lag_s`` is what to add to the image timestamps to put them on the tracker's clock:
the pose of the image stamped t is the tracker sample at t + lag_s (PLUS: the video
``LocalTimeOffsetSec`` is -lag_s when the tracker offset is 0).

References:
    PLUS toolkit, AlgorithmTemporalCalibration (Lasso et al., "PLUS: open-source toolkit for
    ultrasound-guided intervention systems", IEEE TBME 61(10), 2014): a line-detection signal
    from video, a position signal from the tracker, normalised and aligned by the lag that
    minimises their difference. We use correlation and a parabolic refinement (our choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regseg.errors import InputError


@dataclass(frozen=True)
class LagResult:
    """What :func:`estimate_lag` found."""

    lag_s: float
    correlation: float  # |normalised correlation| at the lag (1 = perfect)
    lags_s: np.ndarray  # the grid searched
    scores: np.ndarray  # |correlation| at each grid lag


def tracker_signal(probe_to_tracker) -> np.ndarray:
    """(N,) probe position along its principal direction of motion, mm (PCA of the positions)."""
    p = np.asarray(probe_to_tracker, dtype=np.float64)[:, :3, 3]
    centred = p - p.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return centred @ axes[0]


def line_depth_signal(frames, *, min_level: float = 60.0) -> np.ndarray:
    """(N,) depth (row, pixels) of the brightest horizontal line in each frame.

    The row profile (mean over the middle half of the columns) is taken; around its peak
    (+-6 rows) the rows brighter than half way between the profile's median (background) and
    the peak are averaged, weighted by how much brighter, for sub-pixel depth (a centroid of
    the whole peak, not of a few rows, which would lock to whole pixels). NaN when the peak is
    below ``min_level`` (no reflector in view).
    """
    out = []
    for pixels in frames:
        img = np.asarray(pixels, dtype=np.float64)
        w = img.shape[1]
        profile = img[:, w // 4: 3 * w // 4].mean(1)
        j = int(np.argmax(profile))
        if profile[j] < min_level:
            out.append(np.nan)
            continue
        lo, hi = max(j - 6, 0), min(j + 7, len(profile))
        weights = np.clip(profile[lo:hi] - 0.5 * (profile[j] + np.median(profile)), 0, None)
        out.append(float((np.arange(lo, hi) * weights).sum() / weights.sum()))
    return np.asarray(out)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / max(float(x.std()), 1e-12)


def smooth_resample(times_s: np.ndarray, values: np.ndarray, sigma_s: float,
                    step_s: float = 0.001) -> tuple[np.ndarray, np.ndarray]:
    """Nadaraya-Watson Gaussian smoothing of irregular samples onto a uniform grid.

    Returns (grid times, smoothed values); the kernel is symmetric, so no delay is added.
    """
    grid = np.arange(times_s[0], times_s[-1], step_s)
    out = np.empty_like(grid)
    for start in range(0, len(grid), 2000):  # chunks bound the (grid x samples) weight matrix
        g = grid[start:start + 2000]
        near = (times_s >= g[0] - 4 * sigma_s) & (times_s <= g[-1] + 4 * sigma_s)
        w = np.exp(-0.5 * np.square((g[:, None] - times_s[near][None]) / sigma_s))
        out[start:start + 2000] = (w @ values[near]) / np.maximum(w.sum(1), 1e-12)
    return grid, out


def estimate_lag(tracker_times_s, tracker_values, image_times_s, image_values, *,
                 max_lag_s: float = 0.5, step_s: float = 0.001,
                 smooth_s: float = 0.04) -> LagResult:
    """The lag (s) that best aligns the image signal with the tracker signal.

    Args:
        tracker_times_s, tracker_values: (M,) the tracker signal (e.g. :func:`tracker_signal`).
        image_times_s, image_values: (N,) the image signal (e.g. :func:`line_depth_signal`);
            NaN samples are skipped.
        max_lag_s: search -max..+max (PLUS MaximumMovingLagSec: 0.5 s).
        step_s: grid step before the sub-step refinement.
        smooth_s: standard deviation of the tracker signal's Gaussian smoothing, s (keep it well
            below the motion's period; 0 turns smoothing off).
    Raises:
        InputError: too few samples, or a signal that does not move.
    """
    tt = np.asarray(tracker_times_s, dtype=np.float64)
    tv = np.asarray(tracker_values, dtype=np.float64)
    it = np.asarray(image_times_s, dtype=np.float64)
    iv = np.asarray(image_values, dtype=np.float64)
    ok = np.isfinite(iv) & np.isfinite(it)
    it, iv = it[ok], iv[ok]
    order = np.argsort(tt)
    tt, tv = tt[order], tv[order]
    if len(it) < 20 or len(tt) < 20:
        raise InputError(f"temporal calibration: {len(tt)} tracker and {len(it)} image samples; "
                         "at least 20 of each expected (record 10-15 s of up-down motion)")
    for name, v in (("tracker", tv), ("image", iv)):
        if np.std(v) < 1e-6:
            raise InputError(f"temporal calibration: the {name} signal does not move; move the "
                             "probe up and down over the reflector")
    if smooth_s > 0:
        tt, tv = smooth_resample(tt, tv, smooth_s)
    lags = np.arange(-max_lag_s, max_lag_s + step_s / 2, step_s)

    def score(lag: float) -> float:
        t = it + lag
        inside = (t >= tt[0]) & (t <= tt[-1])
        if inside.sum() < 0.5 * len(it):
            return 0.0
        a = _normalise(np.interp(t[inside], tt, tv))
        b = _normalise(iv[inside])
        return abs(float(np.mean(a * b)))

    scores = np.array([score(lag) for lag in lags])
    k = int(np.argmax(scores))
    lag = float(lags[k])
    if 0 < k < len(lags) - 1:
        y0, y1, y2 = scores[k - 1], scores[k], scores[k + 1]
        denom = y0 - 2 * y1 + y2
        if denom < 0:
            lag += 0.5 * step_s * (y0 - y2) / denom
    return LagResult(lag, float(scores[k]), lags, scores)
