"""Does the flag catch the frames the registration gets wrong? Detection and false alarms, measured.

``python bench/trust.py --out /tmp/trust.json [--family b]`` runs the live Pipeline (shipped
AlignSegNet, eager; the deformable stage and the capture stage as the CLI's defaults; the shipped
QualityNet and its calibrated threshold, or ``--quality-weights`` / ``--deformable-weights``) on
held-out family-A phantoms (1000-1003; never trained on by AlignSegNet or QualityNet) or on
family B (5000-5003; never trained on), with a constant ``reference_to_mri`` error of each level
(a shift of that many mm in a random direction per phantom and level, on top of the simulator's
own tracking error). Per level and pooled: the published registration's true TRE (prostate
pixels), the share of frames with TRE > 5 mm that are flagged (detection), the share with
TRE <= 2 mm (and <= 5 mm) that are flagged (false alarms), the error estimate's ROC AUC, its
median absolute error and its median bias on good frames, and which flag reasons fire on bad and
on good frames. Plus: frames of pure noise (uniform, Gaussian, speckle) on tracked poses (flagged?
labels published?) and frames with no pose (PLUS INVALID): "untracked"?

The flag threshold is the one the shipped checkpoint holds for the chain that runs
(``quality_calibration`` in the JSON: regseg.stream.quality.QualityCheck.bind_chain);
``--compare-thresholds T ...`` also reports the pooled rates as they would be at other thresholds
on the same frames (only the ``error_estimate`` flag depends on it). ``frames_detail``: per frame.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace

import cv2
import numpy as np
import torch
from common import case_bootstrap, load_average

from regseg import metrics, spatial
from regseg.engines.fusion import FusionEngine
from regseg.machine import machine_name, utc_now
from regseg.sim.phantom import make_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.build import build_default_capture, build_deformable
from regseg.stream.chain import RESEGMENT_DEFAULT
from regseg.stream.cli_parser import DEFORMABLE_DEFAULT
from regseg.stream.consensus import BENCH_MODES as CONSENSUS_BENCH_MODES
from regseg.stream.consensus import CONSENSUS_DEFAULT, CONSENSUS_MODES, build_consensus
from regseg.stream.context import build_context
from regseg.stream.deformable_lag import in_order as deformable_in_order
from regseg.stream.estimate_check import (
    ESTIMATE_CHECK_DEFAULT,
    ESTIMATE_CHECK_MODES,
    build_estimate_check,
)
from regseg.stream.intensity import INTENSITY_DEFAULT, INTENSITY_MODES, build_intensity
from regseg.stream.lc2_lag import in_order
from regseg.stream.lc2_stage import (
    LC2_DEFAULT,
    LC2_HOLD,
    LC2_HOLD_DEFAULT,
    LC2_MODES,
    LC2_RESCUE,
    LC2_RESCUE_DEFAULT,
    build_lc2,
)
from regseg.stream.pipeline import Pipeline
from regseg.stream.quality import QualityCheck, QualityConfig
from regseg.stream.scanner_adapt import (
    SCANNER_ADAPT_DEFAULT,
    SCANNER_ADAPT_MODES,
    build_scanner_adapt,
)

LEVELS_MM = (0.0, 3.0, 5.0, 7.5, 10.0, 15.0, 25.0)
BAD_MM, GOOD_MM = 5.0, 2.0


def shift(direction: np.ndarray, mm: float) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = mm * direction
    return out


def tre_of(result) -> float:
    truth = result.frame.truth
    ji = np.argwhere(truth.labels > 0)
    if len(ji) < 50:
        return float("nan")
    ji = ji[np.linspace(0, len(ji) - 1, min(1000, len(ji))).astype(int)]
    return metrics.tre_mm(spatial.invert(result.mri_to_image), truth.image_to_mri, ji[:, ::-1])


def noise_frame(kind: str, rng: np.random.Generator, like) -> np.ndarray:
    hw = like.pixels.shape
    if kind == "uniform":
        return rng.integers(0, 256, hw, dtype=np.uint8)
    if kind == "gaussian":
        return np.clip(rng.normal(rng.uniform(60, 160), 40, hw), 0, 255).astype(np.uint8)
    speckle = np.sqrt(-2 * np.log(rng.random(hw) + 1e-9)).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), rng.uniform(0.7, 2.5))
    speckle = np.clip(speckle / speckle.mean() * rng.uniform(50, 120), 0, 255)
    return (speckle * (like.pixels > 0)).astype(np.uint8) if kind == "speckle_fan" else \
        speckle.astype(np.uint8)


def open_case(family: str, seed: int, n: int, *, halfway: bool = False) -> tuple:
    """(mri, labels, frames): ``n`` frames spread over a session of phantom ``seed`` (``halfway``:
    each half-way between two of those spread positions, e.g. a warm-up sweep's)."""
    if family == "a":
        phantom = make_phantom(seed)
        scanner = SimulatedScanner(phantom, seed=seed)
        step = scanner.config.sweep_frames * 2 // n
        start = step // 2 if halfway else 0
        return phantom.mri, phantom.labels, [scanner.frame(start + k * step) for k in range(n)]
    from regseg.sim.family_b.anatomy import make_case
    from regseg.sim.family_b.session import Session

    case = make_case(seed)
    session = Session(case, seed=seed * 7 + 3)
    step = 1200 // n
    start = step // 2 if halfway else 0
    return case.mri, case.labels, [session.frame(start + k * step) for k in range(n)]


#: Per-frame signals whose ROC AUC (bad vs good frames) is reported: (row key, +1 when a larger
#: value means a worse frame, -1 when a smaller one does)
SIGNALS = (("error_mm", 1), ("lc2_significance", -1), ("out_of_plane_mm", 1),
           ("lc2_move_mm", 1))


def rank_auc(bad: np.ndarray, good: np.ndarray) -> float | None:
    """P(a bad frame's value > a good frame's), ties half; None without both."""
    if not (bad.size and good.size):
        return None
    b, g = bad[:, None], good[None, :]
    return round(float((b > g).mean() + 0.5 * (b == g).mean()), 4)


def signal_aucs(rows: list[dict], bad: np.ndarray, good: np.ndarray) -> dict:
    """Each of :data:`SIGNALS`' ROC AUC over the frames where it is finite, with their counts."""
    out = {}
    for key, sign in SIGNALS:
        values = sign * np.array([r.get(key, np.nan) for r in rows], dtype=float)
        fin = np.isfinite(values)
        out[key] = {"auc": rank_auc(values[bad & fin], values[good & fin]),
                    "bad_frames": int((bad & fin).sum()), "good_frames": int((good & fin).sum())}
    return out


def rates(rows: list[dict]) -> dict:
    tre = np.array([r["tre_mm"] for r in rows])
    est = np.array([r["error_mm"] for r in rows])
    flagged = np.array([r["flagged"] for r in rows])
    by_estimate = np.array(["error_estimate" in r["flags"] for r in rows])
    by_others = np.array([any(f != "error_estimate" for f in r["flags"]) for r in rows])
    ok = np.isfinite(tre)
    tre, est, flagged, by_estimate, by_others = (tre[ok], est[ok], flagged[ok], by_estimate[ok],
                                                 by_others[ok])
    bad, good, fine = tre > BAD_MM, tre <= GOOD_MM, tre <= BAD_MM

    def reasons(of):
        counts: dict[str, int] = {}
        for r, sel in zip((r for r, k in zip(rows, ok, strict=True) if k), of, strict=True):
            for f in r["flags"] if sel else ():
                counts[f] = counts.get(f, 0) + 1
        return counts

    def share(mask, of):
        return round(float(mask[of].mean()), 4) if of.any() else None

    auc = rank_auc(est[bad], est[good])  # P(estimate of a bad frame > that of a good frame)
    return {
        "frames": int(ok.sum()), "tre_median_mm": round(float(np.median(tre)), 3),
        "tre_p90_mm": round(float(np.quantile(tre, 0.9)), 3),
        "bad_frames": int(bad.sum()), "good_frames": int(good.sum()),
        "detection": share(flagged, bad), "false_alarm_tre_le_2mm": share(flagged, good),
        "false_alarm_tre_le_5mm": share(flagged, fine),
        "detection_by_estimate": share(by_estimate, bad),
        "false_alarm_by_estimate_le_2mm": share(by_estimate, good),
        # every flag but the error estimate's (the image-based ones and the sanity checks)
        "detection_without_estimate": share(by_others, bad),
        "false_alarm_without_estimate_le_2mm": share(by_others, good),
        "auc_estimate_bad_vs_good": auc,
        "auc_by_signal": signal_aucs([r for r, k in zip(rows, ok, strict=True) if k], bad, good),
        "estimate_median_abs_error_mm": round(float(np.median(np.abs(est - tre))), 3),
        "estimate_median_bias_good_mm": (round(float(np.median(est[good] - tre[good])), 3)
                                         if good.any() else None),
        "flag_reasons_bad": reasons(bad), "flag_reasons_good": reasons(good),
    }


def case_interval(rows: list[dict], draws: int = 2000, seed: int = 0) -> dict:
    """Detection and false alarms (TRE <= 2 mm) with 95 % intervals from resampling whole cases
    (``seed`` of the rows) with replacement, ``draws`` times: how much the pooled rates depend on
    which cases were drawn."""
    cases = sorted({r["seed"] for r in rows})
    by_case = []
    for c in cases:
        mine = [r for r in rows if r["seed"] == c and np.isfinite(r["tre_mm"])]
        tre = np.array([r["tre_mm"] for r in mine])
        flagged = np.array([r["flagged"] for r in mine], dtype=bool)
        by_case.append((flagged[tre > BAD_MM], flagged[tre <= GOOD_MM]))
    rng = np.random.default_rng(seed)
    out = {"cases": len(cases), "draws": draws}
    for k, key in enumerate(("detection", "false_alarm_tre_le_2mm")):
        per = [b[k] for b in by_case]
        lo, hi = case_bootstrap(per, np.mean, rng.integers(0, len(cases), (draws, len(cases))))
        pooled = np.concatenate(per)
        out[key] = round(float(pooled.mean()), 4) if pooled.size else None
        out[f"{key}_lo"], out[f"{key}_hi"] = ((round(lo, 4), round(hi, 4)) if np.isfinite(lo)
                                              else (None, None))
    return out


def at_threshold(rows: list[dict], threshold_mm: float) -> list[dict]:
    """``rows`` as they would be with the ``error_estimate`` flag at ``threshold_mm`` (exact: no
    other flag and no stage of the chain depends on the threshold)."""
    out = []
    for r in rows:
        flags = [f for f in r["flags"] if f != "error_estimate"]
        if np.isfinite(r["error_mm"]) and r["error_mm"] > threshold_mm:
            flags.append("error_estimate")
        out.append({**r, "flags": flags, "flagged": bool(flags)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/trust.json")
    parser.add_argument("--family", choices=["a", "b"], default="a",
                        help="simulator family: a (training family; held-out phantoms) or b "
                        "(never trained on; regseg.sim.family_b, seeds 5000..)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="phantom seeds (default a: 1000-1003, b: 5000-5003)")
    parser.add_argument("--frames", type=int, default=30, help="frames per phantom and level")
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS_MM))
    parser.add_argument("--warmup", type=int, default=0,
                        help="frames run (not scored) after each registration change, spread over "
                        "the session between the scored ones: the sweep an operator makes after "
                        "registering, which the 3-D consensus (out_of_plane) needs (default 0)")
    parser.add_argument("--deformable", choices=["on", "off", "async", "lag"],
                        default=DEFORMABLE_DEFAULT,
                        help=f"as regseg-stream --deformable (default {DEFORMABLE_DEFAULT}); "
                        "async runs as lag, the same arithmetic in order")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lc2", choices=list(LC2_MODES), default=LC2_DEFAULT,
                        help=f"the image-based refinement, as regseg-stream --lc2 (default "
                        f"{LC2_DEFAULT})")
    parser.add_argument("--lc2-hold", choices=list(LC2_HOLD), default=LC2_HOLD_DEFAULT,
                        help=f"as regseg-stream --lc2-hold (default {LC2_HOLD_DEFAULT})")
    parser.add_argument("--lc2-rescue", choices=list(LC2_RESCUE), default=LC2_RESCUE_DEFAULT,
                        help=f"as regseg-stream --lc2-rescue (default {LC2_RESCUE_DEFAULT})")
    parser.add_argument("--no-lc2-flag", action="store_true",
                        help="no lc2_unsupported flag (the run its rule compares against: "
                        "bench/results/lc2_predeclared.md, addendum 5)")
    parser.add_argument("--consensus", choices=[*CONSENSUS_MODES, *CONSENSUS_BENCH_MODES],
                        default=CONSENSUS_DEFAULT,
                        help="the 3-D consensus and its out_of_plane flag, as regseg-stream "
                        f"--consensus (default {CONSENSUS_DEFAULT})")
    parser.add_argument("--intensity", choices=list(INTENSITY_MODES), default=INTENSITY_DEFAULT,
                        help="grey levels matched to the training scanner's, as regseg-stream "
                        f"--intensity (default {INTENSITY_DEFAULT})")
    parser.add_argument("--quality-weights", default=None,
                        help="QualityNet weights (default: the shipped ones)")
    parser.add_argument("--scanner-adapt", choices=list(SCANNER_ADAPT_MODES),
                        default=SCANNER_ADAPT_DEFAULT,
                        help="adapt the TRUS encoder's normalisation to each case's first frames "
                        f"with content, as regseg-stream --scanner-adapt (default "
                        f"{SCANNER_ADAPT_DEFAULT}; built at once, not on a thread)")
    parser.add_argument("--estimate-check", choices=list(ESTIMATE_CHECK_MODES),
                        default=ESTIMATE_CHECK_DEFAULT,
                        help="check the error estimate on each case's first frames against a "
                        "known 4 mm displacement, as regseg-stream --estimate-check (default "
                        f"{ESTIMATE_CHECK_DEFAULT})")
    parser.add_argument("--deformable-weights", default="plcreg2d",
                        help="PLCReg 2-D weights (default: the shipped ones)")
    parser.add_argument("--compare-thresholds", type=float, nargs="*", default=[],
                        help="also report the pooled rates with the error_estimate flag at "
                        "these thresholds (mm), from the same frames")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [1000, 1001, 1002, 1003] if args.family == "a" else [5000, 5001, 5002, 5003]
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    engine = FusionEngine("alignsegnet", backend="eager")
    rows, noise_rows, untracked_rows, check_info = [], [], [], {}
    for seed in args.seeds:
        mri, labels, frames = open_case(args.family, seed, args.frames)
        sweep = open_case(args.family, seed, args.warmup, halfway=True)[2] if args.warmup else []
        context = build_context(mri, labels)
        deformable = build_deformable(context, args.deformable_weights, backend="eager",
                                      mode=deformable_in_order(args.deformable))  # async: lag
        quality = QualityCheck(context, QualityConfig(
            **({"weights": args.quality_weights} if args.quality_weights else {})))
        pipeline = Pipeline(context, engine, deformable=deformable, quality=quality,
                            capture=build_default_capture(backend="eager", threads=args.threads),
                            lc2=build_lc2(context, in_order(args.lc2), args.lc2_hold,
                                          args.lc2_rescue),
                            resegment=RESEGMENT_DEFAULT == "on",
                            consensus=build_consensus(args.consensus),
                            intensity=build_intensity(args.intensity),
                            scanner_adapt=build_scanner_adapt(args.scanner_adapt,
                                                              background=False))
        quality.self_check = build_estimate_check(args.estimate_check)
        if pipeline.lc2 is not None:
            pipeline.lc2.flag_unsupported = not args.no_lc2_flag
        rng = np.random.default_rng([seed, 99])
        for level in args.levels:
            d = rng.standard_normal(3)
            pipeline.set_reference_to_mri(shift(d / np.linalg.norm(d), level))
            for frame in sweep:  # --warmup: the sweep after a new registration, not scored
                pipeline(frame)
            for frame in frames:
                result = pipeline(frame)
                rows.append({"seed": seed, "level_mm": level, "tre_mm": tre_of(result),
                             "error_mm": result.error_mm, "flags": list(result.flags),
                             "flagged": result.flagged,
                             "lc2_significance": result.lc2_significance,
                             "out_of_plane_mm": result.out_of_plane_mm,
                             "lc2_move_mm": result.lc2_move_mm,
                             "estimate_check": result.estimate_check})
        pipeline.set_reference_to_mri(np.eye(4))
        for k, frame in enumerate(frames[:12]):
            kind = ("uniform", "gaussian", "speckle", "speckle_fan")[k % 4]
            noisy = replace(frame, pixels=noise_frame(kind, rng, frame), truth=None)
            result = pipeline(noisy)
            noise_rows.append({"kind": kind, "flagged": result.flagged, "flags": list(result.flags),
                               "labels_px": int(np.count_nonzero(result.labels)),
                               "error_mm": result.error_mm})
            result = pipeline(replace(frame, image_to_reference=None))
            untracked_rows.append({"flagged": result.flagged, "flags": list(result.flags)})
        if quality.self_check is not None:  # rank and gap behind the verdict, per case
            check_info[str(seed)] = quality.self_check.info()
        print(f"phantom {seed} done ({time.monotonic() - t0:.0f} s)", flush=True)
    summary = {
        "command": shlex.join(["python", "bench/trust.py", *(argv or sys.argv[1:])]),
        "machine": machine_name(), "date": utc_now(), "load_average": load_average(),
        "family": args.family, "seeds": args.seeds, "warmup": args.warmup,
        "deformable": args.deformable, "lc2": args.lc2, "lc2_hold": args.lc2_hold,
        "lc2_rescue": args.lc2_rescue,
        "consensus": args.consensus,
        "scanner_adapt": args.scanner_adapt, "estimate_check": args.estimate_check,
        "estimate_check_verdicts": {seed: info["status"] for seed, info in check_info.items()},
        "estimate_check_info": check_info,
        "quality_weights": args.quality_weights, "deformable_weights": args.deformable_weights,
        "threshold_mm": pipeline.quality.threshold_mm,
        "quality_calibration": pipeline.quality.calibration_info,
        "per_level": {str(level): rates([r for r in rows if r["level_mm"] == level])
                      for level in args.levels},
        "pooled": rates(rows),
        "pooled_case_interval": case_interval(rows),
        "pooled_at_threshold": {str(t): rates(at_threshold(rows, t))
                                for t in args.compare_thresholds},
        "normal_tracking_at_threshold": {
            str(t): rates(at_threshold([r for r in rows if r["level_mm"] == args.levels[0]], t))
            for t in args.compare_thresholds},
        "noise": {"frames": len(noise_rows),
                  "flagged": float(np.mean([r["flagged"] for r in noise_rows])),
                  "labels_published": float(np.mean([r["labels_px"] > 0 for r in noise_rows])),
                  "reasons": {f: int(sum(f in r["flags"] for r in noise_rows))
                              for f in ("no_content", "no_gland", "error_estimate")}},
        "untracked": {"frames": len(untracked_rows),
                      "flagged_untracked": float(np.mean(["untracked" in r["flags"]
                                                          for r in untracked_rows]))},
        "seconds": round(time.monotonic() - t0, 1),
        "frames_detail": rows,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in ("quality_calibration", "pooled",
                                              "pooled_at_threshold", "noise", "untracked")},
                     indent=2))
    for level, r in summary["per_level"].items():
        print(f"{level:>5} mm: TRE med {r['tre_median_mm']:.2f} bad {r['bad_frames']:3d} "
              f"good {r['good_frames']:3d} det {r['detection']} FA<=2 {r['false_alarm_tre_le_2mm']}"
              f" FA<=5 {r['false_alarm_tre_le_5mm']} AUC {r['auc_estimate_bad_vs_good']}"
              f" reasons good {r['flag_reasons_good']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
