"""Scoring for bench/accuracy.py: per-frame scores, flag rates and reasons, the ROC of the error
estimate, per-level and pooled rows, and the noise twins' rows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from common import case_bootstrap

from regseg import metrics, spatial
from regseg.stream.quality import lesion_target
from regseg.stream.runner import frame_accuracy
from regseg.types import LESION, PROSTATE, Frame

BAD_MM, GOOD_MM = 5.0, 2.0  # a frame is "bad" above BAD_MM registered TRE, "good" at or below
NOISE_GLAND_MM2 = 100.0  # a noise frame "has a gland" when the labels cover more than 1 cm^2


def estimate_of(result: Any) -> float:
    """The per-frame registration-error estimate: ``error_mm`` if present, else 1 - quality."""
    err = getattr(result, "error_mm", None)
    if err is not None:
        return float(err)
    q = float(result.quality)
    return 1.0 - q if math.isfinite(q) else math.nan


def true_plane_labels(context: Any, frame: Frame) -> np.ndarray:
    """The MRI labels resliced at the TRUE plane, (H, W): what a perfect rigid registration
    would publish as ``MRILabels`` (off the truth by tissue motion and MRI partial volume)."""
    return spatial.reslice(context.labels, context.world_to_voxel, frame.truth.image_to_mri,
                           frame.pixels.shape, mode="nearest")[0, 0].cpu().numpy()


def target_error_mm(target_ij: Any, frame: Frame) -> float:
    """Distance (mm, in plane) from a target centroid (frame pixels (i, j)) to the centroid of
    the frame's TRUE lesion; NaN when either is missing."""
    truth = lesion_target(frame.truth.labels)
    if target_ij is None or truth is None:
        return math.nan
    di = (target_ij[0] - truth[0]) * float(frame.spacing_mm[1])  # columns
    dj = (target_ij[1] - truth[1]) * float(frame.spacing_mm[0])  # rows
    return float(math.hypot(di, dj))


def target_scores(result: Any, frame: Frame, true_plane: np.ndarray) -> dict[str, Any]:
    """The biopsy target as the user gets it: the published MRI lesion centroid's distance to
    the true lesion's (``target_error_mm``), whether that lies within the published margin
    (``target_in_margin``, only on frames that publish a target: not flagged), the same
    distance for the MRI lesion at the TRUE plane (``target_error_true_plane_mm``: what a
    perfect rigid registration leaves), and whether a lesion in the truth had no target."""
    error = target_error_mm(getattr(result, "target_ij", None), frame)
    margin = float(getattr(result, "target_margin_mm", math.nan))
    shown = math.isfinite(error) and math.isfinite(margin) and not result.flagged
    return {"target_error_mm": error,
            "target_in_margin": (float(error <= margin) if shown else math.nan),
            "target_error_true_plane_mm": target_error_mm(lesion_target(true_plane), frame),
            "target_missing": bool((frame.truth.labels == LESION).any()
                                   and getattr(result, "target_ij", None) is None)}


def score_frame(pipeline: Any, result: Any) -> dict[str, float]:
    dice, tre = frame_accuracy(pipeline, result)
    frame: Frame = result.frame
    true_plane = true_plane_labels(pipeline.context, frame)
    return {"dice_prostate": dice["prostate"], "dice_lesion": dice["lesion"],
            "dice_registered": dice["registered_prostate"],
            "dice_lesion_registered": metrics.dice(result.warped_labels, frame.truth.labels,
                                                   LESION),
            "dice_true_plane": metrics.dice(true_plane, frame.truth.labels, PROSTATE),
            "dice_lesion_true_plane": metrics.dice(true_plane, frame.truth.labels, LESION),
            **target_scores(result, frame, true_plane),
            "tre_tracked_mm": tre.get("tracked", math.nan),
            "tre_registered_mm": tre.get("registered", math.nan),
            # against the tissue (the simulator's motion) and through the published field
            "tre_tracked_tissue_mm": tre.get("tracked_tissue", math.nan),
            "tre_registered_tissue_mm": tre.get("registered_tissue", math.nan),
            "flagged": bool(result.flagged), "estimate": estimate_of(result),
            "flags": list(getattr(result, "flags", ())),
            "threshold_mm": _threshold_of(pipeline),
            "jump_mm": float(getattr(result, "jump_mm", math.nan)),
            "agreement": float(result.quality),
            "seg_confidence": float(getattr(result, "seg_confidence", math.nan)),
            "out_of_plane_mm": float(getattr(result, "out_of_plane_mm", math.nan)),
            "lc2_move_mm": float(getattr(result, "lc2_move_mm", math.nan)),
            "lc2_significance": float(getattr(result, "lc2_significance", math.nan)),
            "lesion_in_truth": bool((frame.truth.labels == 2).any()),
            "estimate_check": getattr(result, "estimate_check", None),
            "labels_source": getattr(result, "labels_source", None),
            "total_ms": float(result.timings_ms.get("total", math.nan))}


def labels_sources(frames: list[dict]) -> dict[str, dict[str, int]]:
    """Per family, how many scored frames published which labels (``Result.labels_source``:
    network, network+mri, mri, withheld); empty where the tree predates it."""
    out: dict[str, dict[str, int]] = {}
    for f in frames:
        if f.get("labels_source") is not None:
            counts = out.setdefault(f["family"], {})
            counts[f["labels_source"]] = counts.get(f["labels_source"], 0) + 1
    return out


def estimate_check_verdicts(frames: list[dict]) -> dict[str, dict[str, int]]:
    """Per family, how many runs (phantom and level) ended with each ``--estimate-check``
    status (``passed``, ``failed``, ``pending`` when too few frames had the gland in view);
    empty where the check was off or the tree predates it."""
    last: dict[tuple, str] = {}
    for f in frames:
        status = f.get("estimate_check")
        if status is not None:
            last[(f["family"], f["phantom"], f["error_level"])] = status.split(" ")[0]
    out: dict[str, dict[str, int]] = {}
    for (family, _, _), status in sorted(last.items()):
        out.setdefault(family, {}).setdefault(status, 0)
        out[family][status] += 1
    return out


def _threshold_of(pipeline: Any) -> float:
    """The error-estimate threshold the chain flags at (NaN on a tree without QualityNet)."""
    quality = getattr(pipeline, "quality", None)
    return float(getattr(quality, "threshold_mm", math.nan))


def _nan(values) -> np.ndarray:
    return np.asarray([v for v in values], dtype=np.float64)


def flag_rates(frames: list[dict]) -> dict[str, float]:
    """Detection (bad frames flagged) and false-alarm (good frames flagged) rates."""
    tre = _nan(f["tre_registered_mm"] for f in frames)
    flagged = np.asarray([f["flagged"] for f in frames], dtype=bool)
    bad, good = tre > BAD_MM, tre <= GOOD_MM
    return {"n_bad": int(bad.sum()), "n_good": int(good.sum()),
            "detection": float(flagged[bad].mean()) if bad.any() else math.nan,
            "false_alarm": float(flagged[good].mean()) if good.any() else math.nan,
            "flagged_pct": 100.0 * float(flagged.mean()) if len(frames) else math.nan}


def flag_reasons(frames: list[dict]) -> dict[str, dict[str, Any]]:
    """Per family: how often each flag reason fires on bad (TRE > 5 mm) and good (<= 2 mm)
    frames: which check makes the false alarms."""
    out: dict[str, dict[str, Any]] = {}
    for fam in sorted({f["family"] for f in frames}):
        mine = [f for f in frames if f["family"] == fam]
        tre = _nan(f["tre_registered_mm"] for f in mine)
        for name, sel in (("bad", tre > BAD_MM), ("good", tre <= GOOD_MM)):
            chosen = [f for f, s in zip(mine, sel, strict=True) if s]
            counts: dict[str, int] = {}
            for f in chosen:
                for reason in f.get("flags", ()):
                    counts[reason] = counts.get(reason, 0) + 1
            out.setdefault(fam, {})[name] = {"frames": len(chosen), **counts}
    return out


def roc(frames: list[dict]) -> dict[str, Any]:
    """ROC of the estimate separating bad (TRE > 5 mm) from good (<= 2 mm) frames; NaN estimates
    (no gland in view) count as the lowest score (never flagged)."""
    tre = _nan(f["tre_registered_mm"] for f in frames)
    est = _nan(f["estimate"] for f in frames)
    est = np.where(np.isfinite(est), est, -np.inf)
    bad, good = tre > BAD_MM, tre <= GOOD_MM
    if not bad.any() or not good.any():
        return {"fpr": [], "tpr": [], "auc": math.nan, "n_bad": int(bad.sum()),
                "n_good": int(good.sum())}
    thresholds = np.unique(est[bad | good])[::-1]
    tpr = [0.0] + [float((est[bad] >= t).mean()) for t in thresholds] + [1.0]
    fpr = [0.0] + [float((est[good] >= t).mean()) for t in thresholds] + [1.0]
    auc = float(np.trapezoid(tpr, fpr))
    return {"fpr": fpr, "tpr": tpr, "auc": auc, "n_bad": int(bad.sum()), "n_good": int(good.sum())}


def summarise(family: str, level: float, frames: list[dict]) -> dict[str, Any]:
    """One table row: means of Dice, medians/p90 of TRE, flag rates."""
    def col(key):  # a record from before a column existed counts as not measured
        return _nan(f.get(key, math.nan) for f in frames)

    def stat(fn, key):
        v = col(key)
        v = v[np.isfinite(v)]
        return float(fn(v)) if v.size else math.nan

    return {"name": f"{family} {level:g}mm/{level:g}deg", "family": family, "error_level": level,
            "frames": len(frames),
            "dice_prostate": stat(np.mean, "dice_prostate"),
            "dice_prostate_median": stat(np.median, "dice_prostate"),
            "dice_lesion": stat(np.mean, "dice_lesion"),
            "lesion_frames": int(np.isfinite(col("dice_lesion")).sum()),
            "dice_registered": stat(np.mean, "dice_registered"),
            "dice_lesion_registered": stat(np.mean, "dice_lesion_registered"),
            "dice_true_plane": stat(np.mean, "dice_true_plane"),
            "dice_lesion_true_plane": stat(np.mean, "dice_lesion_true_plane"),
            "target_error_median_mm": stat(np.median, "target_error_mm"),
            "target_error_p90_mm": stat(lambda v: np.percentile(v, 90), "target_error_mm"),
            "target_frames": int(np.isfinite(col("target_error_mm")).sum()),
            "target_in_margin": stat(np.mean, "target_in_margin"),
            "target_shown": int(np.isfinite(col("target_in_margin")).sum()),
            "target_error_true_plane_median_mm": stat(np.median, "target_error_true_plane_mm"),
            "target_missing": int(sum(bool(f.get("target_missing")) for f in frames)),
            "tre_tracked_median_mm": stat(np.median, "tre_tracked_mm"),
            "tre_median_mm": stat(np.median, "tre_registered_mm"),
            "tre_p90_mm": stat(lambda v: np.percentile(v, 90), "tre_registered_mm"),
            "tre_tissue_tracked_median_mm": stat(np.median, "tre_tracked_tissue_mm"),
            "tre_tissue_median_mm": stat(np.median, "tre_registered_tissue_mm"),
            "tre_tissue_p90_mm": stat(lambda v: np.percentile(v, 90), "tre_registered_tissue_mm"),
            "total_ms_p50": stat(np.median, "total_ms"),
            **flag_rates(frames)}


def pooled_row(family: str, frames: list[dict], auc: float) -> dict[str, Any]:
    """The family's row over all levels: Dice means, TRE median / p90 and flag rates of every
    frame (the tracked-error columns pool different levels: left out)."""
    row = summarise(family, 0.0, frames)
    row.update(name=f"{family} all levels", error_level=None, estimate_auc=auc,
               tre_tracked_median_mm=math.nan, tre_tissue_tracked_median_mm=math.nan)
    return row


def window_rows(frames: list[dict], width: int) -> list[dict[str, Any]]:
    """Per family and level, one row per ``width`` consecutive scored frames of every run (frames
    ``seq`` 0 .. width-1, width .. 2 width-1, ...): how the chain converges after a start
    (``--windows``; with ``--stride 1`` the frames are a live stream's)."""
    rows = []
    for family, level in dict.fromkeys((f["family"], f["error_level"]) for f in frames):
        run = [f for f in frames if f["family"] == family and f["error_level"] == level]
        for start in range(0, max(f["seq"] for f in run) + 1, width):
            part = [f for f in run if start <= f["seq"] < start + width]
            row = summarise(family, level, part)
            row.update(name=f"{row['name']} frames {start}-{start + width - 1}",
                       first_frame=start, last_frame=start + width - 1)
            rows.append(row)
    return rows


def score_noise(result: Any) -> dict[str, Any]:
    """A noise frame: predicted gland area (mm^2), labelled (> 1 cm^2), flagged."""
    sy, sx = result.frame.spacing_mm
    area = float((result.labels > 0).sum()) * sy * sx
    return {"gland_mm2": area, "labelled": area > NOISE_GLAND_MM2, "flagged": bool(result.flagged),
            "estimate": estimate_of(result)}


def noise_row(family: str, noise: list[dict]) -> dict[str, Any]:
    labelled = np.asarray([r["labelled"] for r in noise], dtype=bool)
    flagged = np.asarray([r["flagged"] for r in noise], dtype=bool)
    n = len(noise)
    return {"name": f"{family} noise frames", "family": family, "error_level": None, "frames": n,
            "noise_labelled_pct": 100.0 * float(labelled.mean()) if n else math.nan,
            "flagged_pct": 100.0 * float(flagged.mean()) if n else math.nan,
            "noise_published_pct": 100.0 * float((labelled & ~flagged).mean()) if n else math.nan}


#: Case-bootstrap draws for :func:`case_intervals` (fixed seed: the same records give the same
#: intervals)
BOOTSTRAP_DRAWS = 2000
INTERVAL_METRICS = (("dice_prostate", np.mean), ("dice_lesion", np.mean),
                    ("tre_registered_tissue_mm", np.median))


def case_intervals(records: list[dict], draws: int = BOOTSTRAP_DRAWS,
                   seed: int = 0) -> list[dict[str, Any]]:
    """How much the table's numbers depend on which cases were drawn: per family and level (and
    all levels), each metric of :data:`INTERVAL_METRICS` over all frames (as the table's row), a
    95 % interval from resampling whole cases with replacement (``draws`` times; a case's frames
    are not independent of each other), and the lowest and highest single case's value."""
    rng = np.random.default_rng(seed)
    out = []
    for family in sorted({r["family"] for r in records}):
        fam = [r for r in records if r["family"] == family]
        levels = sorted({r["error_level"] for r in fam})
        for level in [*levels, None]:
            frames = [r for r in fam if level is None or r["error_level"] == level]
            cases = sorted({r["phantom"] for r in frames})
            name = f"{family} all levels" if level is None else f"{family} {level:g}mm/{level:g}deg"
            row: dict[str, Any] = {"name": name, "family": family, "error_level": level,
                                   "cases": len(cases), "frames": len(frames), "draws": draws}
            picks = rng.integers(0, len(cases), (draws, len(cases)))
            for key, fn in INTERVAL_METRICS:
                per_case = [_nan(r[key] for r in frames if r["phantom"] == c) for c in cases]
                per_case = [v[np.isfinite(v)] for v in per_case]

                def stat(values, fn=fn):
                    v = np.concatenate(values) if values else np.empty(0)
                    return float(fn(v)) if v.size else math.nan

                singles = [stat([v]) for v in per_case if v.size]
                row[key] = stat(per_case)
                row[f"{key}_lo"], row[f"{key}_hi"] = case_bootstrap(per_case, fn, picks)
                row[f"{key}_case_min"] = min(singles) if singles else math.nan
                row[f"{key}_case_max"] = max(singles) if singles else math.nan
            out.append(row)
    return out
