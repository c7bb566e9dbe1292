"""What the MRI labels can reach: prostate and lesion Dice of the MRI labels resliced at the TRUE
plane, and at the true plane moved by an in-plane registration error of exactly E mm.

The registered MRI labels (``MRILabels``, ``TargetContour``) are the MRI's own delineation carried
onto the frame. Even a perfect rigid registration does not make them the frame's truth: the
tissue has moved since the MRI (probe pressure, deformation) and the MRI samples the anatomy on
its own grid (family B: an oblique stack with 3 mm slices and partial volume). This bench
measures that ceiling, and how it falls with the registration error the issue's targets allow
(registered TRE median <= 1.5 mm at 3 mm / 3 deg): per frame, the labels at the true plane moved
by E mm in a random in-plane direction (a translation: every point's error is exactly E). No
network runs and nothing is chosen, so the evaluation cases may be measured too.

Per family and error: prostate and lesion Dice (means over frames; the lesion over frames where
it is in the truth or the MRI labels), and the truth lesion's size on the frame (equivalent
diameter, mm). One JSON, one table.

``python bench/ceiling.py [--a-seeds ...] [--b-seeds ...] [--level 3] [--errors 0,0.5,1,1.5,2]
[--json F]``: the frames are those bench/accuracy.py scores at ``--level`` (default 3 mm, the
level of the Dice targets).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import family_a_frames, family_b_frames  # noqa: E402
from accuracy_scoring import true_plane_labels  # noqa: E402
from common import device_name, print_table, write_json  # noqa: E402

from regseg import metrics  # noqa: E402
from regseg.types import LESION, PROSTATE, Frame  # noqa: E402

ERRORS_MM = (0.0, 0.5, 1.0, 1.5, 2.0)
A_SEEDS = (1000, 1001, 1002, 1003)  # family A's held-out evaluation phantoms
B_SEEDS = (5000, 5001, 5002, 5003)  # family B's evaluation cases (nothing is chosen here)


def moved(frame: Frame, error_mm: float, direction_rad: float) -> Frame:
    """``frame`` whose true plane is translated in plane by ``error_mm`` along
    ``direction_rad`` (a registration error of exactly ``error_mm`` at every pixel)."""
    import dataclasses

    shift = np.eye(4)
    shift[0, 3] = error_mm * math.cos(direction_rad) / float(frame.spacing_mm[1])  # columns
    shift[1, 3] = error_mm * math.sin(direction_rad) / float(frame.spacing_mm[0])  # rows
    truth = dataclasses.replace(frame.truth, image_to_mri=frame.truth.image_to_mri @ shift)
    return dataclasses.replace(frame, truth=truth)


def frame_scores(context: Any, frame: Frame, errors: list[float],
                 rng: np.random.Generator) -> dict[str, Any]:
    """Per error: prostate and lesion Dice of the MRI labels at the moved true plane vs the
    frame's truth; and the truth lesion's equivalent diameter (mm, NaN without a lesion)."""
    direction = float(rng.uniform(0, 2 * np.pi))
    out: dict[str, Any] = {}
    for e in errors:
        labels = true_plane_labels(context, moved(frame, e, direction))
        out[f"prostate@{e:g}"] = metrics.dice(labels, frame.truth.labels, PROSTATE)
        out[f"lesion@{e:g}"] = metrics.dice(labels, frame.truth.labels, LESION)
    area = float((frame.truth.labels == LESION).sum() * np.prod(frame.spacing_mm))
    out["lesion_diameter_mm"] = 2.0 * math.sqrt(area / math.pi) if area > 0 else math.nan
    return out


def rows_of(family: str, records: list[dict], errors: list[float]) -> list[dict[str, Any]]:
    def mean(key: str) -> float:
        v = np.asarray([r[key] for r in records], float)
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else math.nan

    diam = np.asarray([r["lesion_diameter_mm"] for r in records], float)
    diam = diam[np.isfinite(diam)]
    return [{"name": f"{family} {e:g} mm", "family": family, "error_mm": e,
             "frames": len(records), "dice_prostate": mean(f"prostate@{e:g}"),
             "dice_lesion": mean(f"lesion@{e:g}"),
             "lesion_frames": int(sum(math.isfinite(r[f"lesion@{e:g}"]) for r in records)),
             "lesion_diameter_median_mm": float(np.median(diam)) if diam.size else math.nan}
            for e in errors]


def run(seeds: dict[str, list[int]], frames: int, errors: list[float], level: float = 3.0
        ) -> tuple[list[dict], list[dict]]:
    """Per family, the frames bench/accuracy.py scores at tracking error ``level`` (the same
    cases and stretch of the session; only their true plane is used here)."""
    from regseg.stream.context import build_context

    rows, records = [], []
    for family, family_seeds in seeds.items():
        mine = []
        for seed in family_seeds:
            maker = family_a_frames if family == "A" else family_b_frames
            mri, labels, stream = maker(seed, level, frames)
            context = build_context(mri, labels, device="cpu")
            rng = np.random.default_rng([seed, 0xCE11])
            for frame in stream:
                rec = {"family": family, "seed": seed, "seq": frame.seq,
                       **frame_scores(context, frame, errors, rng)}
                mine.append(rec)
        rows += rows_of(family, mine, errors)
        records += mine
    return rows, records


COLUMNS = (("name", "family, error", ""), ("frames", "frames", "d"),
           ("dice_prostate", "prostate", ".3f"), ("dice_lesion", "lesion", ".3f"),
           ("lesion_frames", "lesion frames", "d"),
           ("lesion_diameter_median_mm", "lesion diam mm", ".1f"))


def _floats(text: str) -> list[float] | None:
    """``--errors``' values, or None when any is not a number of mm from 0 to 20."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        return None
    ok = values and all(math.isfinite(v) and 0 <= v <= 20 for v in values)
    return values if ok else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a-seeds", type=int, nargs="*", default=list(A_SEEDS), metavar="SEED",
                   help="family-A phantoms (default the held-out evaluation ones)")
    p.add_argument("--b-seeds", type=int, nargs="*", default=list(B_SEEDS), metavar="SEED",
                   help="family-B cases (default the evaluation ones: nothing is chosen here)")
    p.add_argument("--frames", type=int, default=20, help="frames per case (default 20)")
    p.add_argument("--errors", default=",".join(f"{e:g}" for e in ERRORS_MM),
                   help="in-plane registration errors, mm (default 0,0.5,1,1.5,2)")
    p.add_argument("--level", type=float, default=3.0,
                   help="score the frames bench/accuracy.py scores at this tracking error, mm "
                        "(default 3: the level of the Dice targets; only the true plane is used)")
    p.add_argument("--json", default=None, help="write rows and per-frame records here")
    args = p.parse_args(argv)
    errors = _floats(args.errors)
    if errors is None:
        p.error(f"--errors {args.errors!r}: expected comma-separated mm from 0 to 20, e.g. "
                "0,0.5,1,1.5,2")
    if args.frames < 1:
        p.error(f"--frames {args.frames}: expected at least 1")
    if not 0 <= args.level <= 20:
        p.error(f"--level {args.level}: expected mm from 0 to 20")
    seeds = {k: v for k, v in (("A", args.a_seeds), ("B", args.b_seeds)) if v}
    t0 = time.perf_counter()
    rows, records = run(seeds, args.frames, errors, args.level)
    print(f"ceiling: the MRI labels at the true plane moved by E mm in plane, "
          f"{args.frames} frames per case (bench/accuracy.py's at {args.level:g} mm), "
          f"{device_name()}")
    print_table(rows, COLUMNS)
    print(f"wall {time.perf_counter() - t0:.0f} s")
    if args.json:
        write_json(args.json, "ceiling", rows, argv, seeds=seeds, frames_per_case=args.frames,
                   level=args.level,
                   errors_mm=errors, records=records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
