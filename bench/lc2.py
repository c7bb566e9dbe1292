"""Image-based refinement (``--lc2 on``) against the network alone, on family-A validation frames.

The decision data for ``regseg.stream.lc2_stage.LC2_DEFAULT``: the live chain as
``regseg-stream`` builds it (deformable stage, default capture, temporal filter), with ``--lc2
off`` and ``--lc2 on`` on the same frames, on family-A CALIBRATION phantoms (3102..: never the
held-out 1000.. nor family B) in three sets: the plain demo scanner, small glands in an 84 x 70 mm
view, and a randomised scanner per phantom (``bench/roi.py``'s sets); at tracking errors of
0/3/6/10/15 mm and deg in plane (the ``bench/accuracy.py`` model). Per set, level and mode:
prostate Dice of the published MRI labels, tissue TRE (``regseg.metrics.tissue_tre_mm``) median
and p90, plane TRE median, flagged share, the stage's time; pooled over the sets the same. The
rule (``bench/results/lc2_predeclared.md``): ``on`` becomes the default if, pooled, its tissue-TRE
median is not worse by > 0.05 mm and its p90 by > 0.25 mm at any level, and its median pooled
over all levels is lower.

``python bench/lc2.py [--quick] [--json F]`` (full: 4 phantoms x 6 frames; quick: 1 phantom x 2
frames, levels 0/10).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, write_json  # noqa: E402
from roi import case, chain_results  # noqa: E402

from regseg import metrics  # noqa: E402
from regseg.stream.lc2_stage import BENCH_MODES  # noqa: E402
from regseg.types import PROSTATE  # noqa: E402

SEED0 = 3102  # family-A calibration phantoms; 3100-3101 served the feasibility check
SETS = ("plain", "small-wide", "randomised")
MODES = ("off", "on")  # --modes may add "warm" (the addendum in lc2_predeclared.md)
WARM_TIME_RATIO = 0.6
MEDIAN_SLACK_MM, P90_SLACK_MM = 0.05, 0.25


def _case(name: str, seed: int):
    if name == "plain":
        from regseg.sim.phantom import make_phantom
        from regseg.sim.scanner import ScannerConfig

        return make_phantom(seed), ScannerConfig(tracking_rot_deg=0.0, tracking_shift_mm=0.0,
                                                 tracking_scale=0.0, out_of_plane_mm=0.0)
    return case(name, seed)


def summary(name: str, records: list[dict]) -> dict:
    """One row: Dice, tissue and plane TRE, flagged share and the stage's time."""
    def arr(key):
        return np.asarray([r[key] for r in records], dtype=np.float64)

    tissue, plane = arr("tissue_tre_mm"), arr("tre_mm")
    tissue, plane = tissue[np.isfinite(tissue)], plane[np.isfinite(plane)]
    lc2_ms = arr("lc2_ms")
    return {"name": name, "frames": len(records), "dice": float(np.nanmean(arr("dice"))),
            "tre_median_mm": float(np.median(tissue)) if tissue.size else math.nan,
            "tre_p90_mm": float(np.percentile(tissue, 90)) if tissue.size else math.nan,
            "plane_tre_median_mm": float(np.median(plane)) if plane.size else math.nan,
            "flagged_pct": 100.0 * float(np.mean(arr("flagged"))) if records else math.nan,
            "lc2_ms": float(np.nanmedian(lc2_ms)) if np.isfinite(lc2_ms).any() else math.nan}


def run(phantoms: int, levels: list[float], n: int, threads: int, *, seed0: int = SEED0,
        modes: tuple[str, ...] = MODES,
        out_of_plane: float | None = None) -> tuple[list[dict], dict]:
    from regseg.stream.runner import frame_accuracy

    records: dict[tuple[str, float, str], list] = {
        (name, level, mode): [] for name in SETS for level in levels for mode in modes}
    for name, level, mode, pipeline, result in chain_results(
            SETS, range(seed0, seed0 + phantoms), levels, modes, n, threads, "lc2", _case,
            out_of_plane=out_of_plane):
        dice, tre = frame_accuracy(pipeline, result)
        records[(name, level, mode)].append({
            "dice": metrics.dice(result.warped_labels, result.frame.truth.labels, PROSTATE),
            "tissue_tre_mm": tre.get("registered_tissue", math.nan),
            "tre_mm": tre.get("registered", math.nan),
            "flagged": bool(result.flagged),
            "lc2_ms": result.timings_ms.get("lc2", math.nan)})
    rows = []
    for level in levels:
        for mode in modes:
            pooled = sum((records[(s, level, mode)] for s in SETS), [])
            rows.append({**summary(f"pooled {level:g}mm {mode}", pooled), "set": "pooled",
                         "level_mm": level, "mode": mode})
    for mode in modes:
        every = sum((v for (s, lv, m), v in records.items() if m == mode), [])
        rows.append({**summary(f"pooled all levels {mode}", every), "set": "pooled",
                     "level_mm": "all", "mode": mode})
    for (name, level, mode), recs in records.items():
        rows.append({**summary(f"{name} {level:g}mm {mode}", recs), "set": name,
                     "level_mm": level, "mode": mode})
    decision = decide(rows, levels)
    for variant in ("warm", "fast"):
        if variant in modes:
            decision[variant] = decide_warm(rows, levels, variant)
    if {"on-slice", "on-volume"} <= set(modes):  # addendum 3: the plane slice against the volume
        decision["slice"] = decide_warm(rows, levels, "on-slice", "on-volume")
    if "on-unguarded" in modes:  # addendum 4: the significance guard
        decision["guard"] = decide_guard(rows, levels)
    if "six" in modes:  # addendum 6: the six-parameter search
        decision["six"] = decide_six(rows, levels)
    return rows, decision


def _slack(pooled: dict, levels: list[float], base: str, mode: str, say: str = "") -> list[str]:
    """Where ``mode``'s pooled tissue TRE is worse than ``base``'s by more than the slack (a
    missing number never passes)."""
    worse = []
    for level in levels:
        b, m = pooled[(level, base)], pooled[(level, mode)]
        for key, slack, what in (("tre_median_mm", MEDIAN_SLACK_MM, "median"),
                                 ("tre_p90_mm", P90_SLACK_MM, "p90")):
            if not m[key] <= b[key] + slack:
                worse.append(f"{say}{level:g} mm {what} {b[key]:.2f} -> {m[key]:.2f}")
    return worse


def _pooled(rows: list[dict]) -> dict:
    return {(r["level_mm"], r["mode"]): r for r in rows if r["set"] == "pooled"}


def decide(rows: list[dict], levels: list[float], mode: str = "on") -> dict:
    """The predeclared rule on the pooled rows: is ``mode`` fit to be the default?"""
    pooled = _pooled(rows)
    worse = _slack(pooled, levels, "off", mode)
    off_all, on_all = pooled[("all", "off")], pooled[("all", mode)]
    if not on_all["tre_median_mm"] < off_all["tre_median_mm"]:
        worse.append(f"all levels median {off_all['tre_median_mm']:.2f} -> "
                     f"{on_all['tre_median_mm']:.2f} (not lower)")
    return {"on_as_default": not worse, "worse": worse, "median_slack_mm": MEDIAN_SLACK_MM,
            "p90_slack_mm": P90_SLACK_MM}


def decide_warm(rows: list[dict], levels: list[float], variant: str = "warm",
                base: str = "on") -> dict:
    """The addenda's rule: ``variant`` (warm, fast; or on against on-volume, addendum 3)
    replaces ``base`` if it passes :func:`decide` against off, is not worse than ``base`` by the
    same slack at any level, and takes at most WARM_TIME_RATIO of its median stage time."""
    pooled = _pooled(rows)
    worse = decide(rows, levels, variant)["worse"] + _slack(pooled, levels, base, variant,
                                                            f"vs {base}: ")
    ratio = pooled[("all", variant)]["lc2_ms"] / pooled[("all", base)]["lc2_ms"]
    if not ratio <= WARM_TIME_RATIO:
        worse.append(f"time ratio {ratio:.2f} > {WARM_TIME_RATIO}")
    return {f"{variant}_as_default": not worse, "worse": worse, "time_ratio": ratio}


def decide_guard(rows: list[dict], levels: list[float]) -> dict:
    """Addendum 4: the significance guard stays in ``on`` if guarded ``on`` passes
    :func:`decide` against off and its pooled median is not worse than ``on-unguarded``'s by more
    than the median slack at any level."""
    pooled = _pooled(rows)
    worse = decide(rows, levels, "on")["worse"] + [
        w for w in _slack(pooled, levels, "on-unguarded", "on", "vs on-unguarded: ")
        if "median" in w]
    return {"guard_kept": not worse, "worse": worse}


SIX_TIME_RATIO, SIX_OPTION_GAIN_MM = 1.5, 0.1


def decide_six(rows: list[dict], levels: list[float]) -> dict:
    """Addendum 6: ``six`` is the default if it passes :func:`decide` against off, is within the
    slack of ``on`` at every level and takes <= SIX_TIME_RATIO x its time; else an option if it
    passes against off and its pooled median is lower than ``on``'s by >= SIX_OPTION_GAIN_MM;
    else not shipped."""
    pooled = _pooled(rows)
    against_off = decide(rows, levels, "six")["worse"]
    vs_on = _slack(pooled, levels, "on", "six", "vs on: ")
    ratio = pooled[("all", "six")]["lc2_ms"] / pooled[("all", "on")]["lc2_ms"]
    gain = pooled[("all", "on")]["tre_median_mm"] - pooled[("all", "six")]["tre_median_mm"]
    if not against_off and not vs_on and ratio <= SIX_TIME_RATIO:
        verdict = "default"
    elif not against_off and gain >= SIX_OPTION_GAIN_MM:
        verdict = "option"
    else:
        verdict = "not shipped"
    return {"six": verdict, "worse_against_off": against_off, "worse_vs_on": vs_on,
            "time_ratio": ratio, "median_gain_vs_on_mm": gain}


COLUMNS = (("name", "run", ""), ("frames", "frames", "d"), ("dice", "dice", ".3f"),
           ("tre_median_mm", "tTRE_med", ".2f"), ("tre_p90_mm", "tTRE_p90", ".2f"),
           ("plane_tre_median_mm", "TRE_med", ".2f"), ("flagged_pct", "flag%", ".0f"),
           ("lc2_ms", "lc2_ms", ".1f"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 phantom x 2 frames, levels 0,10")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--seed0", type=int, default=SEED0,
                   help=f"first calibration phantom (default {SEED0}); 3100-3196, or 3400-3496 "
                   "(fresh phantoms no training used, the 3100 range being spent)")
    p.add_argument("--modes", nargs="+", default=list(MODES),
                   choices=["off", "on", "warm", "fast", *BENCH_MODES],
                   help="modes to run; off and on are required (default: off on)")
    p.add_argument("--out-of-plane", type=float, default=None, metavar="MM",
                   help="every frame also off by MM along the normal and MM deg of tilt "
                   "(default: 0.5 mm / 0.5 deg oscillating about 0, as bench/accuracy.py)")
    args = p.parse_args(argv)
    if (not (3100 <= args.seed0 <= 3196 or 3400 <= args.seed0 <= 3496)
            or not {"off", "on"} <= set(args.modes)):
        print(f"bench/lc2.py: --seed0 {args.seed0} / --modes {' '.join(args.modes)}: expected "
              "a calibration phantom 3100-3196 or 3400-3496 and modes including off and on",
              file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"bench/lc2.py: --threads {args.threads}: expected >= 1", file=sys.stderr)
        return 2
    if args.out_of_plane is not None and not 0 <= args.out_of_plane <= 10:
        print(f"bench/lc2.py: --out-of-plane {args.out_of_plane}: expected 0-10 (mm and deg)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    levels = [0.0, 10.0] if args.quick else [0.0, 3.0, 6.0, 10.0, 15.0]
    phantoms, n = (1, 2) if args.quick else (4, 6)
    t0 = time.perf_counter()
    modes = tuple(dict.fromkeys(args.modes))
    rows, decision = run(phantoms, levels, n, args.threads, seed0=args.seed0, modes=modes,
                         out_of_plane=args.out_of_plane)
    wall = time.perf_counter() - t0
    print(f"\nlc2: --lc2 {' vs '.join(modes)}, family-A calibration phantoms {args.seed0}.., "
          f"{phantoms} per set "
          f"x {n} frames, {device_name()}; tissue TRE (tTRE) and plane TRE in mm")
    print_table(rows, COLUMNS)
    print(f"on as default: {decision['on_as_default']}"
          + (f" (worse: {'; '.join(decision['worse'])})" if decision["worse"] else "")
          + "".join(f"; {v} as default: {decision[v][f'{v}_as_default']}"
                    + (f" (worse: {'; '.join(decision[v]['worse'])})" if decision[v]["worse"]
                       else "") for v in ("warm", "fast") if v in decision)
          + (f"; plane slice kept: {decision['slice']['on-slice_as_default']}"
             + (f" (worse: {'; '.join(decision['slice']['worse'])})"
                if decision["slice"]["worse"] else "") if "slice" in decision else "")
          + (f"; six: {decision['six']['six']} ({decision['six']})" if "six" in decision
             else "")
          + (f"; guard kept: {decision['guard']['guard_kept']}"
             + (f" (worse: {'; '.join(decision['guard']['worse'])})"
                if decision["guard"]["worse"] else "") if "guard" in decision else "")
          + f"; wall {wall:.0f} s")
    if args.json:
        write_json(args.json, "lc2", rows, argv, device=device_name(), quick=args.quick,
                   phantoms_per_set=phantoms, frames_per_run=n, levels=levels,
                   seeds=list(range(args.seed0, args.seed0 + phantoms)), modes=list(modes),
                   out_of_plane=args.out_of_plane,
                   decision=decision, wall_s=wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
