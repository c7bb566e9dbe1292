"""Does a TRUS-only segmentation flag bad registrations better than today's quality check?

The live chain as ``regseg-stream`` builds it (shipped AlignSegNet, deformable stage on, default
capture, shipped QualityNet), run twice on the same frames: once with the U-Net head
(``--segmenter unet``, today) and once with ``--segmenter ascseg-trus``. Frames come from
held-out family-A phantoms (1000..) with a constant ``reference_to_mri`` shift of each level (mm,
random direction per phantom and level), as bench/trust.py makes them. Per frame: the published
registration's true TRE over the prostate; QualityNet's error estimate and the flags; the Dice of
the registered MRI gland with each segmentation (the "disagreement" cue). Scored: ROC AUC of each
cue for bad (TRE > 5 mm) vs good (TRE <= 2 mm) frames; detection (share of bad frames flagged) and
false alarms (share of good frames flagged) of today's flags and of today's flags plus the
TRUS-only disagreement flag (Dice < 0.5, the Pipeline's threshold).
"""

from __future__ import annotations

import math

import numpy as np

from regseg import metrics, spatial
from regseg.stream.deformable_lag import bench_stage
from regseg.stream.lc2_lag import in_order

BAD_MM, GOOD_MM = 5.0, 2.0


def _tre(result) -> float:
    truth = result.frame.truth
    ji = np.argwhere(truth.labels > 0)
    if len(ji) < 50:
        return math.nan
    ji = ji[np.linspace(0, len(ji) - 1, min(1000, len(ji))).astype(int)]
    return metrics.tre_mm(spatial.invert(result.mri_to_image), truth.image_to_mri, ji[:, ::-1])


def _auc(score: np.ndarray, bad: np.ndarray, good: np.ndarray) -> float | None:
    """P(score of a bad frame > score of a good frame), ties half; NaN scores left out."""
    b, g = score[bad & np.isfinite(score)], score[good & np.isfinite(score)]
    if not len(b) or not len(g):
        return None
    b, g = b[:, None], g[None, :]
    return round(float((b > g).mean() + 0.5 * (b == g).mean()), 4)


def _share(mask: np.ndarray, of: np.ndarray) -> float | None:
    return round(float(mask[of].mean()), 4) if of.any() else None


def trust_rows(seeds: list[int], frames: int, levels: list[float], *, threads: int = 1,
               progress=print, segmenter: str = "ascseg-trus") -> list[dict]:
    """One row per frame and level (see the module docstring); ``segmenter``: the TRUS-only
    checkpoint (default the shipped one)."""
    import torch

    from regseg.sim.phantom import make_phantom
    from regseg.sim.scanner import SimulatedScanner
    from regseg.stream.build import (
        build_default_capture,
        build_deformable,
        build_engine,
        build_pipeline,
        build_segmenter,
    )
    from regseg.stream.context import build_context

    torch.set_num_threads(threads)
    engine = build_engine(backend="eager")
    segmenter = build_segmenter(segmenter, backend="eager")
    rows = []
    for seed in seeds:
        phantom = make_phantom(seed)
        scanner = SimulatedScanner(phantom, seed=seed)
        step = scanner.config.sweep_frames * 2 // frames
        case_frames = [scanner.frame(k * step) for k in range(frames)]
        context = build_context(phantom.mri, phantom.labels)
        pipelines = {
            name: build_pipeline(context, engine,
                                 deformable=bench_stage(build_deformable(context,
                                                                         backend="eager")),
                                 capture=build_default_capture(backend="eager"), segmenter=seg,
                                 lc2=in_order("default"))
            for name, seg in (("unet", None), ("ascseg_trus", segmenter))}
        rng = np.random.default_rng([seed, 99])
        for level in levels:
            d = rng.standard_normal(3)
            shift = np.eye(4)
            shift[:3, 3] = level * d / np.linalg.norm(d)
            for p in pipelines.values():
                p.set_reference_to_mri(shift)
            for frame in case_frames:
                r = {name: p(frame) for name, p in pipelines.items()}
                rows.append({
                    "seed": seed, "level_mm": level, "tre_mm": _tre(r["unet"]),
                    "tre_mm_trus_run": _tre(r["ascseg_trus"]),
                    "error_mm": float(r["unet"].error_mm),
                    "flags_today": list(r["unet"].flags),
                    "dice_unet": float(r["unet"].quality),
                    "dice_trus": float(r["ascseg_trus"].quality),
                })
        progress(f"trust: phantom {seed} done ({len(rows)} frames)")
    return rows


def trust_summary(rows: list[dict], threshold: float = 0.5) -> dict:
    """AUCs, detection and false alarms of the cues (module docstring)."""
    tre = np.array([r["tre_mm"] for r in rows])
    ok = np.isfinite(tre)
    rows = [r for r, k in zip(rows, ok, strict=True) if k]
    tre = tre[ok]
    bad, good = tre > BAD_MM, tre <= GOOD_MM
    est = np.array([r["error_mm"] for r in rows])
    d_unet = np.array([r["dice_unet"] for r in rows])
    d_trus = np.array([r["dice_trus"] for r in rows])
    today = np.array([bool(r["flags_today"]) for r in rows])
    by_estimate = np.array(["error_estimate" in r["flags_today"] for r in rows])
    # NaN Dice (no gland in either) compares False, as in the Pipeline
    trus_flag = np.nan_to_num(d_trus, nan=1.0) < threshold
    unet_flag = np.nan_to_num(d_unet, nan=1.0) < threshold
    return {
        "frames": len(rows), "bad_frames": int(bad.sum()), "good_frames": int(good.sum()),
        "registration_same_in_both_runs": bool(np.allclose(
            tre, [r["tre_mm_trus_run"] for r in rows], equal_nan=True)),
        "auc": {"qualitynet_estimate": _auc(est, bad, good),
                "disagreement_unet": _auc(1.0 - d_unet, bad, good),
                "disagreement_ascseg_trus": _auc(1.0 - d_trus, bad, good)},
        "detection": {"today_all_flags": _share(today, bad),
                      "today_error_estimate": _share(by_estimate, bad),
                      "disagreement_unet": _share(unet_flag, bad),
                      "disagreement_ascseg_trus": _share(trus_flag, bad),
                      "today_plus_ascseg_trus": _share(today | trus_flag, bad)},
        "false_alarm_tre_le_2mm": {"today_all_flags": _share(today, good),
                                   "today_error_estimate": _share(by_estimate, good),
                                   "disagreement_unet": _share(unet_flag, good),
                                   "disagreement_ascseg_trus": _share(trus_flag, good),
                                   "today_plus_ascseg_trus": _share(today | trus_flag, good)},
    }
