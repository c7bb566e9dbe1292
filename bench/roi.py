"""The gland-centred window (``--roi auto``) against the whole view, on family-A validation frames.

The decision data for ``regseg.stream.roi.ROI_DEFAULT``: the live chain as ``regseg-stream``
builds it (deformable stage, default capture), with ``--roi off`` and ``--roi auto``, on
family-A CALIBRATION phantoms (3100..: never the held-out 1000.. nor family B) in three sets that
a wide view makes hard: small glands (``gland_scale`` 0.65, 21-25 mm) and normal ones in an
84 x 70 mm view (384 x 320 px at 0.22 mm), and a randomised scanner per phantom; at tracking
errors of 0/3/6/10/15 mm and deg in plane (the ``bench/accuracy.py`` model). Per set, level and
mode: prostate Dice, tissue TRE median and p90 (``regseg.metrics.tissue_tre_mm``) and the share
of frames cut; pooled over the sets the same. Rule (README "Gland-centred window"): ``auto``
becomes the default if, pooled, its median is not worse by > 0.05 mm and its p90 by > 0.25 mm
at any level.

``python bench/roi.py [--quick] [--json F]`` (full: 4 phantoms x 8 frames, ~3 min on 2 cores;
quick: 2 phantoms x 4 frames, levels 0/10).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import tracked_frames  # noqa: E402
from common import device_name, print_table, write_json  # noqa: E402

from regseg.sim.phantom import PhantomOptions, make_phantom  # noqa: E402
from regseg.sim.randomise import randomise_scanner  # noqa: E402
from regseg.sim.scanner import ScannerConfig  # noqa: E402
from regseg.stream.deformable_lag import bench_stage  # noqa: E402
from regseg.stream.lc2_lag import in_order  # noqa: E402

SEEDS = range(3100, 3108)  # family-A calibration phantoms
SETS = ("small-wide", "wide", "randomised")
STILL = dict(tracking_rot_deg=0.0, tracking_shift_mm=0.0, tracking_scale=0.0,
             out_of_plane_mm=0.0)
MEDIAN_SLACK_MM, P90_SLACK_MM = 0.05, 0.25


def case(name: str, seed: int):
    """(phantom, scanner config) of one validation set and phantom."""
    small = PhantomOptions(gland_scale=(0.65, 0.65, 0.65)) if name == "small-wide" else None
    phantom = make_phantom(seed, options=small)
    if name == "randomised":
        return phantom, dataclasses.replace(
            randomise_scanner(np.random.default_rng([seed, 77])), **STILL)
    return phantom, ScannerConfig(frame_hw=(320, 384), pixel_mm=0.22, **STILL)


def row(name: str, records: list[tuple[float, float, bool]]) -> dict:
    v = np.asarray(records, dtype=np.float64).reshape(-1, 3)
    tre = v[:, 1][np.isfinite(v[:, 1])]
    return {"name": name, "frames": len(v), "dice": float(np.nanmean(v[:, 0])),
            "tre_median_mm": float(np.median(tre)) if tre.size else float("nan"),
            "tre_p90_mm": float(np.percentile(tre, 90)) if tre.size else float("nan"),
            "cut_pct": 100.0 * float(v[:, 2].mean())}


def chain_results(sets, seeds, levels: list[float], modes, n: int, threads: int, option: str,
                  make_case=None, out_of_plane: float | None = None):
    """Every frame's (set, level, mode, pipeline, result): the live chain as ``regseg-stream``
    builds it (deformable stage, default capture) with ``option=mode`` (a build_pipeline
    argument, e.g. ``roi`` or ``lc2``) on ``n`` tracked frames of each set, phantom and level.
    ``make_case``: (set, seed) -> (phantom, scanner config), default :func:`case`;
    ``out_of_plane``: :func:`accuracy.tracked_frames`'s."""
    from regseg.stream.build import (
        build_default_capture,
        build_deformable,
        build_engine,
        build_pipeline,
    )
    from regseg.stream.context import build_context

    make_case = case if make_case is None else make_case
    engine = build_engine(backend="auto", threads=threads)
    for name in sets:
        for seed in seeds:
            phantom, cfg = make_case(name, seed)
            context = build_context(phantom.mri, phantom.labels)
            stage = build_deformable(context, backend="auto", threads=threads)
            for level in levels:
                for mode in modes:
                    pipeline = build_pipeline(context, engine, deformable=bench_stage(stage),
                                              capture=build_default_capture(
                                                  backend="auto", threads=threads),
                                              **{"lc2": in_order("default"), option: mode})
                    for frame in tracked_frames(phantom, cfg, seed, level, n,
                                                out_of_plane=out_of_plane):
                        for result in pipeline.submit(frame):
                            yield name, level, mode, pipeline, result
            print(f"  {name} phantom {seed} done", flush=True)


#: --option: the pipeline option compared, (off mode, tried mode)
OPTIONS = {"roi": ("off", "auto"), "intensity": ("off", "match"), "seg_window": ("off", "auto"),
           "seg_tta": ("off", "flip"), "seg_prior": ("off", "on")}
#: --option seg_window / seg_tta / seg_prior: pooled Dice not lower by more (addenda 12, 16, 17)
DICE_SLACK = 0.005


def run(phantoms: int, levels: list[float], n: int, threads: int,
        seeds=SEEDS, option: str = "roi", tried: str | None = None
        ) -> tuple[list[dict], dict]:
    """``tried``: the tried mode when not the option's usual one (``--tried``)."""
    from regseg.stream.runner import frame_accuracy

    modes = (OPTIONS[option][0], tried or OPTIONS[option][1])
    records: dict[tuple[str, float, str], list] = {}
    for name, level, mode, pipeline, result in chain_results(
            SETS, list(seeds)[:phantoms], levels, modes, n, threads, option):
        dice, tre = frame_accuracy(pipeline, result)
        records.setdefault((name, level, mode), []).append(
            (dice["prostate"], tre.get("registered_tissue", float("nan")),
             "roi" in result.timings_ms))
    rows = []
    for level in levels:
        for mode in modes:
            pooled = sum((records[(s, level, mode)] for s in SETS), [])
            rows.append({**row(f"pooled {level:g}mm {mode}", pooled), "set": "pooled",
                         "level_mm": level, "mode": mode})
    for (name, level, mode), recs in records.items():
        rows.append({**row(f"{name} {level:g}mm {mode}", recs), "set": name, "level_mm": level,
                     "mode": mode})
    return rows, decide(rows, levels, *modes)


def _worse(base: dict, tried: dict, label: str) -> list[str]:
    out = []
    if tried["tre_median_mm"] > base["tre_median_mm"] + MEDIAN_SLACK_MM:
        out.append(f"{label} median {base['tre_median_mm']:.2f} -> {tried['tre_median_mm']:.2f}")
    if tried["tre_p90_mm"] > base["tre_p90_mm"] + P90_SLACK_MM:
        out.append(f"{label} p90 {base['tre_p90_mm']:.2f} -> {tried['tre_p90_mm']:.2f}")
    return out


def decide(rows: list[dict], levels: list[float], off: str = "off", tried: str = "auto") -> dict:
    """The predeclared rule: is ``tried`` fit to be the default? A level passes when the pooled
    rows, or every set's rows, are not worse than ``off`` by the slacks (addendum 11 of
    bench/results/lc2_predeclared.md: a median pooled over three very different sets can move
    while no set gets worse). ``pooled_only_worse``: addendum 9's pooled-only test."""
    by = {(r["set"], r["level_mm"], r["mode"]): r for r in rows}
    worse, pooled_only = [], []
    for level in levels:
        pooled = _worse(by[("pooled", level, off)], by[("pooled", level, tried)],
                        f"{level:g} mm pooled")
        pooled_only += pooled
        sets = [s for s in SETS if (s, level, off) in by and (s, level, tried) in by]
        per_set = sum((_worse(by[(s, level, off)], by[(s, level, tried)], f"{level:g} mm {s}")
                       for s in sets), [])
        if pooled and (per_set or not sets):
            worse += pooled + per_set
    dice_worse = [f"{level:g} mm pooled Dice {by[('pooled', level, off)]['dice']:.3f} -> "
                  f"{by[('pooled', level, tried)]['dice']:.3f}" for level in levels
                  if ("pooled", level, off) in by and "dice" in by[("pooled", level, off)]
                  and by[("pooled", level, tried)]["dice"]
                  < by[("pooled", level, off)]["dice"] - DICE_SLACK]
    return {"auto_as_default": not worse, "tried": tried, "worse": worse,
            "pooled_only_worse": pooled_only, "dice_worse": dice_worse,
            "median_slack_mm": MEDIAN_SLACK_MM, "p90_slack_mm": P90_SLACK_MM}


COLUMNS = (("name", "run", ""), ("frames", "frames", "d"), ("dice", "dice", ".3f"),
           ("tre_median_mm", "TRE_med", ".2f"), ("tre_p90_mm", "TRE_p90", ".2f"),
           ("cut_pct", "cut%", ".0f"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 phantoms x 4 frames, levels 0,10")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--seed0", type=int, default=SEEDS[0],
                   help=f"first calibration phantom (default {SEEDS[0]}; a rule on fresh "
                   "phantoms names its own)")
    p.add_argument("--option", choices=sorted(OPTIONS), default="roi",
                   help="the pipeline option compared: roi (off vs auto, the default), "
                   "intensity (off vs match), seg_window (off vs auto), seg_tta (off vs flip) or "
                   "seg_prior (off vs on)")
    p.add_argument("--tried", default=None,
                   help="the tried mode instead of the option's usual one (e.g. --option "
                   "seg_prior --tried gated)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [0.0, 10.0] if args.quick else [0.0, 3.0, 6.0, 10.0, 15.0]
    phantoms, n = (2, 4) if args.quick else (4, 8)
    t0 = time.perf_counter()
    seeds = range(args.seed0, args.seed0 + phantoms)
    rows, decision = run(phantoms, levels, n, args.threads, seeds, args.option, args.tried)
    wall = time.perf_counter() - t0
    off, tried = OPTIONS[args.option][0], args.tried or OPTIONS[args.option][1]
    print(f"\nroi: --{args.option} {off} vs {tried}, family-A calibration phantoms, "
          f"{phantoms} per set x {n} frames, {device_name()}; tissue TRE in mm")
    print_table(rows, COLUMNS)
    # the TRE rule (roi, intensity) and the Dice rule (seg_window, seg_tta, seg_prior) apart:
    # a seg option's rule needs both
    print(f"{tried}: tissue TRE not worse than {off}: {decision['auto_as_default']}"
          + (f" (worse: {'; '.join(decision['worse'])})" if decision["worse"] else "")
          + f"; pooled Dice within {DICE_SLACK} at every level: {not decision['dice_worse']}"
          + (f" (worse: {'; '.join(decision['dice_worse'])})" if decision["dice_worse"] else "")
          + f"; wall {wall:.0f} s")
    if args.json:
        write_json(args.json, "roi", rows, argv, device=device_name(), quick=args.quick,
                   phantoms_per_set=phantoms, frames_per_run=n, levels=levels,
                   seeds=list(seeds), decision=decision, wall_s=wall, option=args.option)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
