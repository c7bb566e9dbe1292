"""What each default stage of the live chain costs and buys: the chain with each stage off in turn,
its accuracy (``bench/accuracy.py``, both simulator families) and its time (``bench/latency.py``),
side by side with the default in the same run.

For each variant (``default``, then ``--lc2 off``, ``--resegment off``, ``--seg-prior off``,
``--deformable off``) this runs ``bench/accuracy.py`` on the same phantoms and cases (by default the
session-25 **diagnosis** sets, family-A calibration phantoms 3552-3559 and family-B cases 5240-5247,
never the evaluation cases) and ``bench/latency.py --quick --deformable --no-naive`` with the same
flag, ``--rounds`` times, alternating over the variants. The deformable stage's time is the
difference between latency.py's two rows (``regseg+deformable @30fps`` and ``regseg @30fps``), so it
needs no latency run of its own. The table: what turning the stage on buys (default minus the
variant; for TRE and false alarms lower is better) against what it costs (e2e p50 and processing
p50, medians over the rounds).

``python bench/ablation.py [--quick] [--out DIR] [--json F]`` (full: 8 cases per family, levels
0,3,10, 20 frames, two latency rounds, about 25 min on a 2-core CPU; ``--quick``: 2 cases, 10
frames, one round). Each child run writes its own JSON into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
#: variant -> the flag that turns its stage off (the deformable stage: latency.py's other row)
VARIANTS = {"default": [], "lc2_off": ["--lc2", "off"], "resegment_off": ["--resegment", "off"],
            "seg_prior_off": ["--seg-prior", "off"], "deformable_off": ["--deformable", "off"]}
STAGES = {"lc2_off": "LC2 refinement", "resegment_off": "segmentation at the published plane",
          "seg_prior_off": "MRI labels as a prior", "deformable_off": "deformable stage"}
A_SEEDS = tuple(range(3552, 3560))  # family-A calibration phantoms (session 25's diagnosis set)
B_SEEDS = tuple(range(5240, 5248))  # family-B diagnosis cases (not the evaluation 5000-5003)
FULL_ROW, AFFINE_ROW = "regseg+deformable @30fps", "regseg @30fps"


def accuracy_command(variant: str, args: argparse.Namespace, out: Path) -> list[str]:
    return [sys.executable, str(HERE / "accuracy.py"), "--a-seeds", *map(str, args.a_seeds),
            "--b-seeds", *map(str, args.b_seeds), "--levels", args.levels,
            "--frames", str(args.frames), "--phantoms", str(args.phantoms),
            *VARIANTS[variant], "--json", str(out),
            "--label", f"bench/ablation.py: {variant}"]


def latency_command(variant: str, out: Path) -> list[str]:
    flags = [] if variant == "deformable_off" else VARIANTS[variant]
    return [sys.executable, str(HERE / "latency.py"), "--quick", "--deformable", "--no-naive",
            *flags, "--json", str(out)]


def _row(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for row in rows:
        if row.get("name") == name:
            return row
    raise KeyError(f"no row {name!r}")


#: (name, family row, key in bench/accuracy.py's pooled row) of the figures compared
FIGURES = (("b_dice", "B", "dice_prostate"), ("b_lesion", "B", "dice_lesion"),
           ("b_tre_mm", "B", "tre_tissue_median_mm"), ("b_detection", "B", "detection"),
           ("b_false_alarm", "B", "false_alarm"), ("a_dice_registered", "A", "dice_registered"),
           ("a_tre_mm", "A", "tre_tissue_median_mm"), ("a_false_alarm", "A", "false_alarm"))


def accuracy_of(result: dict[str, Any]) -> dict[str, float]:
    """The figures the table compares, from one bench/accuracy.py JSON (null: NaN)."""
    rows = {f: _row(result["results"], f"{f} all levels") for f in ("A", "B")}
    return {name: math.nan if rows[fam].get(key) is None else float(rows[fam][key])
            for name, fam, key in FIGURES}


def latency_of(runs: list[dict[str, Any]], row: str) -> dict[str, float]:
    """e2e p50 and processing p50 of ``row``, medians over the rounds' latency.py JSONs."""
    picked = [_row(r["results"], row) for r in runs]
    return {"e2e_p50_ms": statistics.median(p["p50_ms"] for p in picked),
            "processing_p50_ms": statistics.median(p["processing_p50_ms"] for p in picked)}


def summarise(accuracy: dict[str, dict[str, float]],
              latency: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per stage: what it buys (default minus the variant with it off) and what it costs
    (the default's time minus the variant's)."""
    base = accuracy["default"]
    full = latency_of(latency["default"], FULL_ROW)
    out = []
    for variant, stage in STAGES.items():
        if variant not in accuracy:
            continue
        off = (latency_of(latency["default"], AFFINE_ROW) if variant == "deformable_off"
               else latency_of(latency[variant], FULL_ROW) if variant in latency else None)
        row = {"stage": stage, "flag": " ".join(VARIANTS[variant]),
               **{f"{k}_buys": base[k] - accuracy[variant][k] for k in base}}
        if off is not None:
            row["e2e_cost_ms"] = full["e2e_p50_ms"] - off["e2e_p50_ms"]
            row["processing_cost_ms"] = full["processing_p50_ms"] - off["processing_p50_ms"]
        out.append(row)
    return out


COLUMNS = (("stage", "stage on", ""), ("b_dice_buys", "B Dice", "+.3f"),
           ("b_lesion_buys", "B lesion", "+.3f"), ("b_tre_mm_buys", "B TRE mm", "+.2f"),
           ("b_false_alarm_buys", "B false alarm", "+.1%"),
           ("a_dice_registered_buys", "A reg. Dice", "+.3f"), ("a_tre_mm_buys", "A TRE mm", "+.2f"),
           ("a_false_alarm_buys", "A false alarm", "+.1%"),
           ("e2e_cost_ms", "e2e cost ms", "+.1f"), ("processing_cost_ms", "proc. cost ms", "+.1f"))


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"ablation: {' '.join(cmd[1:3])} failed (exit {done.returncode}); "
                         f"see {log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 cases per family, 10 frames, 1 round")
    p.add_argument("--a-seeds", type=int, nargs="+", default=list(A_SEEDS), metavar="SEED")
    p.add_argument("--b-seeds", type=int, nargs="+", default=list(B_SEEDS), metavar="SEED")
    p.add_argument("--levels", default="0,3,10", help="tracking-error levels, mm = deg")
    p.add_argument("--rounds", type=int, default=None, help="latency rounds (full 2, quick 1)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="default is always run")
    p.add_argument("--out", type=Path, default=Path("out/ablation"), help="the child runs' JSONs")
    p.add_argument("--json", default="out/bench_ablation.json")
    args = p.parse_args(argv)
    args.phantoms = 2 if args.quick else max(len(args.a_seeds), len(args.b_seeds))
    args.frames = 10 if args.quick else 20
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    if rounds < 1:
        p.error(f"--rounds {rounds}: at least 1 expected")
    variants = ["default"] + [v for v in args.variants if v != "default"]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    accuracy: dict[str, dict[str, float]] = {}
    for v in variants:
        path = args.out / f"accuracy_{v}.json"
        _run(accuracy_command(v, args, path), args.out / f"accuracy_{v}.log")
        accuracy[v] = accuracy_of(json.loads(path.read_text()))
        print(f"accuracy {v} done ({time.monotonic() - t0:.0f} s)", flush=True)
    latency: dict[str, list[dict[str, Any]]] = {}
    for r in range(1, rounds + 1):  # alternating over the variants, round by round
        for v in variants:
            if v == "deformable_off":
                continue
            path = args.out / f"latency_{v}_{r}.json"
            _run(latency_command(v, path), args.out / f"latency_{v}_{r}.log")
            latency.setdefault(v, []).append(json.loads(path.read_text()))
        print(f"latency round {r} done ({time.monotonic() - t0:.0f} s)", flush=True)
    rows = summarise(accuracy, latency)
    print(f"\nwhat each stage buys (default minus the stage off; TRE and false alarms: lower is "
          f"better) and costs, {device_name()}; B {args.b_seeds[:args.phantoms]}, "
          f"A {args.a_seeds[:args.phantoms]}, levels {args.levels}")
    print_table(rows, COLUMNS)
    write_json(args.json, "ablation", rows, argv, device=device_name(), levels=args.levels,
               family_a_seeds=args.a_seeds[:args.phantoms],
               family_b_seeds=args.b_seeds[:args.phantoms], latency_rounds=rounds,
               accuracy=accuracy, children=str(args.out), wall_s=round(time.monotonic() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
