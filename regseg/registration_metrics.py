"""Registration metrics on plain arrays: Dice per label, HD95, TRE, Jacobian determinant statistics.

MONAI computes HD95; it has no folding metric, so the Jacobian statistics are written here
(% of voxels with det J <= 0 and SDlogJ, the Learn2Reg regularity measures).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from regseg import metrics


def labels_present(*label_maps: np.ndarray) -> list[int]:
    """Sorted non-zero label values found in any of the maps."""
    values: set[int] = set()
    for m in label_maps:
        values |= {int(v) for v in np.unique(m)}
    return sorted(values - {0})


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: Iterable[int] | None = None,
                   *, nested_prostate: bool = False) -> dict[int, float]:
    """Dice of every label between two label maps of one shape.

    Args:
        pred, truth: integer label maps, any equal shape.
        labels: the values to score; default every non-zero value in either map.
        nested_prostate: True for regseg's prostate convention (label 1 includes the lesion,
            ``regseg.metrics.dice``); False (default) matches each value exactly, as for brain
            tissue where GM (1) does not contain WM (2).
    Returns:
        ``{label: dice}``; NaN where the label is absent from both maps.
    Raises:
        ValueError: if the shapes differ.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"dice: prediction shape {pred.shape} differs from truth {truth.shape}")
    labels = labels_present(pred, truth) if labels is None else list(labels)
    if nested_prostate:
        return {int(k): metrics.dice(pred, truth, int(k)) for k in labels}
    out = {}
    for k in labels:
        p, t = pred == k, truth == k
        total = int(p.sum()) + int(t.sum())
        out[int(k)] = float("nan") if total == 0 else 2.0 * int((p & t).sum()) / total
    return out


def hd95_mm(pred: np.ndarray, truth: np.ndarray, labels: Iterable[int] | None = None,
            spacing_mm: Sequence[float] | None = None) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance per label, in mm (MONAI).

    Args:
        pred, truth: integer label maps of one shape, 2-D or 3-D, axes in the order of
            ``spacing_mm``.
        labels: values to score; default every non-zero value in either map.
        spacing_mm: voxel size per array axis; default 1.
    Returns:
        ``{label: hd95_mm}``; NaN where the label is missing from either map (no surface).

    References:
        MONAI ``compute_hausdorff_distance`` (percentile=95, symmetric).
    """
    import warnings

    import torch
    from monai.metrics import compute_hausdorff_distance

    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"hd95: prediction shape {pred.shape} differs from truth {truth.shape}")
    labels = labels_present(pred, truth) if labels is None else list(labels)
    spacing = None if spacing_mm is None else [float(s) for s in spacing_mm]
    out = {}
    for k in labels:
        p, t = pred == k, truth == k
        if not p.any() or not t.any():
            out[int(k)] = float("nan")
            continue
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal argument
            warnings.simplefilter("ignore", FutureWarning)
            value = compute_hausdorff_distance(
                torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None],
                include_background=True, percentile=95, directed=False, spacing=spacing)
        out[int(k)] = float(value.reshape(-1)[0])
    return out


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """det of the Jacobian of x -> x + u(x), central differences (one-sided at the edges).

    Args:
        ddf: (ndim, *spatial) displacement in voxels, channels in array-axis order (as
            ``regseg.spatial.warp``). A field in mm on an isotropic grid works the same once
            divided by the spacing.
    Returns:
        (*spatial) determinant; 1 for the identity, <= 0 where the map folds.
    """
    ddf = np.asarray(ddf, dtype=np.float64)
    ndim = ddf.shape[0]
    if ndim not in (2, 3) or ddf.ndim != ndim + 1:
        raise ValueError(f"jacobian_determinant: expected (ndim, *spatial) with ndim 2 or 3, got "
                         f"shape {ddf.shape}")
    # grads[c][a] = d u_c / d x_a
    grads = [np.gradient(ddf[c], axis=tuple(range(ndim))) for c in range(ndim)]
    jac = np.empty((ndim, ndim, *ddf.shape[1:]))
    for c in range(ndim):
        for a in range(ndim):
            jac[c, a] = grads[c][a] + (1.0 if a == c else 0.0)
    if ndim == 2:
        return jac[0, 0] * jac[1, 1] - jac[0, 1] * jac[1, 0]
    return (jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
            - jac[0, 1] * (jac[1, 0] * jac[2, 2] - jac[1, 2] * jac[2, 0])
            + jac[0, 2] * (jac[1, 0] * jac[2, 1] - jac[1, 1] * jac[2, 0]))


def jacobian_stats(ddf: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Regularity of a displacement: folding and the spread of log det J.

    Args:
        ddf: (ndim, *spatial) displacement in voxels, array-axis order.
        mask: optional (*spatial) bool region to evaluate (e.g. the fixed image's foreground).
    Returns:
        ``folding_pct`` (% of voxels with det J <= 0), ``sdlogj`` (standard deviation of
        log det J, det clipped to [1e-9, 1e9] as Learn2Reg does), ``det_min``, ``det_mean``.

    References:
        Learn2Reg challenge evaluation (SDlogJ); Balakrishnan et al., VoxelMorph, IEEE TMI 2019
        (% of non-positive Jacobian determinants).
    """
    det = jacobian_determinant(ddf)
    if mask is not None:
        det = det[np.asarray(mask, dtype=bool)]
    det = det.reshape(-1)
    if det.size == 0:
        nan = float("nan")
        return {"folding_pct": nan, "sdlogj": nan, "det_min": nan, "det_mean": nan}
    log_det = np.log(np.clip(det, 1e-9, 1e9))
    return {"folding_pct": float(100.0 * np.mean(det <= 0)), "sdlogj": float(log_det.std()),
            "det_min": float(det.min()), "det_mean": float(det.mean())}


def sample_field(field: np.ndarray, points_vox: np.ndarray) -> np.ndarray:
    """Linearly interpolate a vector field at voxel positions (clamped to the grid).

    Args:
        field: (C, *spatial) values on the grid, array-axis order.
        points_vox: (N, ndim) positions in array-axis order (voxel centres at integers).
    Returns:
        (N, C).
    """
    points = np.asarray(points_vox, dtype=np.float64)
    spatial = np.asarray(field.shape[1:])
    points = np.clip(points, 0, spatial - 1)
    base = np.floor(points).astype(int)
    base = np.minimum(base, spatial - 2).clip(0)
    frac = points - base
    ndim = points.shape[1]
    out = np.zeros((len(points), field.shape[0]))
    for corner in range(2**ndim):
        offs = [(corner >> a) & 1 for a in range(ndim)]
        weight = np.ones(len(points))
        idx = []
        for a, o in enumerate(offs):
            weight = weight * (frac[:, a] if o else 1.0 - frac[:, a])
            idx.append(np.minimum(base[:, a] + o, spatial[a] - 1))
        out += weight[:, None] * field[(slice(None), *idx)].T
    return out


def tre_mm(pred_points_mm: np.ndarray, true_points_mm: np.ndarray) -> dict[str, float]:
    """Target registration error between corresponding landmark positions.

    Args:
        pred_points_mm, true_points_mm: (N, 3) (or (N, 2)) positions in mm.
    Returns:
        ``tre_mm`` mean, ``tre_median_mm``, ``tre_max_mm``; NaN for no points.
    """
    pred = np.asarray(pred_points_mm, dtype=np.float64)
    true = np.asarray(true_points_mm, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"tre: {pred.shape} predicted vs {true.shape} true points")
    if len(pred) == 0:
        nan = float("nan")
        return {"tre_mm": nan, "tre_median_mm": nan, "tre_max_mm": nan}
    d = np.linalg.norm(pred - true, axis=1)
    return {"tre_mm": float(d.mean()), "tre_median_mm": float(np.median(d)),
            "tre_max_mm": float(d.max())}


def nanmean(values: Iterable[float]) -> float:
    """Mean that skips NaN; NaN when nothing is finite."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
