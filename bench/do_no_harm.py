"""Do no harm, measured: per frame, tracked vs registered vs the gated choice (stream/do_no_harm).

``python bench/do_no_harm.py --family a --out bench/results/do_no_harm_a.json`` runs the live
chain as ``regseg-stream`` builds it (``regseg.stream.build``: K = 2, the deformable stage, the
temporal filter; the gate OFF, so nothing here depends on the margin) on frames made exactly as
``bench/accuracy.py`` makes them (an in-plane rigid tracking error of L mm and L deg plus 0.5 mm /
0.5 deg out of plane, consecutive frames 4 apart in a session). Per frame it records everything a
gate at ANY margin and window would have published: the TRE of the tracked and of the registered
plane, the gate's two estimates (:meth:`regseg.stream.do_no_harm.CorrectionGate.estimates`), the
error estimate and flag inputs of each alternative (tracked with and without the deformable
stage), and the Dice of their MRI labels. :func:`simulate` then replays the gate over the records
(exact: the gate does not feed back into the chain), and :func:`choose` picks margin and window.

Family A defaults to the CALIBRATION phantoms 3100-3107 (the choice is made there only), family B
to its evaluation cases 5000-5003 (measured once, with the choice made on A: ``--choice``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import family_a_frames, family_b_frames  # noqa: E402
from common import load_average  # noqa: E402

from regseg import metrics, spatial  # noqa: E402
from regseg.machine import machine_name, utc_now  # noqa: E402
from regseg.stream.deformable_lag import bench_stage  # noqa: E402
from regseg.stream.lc2_lag import in_order  # noqa: E402
from regseg.types import LESION, PROSTATE  # noqa: E402

LEVELS = (0.0, 3.0, 6.0, 10.0, 15.0)
CALIB_SEEDS_A = tuple(range(3100, 3108))  # QualityNet calibration phantoms (never evaluation)
EVAL_SEEDS_B = tuple(range(5000, 5004))
BAD_MM, GOOD_MM = 5.0, 2.0
MARGINS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
TIE_MM = 0.005  # mean TRE this close to the best counts as a tie
#: The "small corrections only" variant's bound (regseg.stream.do_no_harm.MAX_CORRECTION_MM when
#: set): QualityConfig.jump_threshold_mm, the chain's bound on a plausible change of correction.
SMALL_MM = 3.0
WINDOWS = (1, 3, 5)
#: A choice may cost family A at most this much median TRE at any level >= 3 mm (its capture).
CAPTURE_TOLERANCE_MM = 0.1


def _tre(plane: np.ndarray, truth) -> float:
    ji = np.argwhere(truth.labels > 0)
    if len(ji) == 0:
        return math.nan
    ji = ji[np.linspace(0, len(ji) - 1, min(1000, len(ji))).astype(int)]
    return metrics.tre_mm(plane, truth.image_to_mri, ji[:, ::-1].astype(np.float64))


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    return float(metrics.dice(a, b, label))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = int(a.sum()) + int(b.sum())
    return math.nan if total == 0 else 2.0 * int((a & b).sum()) / total


def record_frames(family: str, seeds, levels, n: int, threads: int) -> list[dict]:
    """Run the chain (gate off) and record every alternative per frame."""
    from regseg.stream.build import (
        build_default_capture,
        build_deformable,
        build_engine,
        build_pipeline,
    )
    from regseg.stream.capture import warp_labels
    from regseg.stream.context import build_context
    from regseg.stream.do_no_harm import CorrectionGate, correction_mm

    engine = build_engine(threads=threads)
    records = []
    for seed in seeds:
        case = None
        if family == "B":
            from regseg.sim.family_b.anatomy import make_case
            case = make_case(seed)
        context = stage = None
        for level in levels:
            t0 = time.perf_counter()
            mri, labels, frames = (family_a_frames(seed, level, n) if family == "A"
                                   else family_b_frames(seed, level, n, case))
            if context is None:
                context = build_context(mri, labels)
                stage = build_deformable(context, threads=threads)
            pipeline = build_pipeline(context, engine, deformable=bench_stage(stage),
                                      do_no_harm="off",
                                      capture=build_default_capture(threads=threads),
                                      lc2=in_order("default"))
            estimator = pipeline.quality.estimator
            by_chain = estimator.calibration.get("by_chain") or {}
            lowest = min((c["threshold_mm"] for c in by_chain.values()),
                         default=pipeline.quality.threshold_mm)
            for frame in frames:
                res = pipeline(frame)
                truth, hw = frame.truth, frame.pixels.shape
                p_t, p_r = pipeline.plane(frame), spatial.invert(res.mri_to_image)
                g0 = time.perf_counter()
                est_t, est_r = CorrectionGate.estimates(estimator, frame.pixels, p_t, p_r)
                gate_ms = (time.perf_counter() - g0) * 1e3
                lab_t = warp_labels(context, p_t, hw)
                lab_r = warp_labels(context, p_r, hw)
                lab_td, _ = stage(frame.pixels, p_t)
                variants = {"reg": res.warped_labels, "reg_affine": lab_r, "trk": lab_t,
                            "trk_def": lab_td}
                rec = {"family": family, "phantom": seed, "level": level, "seq": frame.seq,
                       "tre_tracked_mm": _tre(p_t, truth), "tre_registered_mm": _tre(p_r, truth),
                       "est_tracked": est_t, "est_registered": est_r, "gate_ms": gate_ms,
                       "correction_mm": correction_mm(p_t, p_r, hw),
                       "pub_est_reg": float(res.error_mm),
                       "pub_est_trk": estimator(frame.pixels, p_t, lab_t),
                       "pub_est_trk_def": estimator(frame.pixels, p_t, lab_td),
                       "threshold_mm": float(pipeline.quality.threshold_mm),
                       "threshold_lowest_mm": float(lowest),
                       "jump_mm": float(res.jump_mm), "flags_reg": list(res.flags),
                       "dice_seg": _dice(res.labels, truth.labels, PROSTATE)}
                for name, lab in variants.items():
                    rec[f"dice_{name}"] = _dice(lab, truth.labels, PROSTATE)
                    rec[f"lesion_{name}"] = _dice(lab, truth.labels, LESION)
                    rec[f"agree_{name}"] = _agreement(lab, res.labels)
                records.append(rec)
            mine = [r for r in records if r["phantom"] == seed and r["level"] == level]
            print(f"  {family} {seed} level {level:g}: TRE tracked "
                  f"{np.median([r['tre_tracked_mm'] for r in mine]):.2f} registered "
                  f"{np.median([r['tre_registered_mm'] for r in mine]):.2f} mm; est t/r "
                  f"{np.median([r['est_tracked'] for r in mine]):.2f}/"
                  f"{np.median([r['est_registered'] for r in mine]):.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return records


def _weights() -> dict[str, str]:
    """sha256 (12 hex) of the shipped weights the chain ran with (AlignSegNet may be retrained)."""
    import hashlib

    from regseg.models.qualitynet import WEIGHTS

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            for p in (WEIGHTS.parent / n for n in ("alignsegnet.pt", "plcreg2d.pt",
                                                   "qualitynet.pt")) if p.is_file()}


# ------------------------------------------------------------------------------ replay
def _runs(records: list[dict]):
    """Records grouped per (family, phantom, level) run, in frame order."""
    keys = sorted({(r["family"], r["phantom"], r["level"]) for r in records})
    for key in keys:
        yield sorted((r for r in records if (r["family"], r["phantom"], r["level"]) == key),
                     key=lambda r: r["seq"])


def simulate(records: list[dict], margin: float | None, window: int = 1,
             deformable_on_tracked: bool = False, tracked_must_pass: bool = False,
             max_correction_mm: float = math.inf) -> list[dict]:
    """What the chain publishes per frame with the gate at ``margin``/``window`` (None: no gate).

    The same rule as :class:`regseg.stream.do_no_harm.CorrectionGate` (median of the last
    ``window`` differences, history dropped where ``jump_mm`` is NaN); the flags re-judged on what
    is published: ``error_estimate`` from its estimate at the chain's threshold (the lowest
    calibrated one for a tracked plane), ``disagreement`` from its labels, the other flags as the
    chain raised them. ``tracked_must_pass``: tracked only where its pair's estimate is at most
    that threshold (CorrectionGate's option of the same name); ``max_correction_mm``: only a
    registration moving the frame by at most this much may be withheld (the records must have
    ``correction_mm``)."""
    out = []
    for run in _runs(records):
        gains: list[float] = []
        for r in run:
            if margin is None:
                tracked = False
            else:
                if not math.isfinite(r["jump_mm"]):
                    gains = []
                gains = (gains + [r["est_tracked"] - r["est_registered"]])[-window:]
                passes = r["est_tracked"] <= r["threshold_lowest_mm"] or not tracked_must_pass
                small = (math.isinf(max_correction_mm)
                         or r["correction_mm"] <= max_correction_mm)
                tracked = not float(np.median(gains)) > margin and passes and small
            v = ("trk_def" if deformable_on_tracked else "trk") if tracked else "reg"
            est = {"reg": r["pub_est_reg"], "trk": r["pub_est_trk"],
                   "trk_def": r["pub_est_trk_def"]}[v]
            flags = [f for f in r["flags_reg"] if f not in ("error_estimate", "disagreement")]
            # tracked pairs have no calibration of their own: the lowest calibrated threshold
            # (QualityCheck.bind_chain's rule for an uncalibrated chain), as the live path does
            if est > r["threshold_mm" if v == "reg" else "threshold_lowest_mm"]:
                flags.append("error_estimate")
            if r[f"agree_{v}"] < 0.5:
                flags.append("disagreement")
            out.append({**r, "tracked": tracked, "flags": flags, "flagged": bool(flags),
                        "tre_mm": r["tre_tracked_mm"] if tracked else r["tre_registered_mm"],
                        "dice_mri": r[f"dice_{v}"], "lesion_mri": r[f"lesion_{v}"]})
    return out


def summary(frames: list[dict]) -> dict:
    """TRE median/p90, registered-label Dice, share tracked, flips, detection/false alarm."""
    def q(key, p):
        v = np.asarray([f[key] for f in frames], np.float64)
        v = v[np.isfinite(v)]
        return round(float(np.percentile(v, p)), 3) if v.size else None

    tre = np.asarray([f["tre_mm"] for f in frames])
    flagged = np.asarray([f["flagged"] for f in frames], bool)
    bad, good = tre > BAD_MM, tre <= GOOD_MM
    flips = sum(a["tracked"] != b["tracked"] for a, b in zip(frames, frames[1:], strict=False)
                if (a["phantom"], a["level"]) == (b["phantom"], b["level"]))
    lesion = np.asarray([f["lesion_mri"] for f in frames], np.float64)
    shown = tre[~flagged]  # published as truth: MRIToImage and MRI labels sent
    return {"frames": len(frames), "tre_median_mm": q("tre_mm", 50), "tre_p90_mm": q("tre_mm", 90),
            "tre_mean_mm": round(float(np.nanmean(tre)), 3),
            "dice_mri": round(float(np.nanmean([f["dice_mri"] for f in frames])), 4),
            "lesion_mri": (round(float(np.nanmean(lesion)), 4) if np.isfinite(lesion).any()
                           else None),
            "tracked_pct": round(100.0 * float(np.mean([f["tracked"] for f in frames])), 1),
            "flips": int(flips), "n_bad": int(bad.sum()), "n_good": int(good.sum()),
            "detection": round(float(flagged[bad].mean()), 4) if bad.any() else None,
            "false_alarm": round(float(flagged[good].mean()), 4) if good.any() else None,
            "flagged_pct": round(100.0 * float(flagged.mean()), 1),
            "published": int(shown.size),
            "published_tre_median_mm": (round(float(np.nanmedian(shown)), 3) if shown.size
                                        else None),
            "published_over_2mm": int((shown > GOOD_MM).sum()),
            "published_over_5mm": int((shown > BAD_MM).sum())}


def table(records: list[dict], margin: float, window: int,
          deformable_on_tracked: bool = True) -> list[dict]:
    """Rows per family and level (and pooled): tracked, registered and gated side by side;
    ``*_pass``: the gate with ``tracked_must_pass``; ``published*``: frames not flagged (sent
    as truth) and how many of them are off by more than 2 mm."""
    rows = []
    fams = sorted({r["family"] for r in records})
    for fam in fams:
        mine = [r for r in records if r["family"] == fam]
        for level in [*sorted({r["level"] for r in mine}), None]:
            sel = [r for r in mine if level is None or r["level"] == level]
            reg = summary(simulate(sel, None))
            gated = summary(simulate(sel, margin, window, deformable_on_tracked))
            other = summary(simulate(sel, margin, window, not deformable_on_tracked))
            must = summary(simulate(sel, margin, window, deformable_on_tracked, True))
            # records made before correction_mm was recorded: no "small" variant (None)
            small = (summary(simulate(sel, margin, window, deformable_on_tracked,
                                      max_correction_mm=SMALL_MM))
                     if all("correction_mm" in r for r in sel) else defaultdict(lambda: None))
            trk = np.asarray([r["tre_tracked_mm"] for r in sel])
            rows.append({
                "name": f"{fam} {'all levels' if level is None else f'{level:g}mm/{level:g}deg'}",
                "family": fam, "level": level, "frames": len(sel),
                "tre_tracked_median_mm": round(float(np.nanmedian(trk)), 3),
                "tre_tracked_p90_mm": round(float(np.nanpercentile(trk, 90)), 3),
                "tre_registered_median_mm": reg["tre_median_mm"],
                "tre_registered_p90_mm": reg["tre_p90_mm"],
                "tre_gated_median_mm": gated["tre_median_mm"],
                "tre_gated_p90_mm": gated["tre_p90_mm"],
                "tracked_pct": gated["tracked_pct"], "flips": gated["flips"],
                "dice_mri_registered": reg["dice_mri"], "dice_mri_gated": gated["dice_mri"],
                "dice_mri_gated_other": other["dice_mri"],
                "lesion_mri_registered": reg["lesion_mri"], "lesion_mri_gated": gated["lesion_mri"],
                "lesion_mri_gated_other": other["lesion_mri"],
                "flagged_pct_registered": reg["flagged_pct"],
                "flagged_pct_gated": gated["flagged_pct"],
                "detection_registered": reg["detection"], "n_bad_registered": reg["n_bad"],
                "detection_gated": gated["detection"], "n_bad_gated": gated["n_bad"],
                "false_alarm_registered": reg["false_alarm"], "n_good_registered": reg["n_good"],
                "false_alarm_gated": gated["false_alarm"], "n_good_gated": gated["n_good"],
                "tre_gated_pass_median_mm": must["tre_median_mm"],
                "tre_gated_pass_p90_mm": must["tre_p90_mm"],
                "tracked_pct_pass": must["tracked_pct"], "dice_mri_gated_pass": must["dice_mri"],
                "detection_gated_pass": must["detection"],
                "false_alarm_gated_pass": must["false_alarm"],
                "tre_gated_small_median_mm": small["tre_median_mm"],
                "tre_gated_small_p90_mm": small["tre_p90_mm"],
                "tracked_pct_small": small["tracked_pct"],
                "dice_mri_gated_small": small["dice_mri"],
                "detection_gated_small": small["detection"],
                "false_alarm_gated_small": small["false_alarm"],
                **{f"{k}_{name}": v[k] for name, v in (("registered", reg), ("gated", gated),
                                                       ("gated_pass", must),
                                                       ("gated_small", small))
                   for k in ("published", "published_tre_median_mm", "published_over_2mm")}})
    return rows


def choose(records: list[dict]) -> dict:
    """Margin, window and the deformable stage on family-A records. Margin and window: the
    lowest mean gated TRE over all frames, among the choices whose median TRE at every level
    >= 3 mm is within CAPTURE_TOLERANCE_MM of the registration's (the capture is not given
    away); of the choices tied with it (within TIE_MM), the window with the most tied margins
    and the median of its tied margins (the middle of the plateau: robust to a shift of the
    estimates). Deformable stage on the tracked plane: if it gives the published MRI labels a
    higher mean prostate Dice than skipping it."""
    levels = sorted({r["level"] for r in records})
    reg = {lv: summary(simulate([r for r in records if r["level"] == lv], None))
           for lv in levels}
    grid = []
    for window in WINDOWS:
        for margin in MARGINS:
            by = {lv: summary(simulate([r for r in records if r["level"] == lv], margin, window))
                  for lv in levels}
            ok = all(by[lv]["tre_median_mm"] <= reg[lv]["tre_median_mm"] + CAPTURE_TOLERANCE_MM
                     for lv in levels if lv >= 3.0)
            pooled = summary(simulate(records, margin, window))
            grid.append({"margin_mm": margin, "window": window, "keeps_capture": ok,
                         "tre_mean_mm": pooled["tre_mean_mm"],
                         "tracked_pct": pooled["tracked_pct"], "flips": pooled["flips"],
                         "median_by_level": {str(lv): by[lv]["tre_median_mm"] for lv in levels}})
    fine = [g for g in grid if g["keeps_capture"]]
    best = None
    if fine:
        low = min(g["tre_mean_mm"] for g in fine)
        tied = [g for g in fine if g["tre_mean_mm"] <= low + TIE_MM]
        window = max(WINDOWS, key=lambda w: (sum(g["window"] == w for g in tied), -w))
        margins = sorted(g["margin_mm"] for g in tied if g["window"] == window)
        middle = margins[(len(margins) - 1) // 2]
        best = dict(next(g for g in tied if g["window"] == window and g["margin_mm"] == middle))
        best["tied_margins_mm"] = margins
        skip = summary(simulate(records, middle, window))["dice_mri"]
        deform = summary(simulate(records, middle, window, deformable_on_tracked=True))["dice_mri"]
        best.update(deformable_on_tracked=bool(deform >= skip), dice_mri_skip=skip,
                    dice_mri_deformable=deform)
    none = summary(simulate(records, None))
    return {"rule": " ".join(choose.__doc__.split()),
            "registered_tre_mean_mm": none["tre_mean_mm"], "best": best, "grid": grid}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["a", "b"], default="a",
                   help="a: calibration phantoms 3100.. (the choice is made here); b: 5000..")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="phantom seeds (default a: 3100-3107, b: 5000-5003)")
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS),
                   help="tracking-error levels, mm = deg (default 0 3 6 10 15)")
    p.add_argument("--frames", type=int, default=8, help="frames per phantom and level")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--records", default=None,
                   help="replay these recorded frames (a previous --out JSON) instead of running")
    p.add_argument("--choice", default=None,
                   help="JSON of a family-A run: report at its chosen margin/window")
    p.add_argument("--out", default="/tmp/do_no_harm.json", help="JSON to write")
    args = p.parse_args(argv)
    family = args.family.upper()
    t0 = time.perf_counter()
    if args.records:
        data = json.loads(Path(args.records).read_text())
        records, meta = data["frames_detail"], {k: data.get(k) for k in (
            "command", "machine", "date", "load_average", "record_seconds", "weights",
            "weights_note")}
        meta["replay_command"] = shlex.join(["python", "bench/do_no_harm.py",
                                             *(argv or sys.argv[1:])])
    else:
        torch.set_num_threads(args.threads)
        seeds = args.seeds or (CALIB_SEEDS_A if family == "A" else EVAL_SEEDS_B)
        records = record_frames(family, seeds, args.levels, args.frames, args.threads)
        meta = {"command": shlex.join(["python", "bench/do_no_harm.py", *(argv or sys.argv[1:])]),
                "machine": machine_name(), "date": utc_now(), "load_average": load_average(),
                "record_seconds": round(time.perf_counter() - t0, 1), "weights": _weights()}
    if args.choice:
        chosen = json.loads(Path(args.choice).read_text())["choice"]["best"]
        choice = {"from": args.choice, "best": chosen}
    else:
        if family != "A":
            p.error("--family b needs --choice (a family-A run's JSON): never choose on B")
        choice = choose(records)
    best = choice["best"]
    rows = (table(records, best["margin_mm"], best["window"], best["deformable_on_tracked"])
            if best else [])
    gate_ms = np.asarray([r["gate_ms"] for r in records])
    out = {**meta, "family": family, "choice": choice, "small_correction_mm": SMALL_MM,
           "results": rows,
           "gate_ms": {"p50": round(float(np.median(gate_ms)), 3),
                       "p90": round(float(np.percentile(gate_ms, 90)), 3)},
           "frames_detail": records}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # the summary indented, the per-frame records one compact line each (floats to 4 places)
    detail = ",\n".join(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                    for k, v in r.items()}, separators=(",", ":"))
                        for r in records)
    text = json.dumps({**out, "frames_detail": "@DETAIL@"}, indent=1)
    Path(args.out).write_text(text.replace('"@DETAIL@"', "[\n" + detail + "\n]") + "\n")
    print(f"choice: {json.dumps(best)}")
    for r in rows:
        print(f"{r['name']:>18}: TRE med tracked {r['tre_tracked_median_mm']:.2f} registered "
              f"{r['tre_registered_median_mm']:.2f} gated {r['tre_gated_median_mm']:.2f} | p90 "
              f"{r['tre_tracked_p90_mm']:.2f} {r['tre_registered_p90_mm']:.2f} "
              f"{r['tre_gated_p90_mm']:.2f} | tracked {r['tracked_pct']:.0f}% flips {r['flips']}"
              f" | Dice MRI {r['dice_mri_registered']:.3f} -> {r['dice_mri_gated']:.3f} "
              f"(other {r['dice_mri_gated_other']:.3f}) | det {r['detection_registered']} -> "
              f"{r['detection_gated']} FA {r['false_alarm_registered']} -> "
              f"{r['false_alarm_gated']}")
        print(f"{'':>18}  must-pass: TRE med {r['tre_gated_pass_median_mm']:.2f} p90 "
              f"{r['tre_gated_pass_p90_mm']:.2f} tracked {r['tracked_pct_pass']:.0f}% | published"
              f" (n, median, > 2 mm) registered {r['published_registered']} "
              f"{r['published_tre_median_mm_registered']} {r['published_over_2mm_registered']}"
              f"; gated {r['published_gated']} {r['published_tre_median_mm_gated']} "
              f"{r['published_over_2mm_gated']}; must-pass {r['published_gated_pass']} "
              f"{r['published_tre_median_mm_gated_pass']} {r['published_over_2mm_gated_pass']}")
        print(f"{'':>18}  small-only: TRE med {r['tre_gated_small_median_mm']} p90 "
              f"{r['tre_gated_small_p90_mm']} tracked {r['tracked_pct_small']}% Dice "
              f"{r['dice_mri_gated_small']} | published {r['published_gated_small']} "
              f"{r['published_tre_median_mm_gated_small']} "
              f"{r['published_over_2mm_gated_small']} | det {r['detection_gated_small']} FA "
              f"{r['false_alarm_gated_small']}")
    print(f"gate {out['gate_ms']} ms; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
