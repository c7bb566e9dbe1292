"""The pictures a person would rather look at than numbers: residuals per point, the lag curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_residuals(path: str | Path, residuals_mm, *, title: str, labels=None,
                   inliers=None, xlabel: str = "point") -> Path:
    """Bar chart of per-point residuals (mm); rejected points in grey."""
    plt = _pyplot()
    r = np.asarray(residuals_mm, dtype=float)
    keep = np.ones(len(r), dtype=bool) if inliers is None else np.asarray(inliers, dtype=bool)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = np.arange(len(r))
    ax.bar(x[keep], r[keep], color="tab:blue", label="used")
    if (~keep).any():
        ax.bar(x[~keep], r[~keep], color="0.6", label="rejected")
        ax.legend()
    rms = float(np.sqrt(np.mean(r[keep] ** 2))) if keep.any() else float("nan")
    ax.axhline(rms, color="tab:red", lw=1)
    ax.set_title(f"{title} (RMS of used {rms:.2f} mm)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("residual, mm")
    if labels is not None and len(labels) <= 30:
        ax.set_xticks(x, labels, rotation=45, fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_lag(path: str | Path, lags_s, scores, lag_s: float, tracker=None, image=None) -> Path:
    """The correlation against the lag, and (given (times, values) pairs) both signals aligned."""
    plt = _pyplot()
    rows = 2 if tracker is not None and image is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3.2 * rows), squeeze=False)
    ax = axes[0, 0]
    ax.plot(np.asarray(lags_s) * 1e3, scores)
    ax.axvline(lag_s * 1e3, color="tab:red", lw=1, label=f"lag {lag_s * 1e3:.1f} ms")
    ax.set_xlabel("lag added to image times, ms")
    ax.set_ylabel("|normalised correlation|")
    ax.legend()
    if rows == 2:
        ax = axes[1, 0]

        def norm(v):
            v = np.asarray(v, dtype=float)
            return (v - np.nanmean(v)) / max(float(np.nanstd(v)), 1e-12)

        image_values = norm(image[1])
        tracker_values = norm(tracker[1])
        ok = np.isfinite(image_values)
        interp = np.interp(np.asarray(image[0])[ok] + lag_s, tracker[0], tracker_values)
        sign = 1.0 if np.mean(image_values[ok] * interp) >= 0 else -1.0
        ax.plot(tracker[0], sign * tracker_values, lw=1, label="tracker (position)")
        ax.plot(np.asarray(image[0]) + lag_s, image_values, ".", ms=3,
                label="image (reflector depth), shifted by the lag")
        ax.set_xlabel("tracker time, s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
