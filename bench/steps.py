"""A sudden change of the registration mid-stream (a bumped patient reference, a patient who moved):
how the live chain follows it, and which flags mark the frames it publishes wrong meanwhile.

The measurement the ``jump`` flag and the temporal filter are judged by (README "Capture range"):
no other bench changes the error during a stream. Per family, phantom and step size S:
``bench/accuracy.py``'s frames (family A: calibration phantoms 3180..; family B: diagnosis cases
5064..; never the evaluation ones) at a 3 mm / 3 deg tracking error; from frame ``STEP_AT`` on,
every tracked pose is moved by S mm in the reference frame, along a direction in the plane of the
frame at the step (fixed per phantom), as when the patient reference is bumped. The sweep goes
on, so later planes see the step partly out of plane. Per frame: the published TRE (plane vs
truth), whether it is flagged and by what.

Per family and S: frames after the step whose published TRE is > 2 mm ("off") and > 5 mm
("bad"), the share of them flagged, the share flagged ``jump``, the frames until the published TRE
is <= 2 mm again (median over phantoms; "never" counts as the rest of the run), and false alarms
(frames <= 2 mm flagged) before and after the step.

``python bench/steps.py [--quick] [--json F]`` (full: 4 phantoms per family, steps 3/4/6/10 mm,
16 frames: ~3 min on 2 cores; quick: 2 phantoms, steps 4/10, 12 frames).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import _capture_factory, family_a_frames, family_b_frames  # noqa: E402
from common import device_name, print_table, write_json  # noqa: E402

from regseg.stream.deformable_lag import bench_stage  # noqa: E402
from regseg.stream.lc2_lag import in_order  # noqa: E402

SEEDS = {"A": range(3180, 3200), "B": range(5064, 5080)}  # calibration / diagnosis, never eval
STEP_AT = 6  # the frame the step happens at
LEVEL = 3.0  # the tracking error before and after, mm and deg in plane
OFF_MM, BAD_MM = 2.0, 5.0


def step_matrix(tracked: np.ndarray, step_mm: float, angle_rad: float) -> np.ndarray:
    """(4, 4) reference-frame translation by ``step_mm`` along the direction at ``angle_rad``
    from the image's column axis, in the plane of ``tracked`` (image -> reference)."""
    ei = tracked[:3, 0] / np.linalg.norm(tracked[:3, 0])
    ej = tracked[:3, 1] - ei * (ei @ tracked[:3, 1])
    ej /= np.linalg.norm(ej)
    m = np.eye(4)
    m[:3, 3] = step_mm * (math.cos(angle_rad) * ei + math.sin(angle_rad) * ej)
    return m


def stepped(frames, step_mm: float, angle_rad: float, at: int = STEP_AT):
    """``frames`` with every tracked pose from the ``at``-th on moved by the step."""
    step = None
    for k, frame in enumerate(frames):
        if k >= at:
            if step is None:
                step = step_matrix(frame.image_to_reference, step_mm, angle_rad)
            frame = dataclasses.replace(frame, image_to_reference=step @ frame.image_to_reference)
        yield frame


def run(families: list[str], phantoms: int, steps: list[float], n: int, threads: int, *,
        seeds: dict[str, list[int]] | None = None, jump_at: str = "default",
        lc2: str = "default", temporal_filter: str = "default", lc2_hold: str = "default",
        lc2_rescue: str = "default", deformable: str = "default"):
    """Every frame's record: family, phantom, step, seq, published TRE, flagged, flags.
    ``seeds``: per family, other phantoms than :data:`SEEDS` (fresh ones for a rule);
    ``jump_at``, ``lc2``, ``temporal_filter``: ``--jump-at``'s, ``--lc2``'s (run in order:
    async as lag), ``--temporal-filter``'s, ``--lc2-hold``'s and ``--lc2-rescue``'s modes;
    ``deformable``: ``--deformable``'s (async as lag)
    ("default": regseg-stream's)."""
    from regseg.stream.build import (
        build_deformable,
        build_engine,
        build_pipeline,
    )
    from regseg.stream.context import build_context
    from regseg.stream.runner import frame_accuracy

    engine = build_engine(backend="auto", threads=threads)
    records = []
    for family in families:
        for seed in list((seeds or {}).get(family) or SEEDS[family])[:phantoms]:
            context = stage = case = None
            if family == "B":
                from regseg.sim.family_b.anatomy import make_case
                case = make_case(seed)
            angle = float(np.random.default_rng([seed, 0x57E9]).uniform(0, 2 * np.pi))
            for step_mm in steps:
                mri, labels, frames = (family_a_frames(seed, LEVEL, n) if family == "A" else
                                       family_b_frames(seed, LEVEL, n, case))
                if context is None:
                    context = build_context(mri, labels)
                    stage = (build_deformable(context, backend="auto", threads=threads)
                             if deformable != "off" else None)
                capture = _capture_factory(temporal_filter, backend="auto", threads=threads)()
                pipeline = build_pipeline(context, engine,
                                          deformable=bench_stage(stage, deformable),
                                          capture=capture,
                                          jump_at=jump_at, lc2=in_order(lc2), lc2_hold=lc2_hold,
                                          lc2_rescue=lc2_rescue)
                for frame in stepped(frames, step_mm, angle):
                    for result in pipeline.submit(frame) + pipeline.flush():
                        _, tre = frame_accuracy(pipeline, result)
                        records.append({"family": family, "phantom": seed, "step_mm": step_mm,
                                        "seq": result.frame.seq,
                                        "tre_mm": tre.get("registered", math.nan),
                                        "jump_mm": float(result.jump_mm),
                                        "flagged": bool(result.flagged),
                                        "flags": list(result.flags)})
            print(f"  {family} phantom {seed} done", flush=True)
    return records


def _share(frames: list[dict], flag: str | None = None) -> float:
    """Share of ``frames`` flagged (by ``flag`` when given); NaN without frames."""
    if not frames:
        return math.nan
    return float(np.mean([f["flagged"] if flag is None else flag in f["flags"]
                          for f in frames]))


def summarise(family: str, step_mm: float, records: list[dict], n: int) -> dict:
    mine = [r for r in records if r["family"] == family and r["step_mm"] == step_mm]
    after = [r for r in mine if r["seq"] >= STEP_AT]
    before = [r for r in mine if r["seq"] < STEP_AT]
    off = [r for r in after if not r["tre_mm"] <= OFF_MM]  # NaN (no gland in view) counts off
    bad = [r for r in after if r["tre_mm"] > BAD_MM]
    recover = []
    for seed in sorted({r["phantom"] for r in mine}):
        run = sorted((r for r in after if r["phantom"] == seed), key=lambda r: r["seq"])
        back = next((i for i, r in enumerate(run)
                     if all(x["tre_mm"] <= OFF_MM for x in run[i:])), len(run))
        recover.append(back)
    good_after = [r for r in after if r["tre_mm"] <= OFF_MM]
    good_before = [r for r in before if r["tre_mm"] <= OFF_MM]
    return {"name": f"{family} step {step_mm:g}mm", "family": family, "step_mm": step_mm,
            "frames_after": len(after), "off": len(off), "off_flagged": _share(off),
            "off_jump": _share(off, "jump"), "bad": len(bad), "bad_flagged": _share(bad),
            "recover_frames_median": float(np.median(recover)) if recover else math.nan,
            "false_alarm_before": _share(good_before), "false_alarm_after": _share(good_after),
            "n_good_after": len(good_after)}


COLUMNS = (("name", "run", ""), ("frames_after", "after", "d"), ("off", "off>2mm", "d"),
           ("off_flagged", "flagged", ".2f"), ("off_jump", "jump", ".2f"), ("bad", "bad>5mm", "d"),
           ("bad_flagged", "flagged", ".2f"), ("recover_frames_median", "recover", ".1f"),
           ("false_alarm_before", "FA_before", ".2f"), ("false_alarm_after", "FA_after", ".2f"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 phantoms, steps 4/10 mm, 12 frames")
    p.add_argument("--families", default="A,B")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--jump-at", choices=["default", "frame", "gland"], default="default",
                   help="where the jump flag measures, as regseg-stream --jump-at (default: its "
                   "default)")
    p.add_argument("--temporal-filter", choices=["default", "on", "off", "warm"],
                   default="default", help="as regseg-stream --temporal-filter (default: its "
                   "default)")
    p.add_argument("--lc2", choices=["default", "on", "async", "warm", "fast", "off"],
                   default="default",
                   help="the image-based refinement, as regseg-stream --lc2 (default: its default)")
    p.add_argument("--lc2-hold", choices=["default", "on", "off"], default="default",
                   help="as regseg-stream --lc2-hold (default: its default)")
    p.add_argument("--lc2-rescue", choices=["default", "on", "off"], default="default",
                   help="as regseg-stream --lc2-rescue (default: its default)")
    p.add_argument("--deformable", choices=["default", "on", "off", "async", "lag"],
                   default="default", help="as regseg-stream --deformable (default: its "
                   "default; async runs as lag)")
    p.add_argument("--a-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help=f"family-A phantoms instead of {SEEDS['A'][0]}.. (fresh ones for a rule)")
    p.add_argument("--b-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help=f"family-B cases instead of {SEEDS['B'][0]}.. (fresh ones for a rule)")
    args = p.parse_args(argv)
    families = [f.strip().upper() for f in args.families.split(",") if f.strip()]
    if not families or any(f not in SEEDS for f in families):
        p.error(f"--families {args.families!r}: A, B or A,B expected")
    torch.set_num_threads(args.threads)
    phantoms, steps, n = (2, [4.0, 10.0], 12) if args.quick else (4, [3.0, 4.0, 6.0, 10.0], 16)
    t0 = time.perf_counter()
    chosen = {"A": args.a_seeds or list(SEEDS["A"]), "B": args.b_seeds or list(SEEDS["B"])}
    records = run(families, phantoms, steps, n, args.threads, seeds=chosen, jump_at=args.jump_at,
                  lc2=args.lc2, temporal_filter=args.temporal_filter, lc2_hold=args.lc2_hold,
                  lc2_rescue=args.lc2_rescue, deformable=args.deformable)
    rows = [summarise(f, s, records, n) for f in families for s in steps]
    wall = time.perf_counter() - t0
    print(f"\nsteps: the reference moved by S mm at frame {STEP_AT} of {n}, {LEVEL:g} mm / "
          f"{LEVEL:g} deg tracking error, {phantoms} phantoms per family, {device_name()}")
    print_table(rows, COLUMNS)
    print(f"wall {wall:.0f} s")
    if args.json:
        write_json(args.json, "steps", rows, argv, device=device_name(), quick=args.quick,
                   phantoms_per_family=phantoms, frames_per_run=n, steps_mm=steps,
                   step_at=STEP_AT, level=LEVEL, jump_at=args.jump_at, lc2=args.lc2,
                   temporal_filter=args.temporal_filter, lc2_hold=args.lc2_hold,
                   lc2_rescue=args.lc2_rescue, deformable=args.deformable,
                   seeds={f: chosen[f][:phantoms] for f in families},
                   wall_s=wall, frames_detail=records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
