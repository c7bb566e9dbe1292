"""``regseg eval`` (metrics of a registered pair) and ``regseg mni`` (the MNI152 evaluation set)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from regseg.cli_checks import check_writable, int_at_least
from regseg.errors import InputError
from regseg.register_cli import load_ddf_mm, load_label_map, load_landmarks, score


def run_eval(args: argparse.Namespace) -> int:
    """``regseg eval``: metrics of a moved/fixed pair, printed as a table (and JSON)."""
    if args.json:
        check_writable(args.json, "--json")
    fixed_labels = load_label_map(args.fixed_labels, what="fixed label")
    moved_labels = load_label_map(args.moved_labels, fixed_labels, "moved label")
    ddf = load_ddf_mm(args.ddf, fixed_labels) if args.ddf else None
    landmarks = load_landmarks(args.landmarks) if args.landmarks else None
    if landmarks is not None and ddf is None:
        raise InputError("--landmarks needs --ddf (the fixed landmarks are mapped through it)")
    result = score(fixed_labels, moved_labels, ddf, fixed_labels.voxel_to_world, landmarks)
    print(f"{'label':>8} {'dice':>8} {'hd95_mm':>9}")
    for k, d in result["dice"].items():
        print(f"{k:>8} {d:8.4f} {result['hd95_mm'][k]:9.3f}")
    print(f"{'mean':>8} {result['dice_mean']:8.4f} {result['hd95_mean_mm']:9.3f}")
    for k in ("folding_pct", "sdlogj", "det_min", "tre_before_mm", "tre_mm", "tre_max_mm"):
        if k in result:
            print(f"{k:>14}: {result[k]:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run_mni(args: argparse.Namespace) -> int:
    """``regseg mni``: write the MNI152 evaluation (or training) set."""
    check_writable(Path(args.out) / "pairs.csv", "--out")
    from regseg.sim.mni import build_mni_set, config_at_spacing

    config = config_at_spacing(args.spacing)  # refused (exit 2) before anything is written
    csv_path = build_mni_set(args.out, args.pairs, split=args.split, progress=True,
                             config=config)
    print(f"wrote {csv_path}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fixed-labels", required=True, help="reference labels, 3-D NIfTI")
    p.add_argument("--moved-labels", required=True, help="registered labels on the same grid")
    p.add_argument("--ddf", help="displacement (ddf_mm.nii.gz from `regseg register`)")
    p.add_argument("--landmarks", help="CSV fixed_x..moving_z in world mm (needs --ddf)")
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(func=run_eval)


def add_mni_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pairs", type=int_at_least(1), default=8,
                   help="number of pairs (default 8)")
    p.add_argument("--split", default="eval", choices=["eval", "train"],
                   help="eval pairs (seeds 10000..) or training pairs (0..); they never overlap")
    p.add_argument("--spacing", type=float, default=3.25, metavar="MM",
                   help="voxel size in mm over the same field of view (default 3.25: 48 x 64 x "
                   "48, the networks' grid; 1.5: 104 x 139 x 104, what users register at)")
    p.set_defaults(func=run_mni)
