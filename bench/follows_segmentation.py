"""Diagnosis: does the live registration follow the frame's own gland segmentation?

On family B the registration is off by a different 2-3.5 mm per case, even from a perfect start
(README, "Accuracy on a simulator it was not trained on"). AlignSegNet registers and segments
with one network, so one hypothesis is that the registered MRI gland lands where the network
*segments* the gland on the frame, and that segmentation is off on family B's appearance. Per
frame this measures, in the frame plane (mm, rows then columns): the centroid of the segmented
gland minus the true gland's, and the centroid of the registered MRI gland (``warped_labels``)
minus the true gland's; then their correlation over all frames and both axes, and per case.

A diagnosis, not a choice: it runs the live chain as ``bench/accuracy.py`` does (the CLI's
defaults) on family-B seeds 5020.. (not the evaluation cases 5000-5003, and nothing is tuned
on them).

``python bench/follows_segmentation.py [--seeds 5020 5021 ...] [--frames 10] [--json F]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
from common import print_table, write_json  # noqa: E402

from regseg import metrics  # noqa: E402
from regseg.stream.deformable_lag import bench_stage  # noqa: E402
from regseg.stream.lc2_lag import in_order  # noqa: E402
from regseg.types import PROSTATE  # noqa: E402

MIN_PIXELS = 50  # frames whose true gland is smaller are skipped (a centroid of a few pixels)


def centroid_offset_mm(mask: np.ndarray, truth: np.ndarray, mm_per_px: float) -> np.ndarray:
    """(row, column) offset in mm of ``mask``'s centroid from ``truth``'s; NaN where ``mask`` is
    empty."""
    if not mask.any():
        return np.full(2, np.nan)
    return mm_per_px * (np.argwhere(mask).mean(0) - np.argwhere(truth).mean(0))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two (N, 2) offset arrays over both axes, NaN rows left out."""
    x, y = a.ravel(), b.ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(x[ok], y[ok])[0, 1]) if ok.sum() > 2 else float("nan")


def measure(seeds: list[int], frames: int, level: float) -> list[dict]:
    """Per frame: the case, the segmentation's and the registration's centroid offsets, Dice."""
    from regseg.sim.family_b.anatomy import make_case
    from regseg.stream.build import build_deformable, build_engine, build_pipeline
    from regseg.stream.context import build_context

    engine = build_engine(backend="auto", device="cpu", threads=1)
    capture = accuracy._capture_factory(backend="auto", device="cpu", threads=1)
    rows = []
    for seed in seeds:
        case = make_case(seed)
        mri, labels, stream = accuracy.family_b_frames(seed, level, frames, case)
        context = build_context(mri, labels, "cpu")
        stage = build_deformable(context, "plcreg2d", backend="auto", threads=1)
        pipeline = build_pipeline(context, engine, deformable=bench_stage(stage), capture=capture(),
                                  lc2=in_order("default"))
        for frame in stream:
            for result in pipeline.submit(frame) + pipeline.flush():
                truth = result.frame.truth
                gland = truth.labels > 0  # the gland with its lesions (label 2 lies inside it)
                if gland.sum() < MIN_PIXELS:
                    continue
                mm = float(np.linalg.norm(truth.image_to_mri[:3, 0]))
                rows.append({
                    "case": seed,
                    "segmented_mm": centroid_offset_mm(result.labels > 0, gland, mm),
                    "registered_mm": centroid_offset_mm(result.warped_labels > 0, gland, mm),
                    "dice_segmented": metrics.dice(result.labels, truth.labels, PROSTATE),
                    "gland_fraction": float(gland.mean())})
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per case: mean offsets and Dice; over all frames: the correlation."""
    def stack(rs, key):
        return np.array([r[key] for r in rs]).reshape(-1, 2)

    cases = []
    for seed in sorted({r["case"] for r in rows}):
        rs = [r for r in rows if r["case"] == seed]
        seg, reg = stack(rs, "segmented_mm"), stack(rs, "registered_mm")
        cases.append({"name": str(seed), "frames": len(rs),
                      "segmented_row_mm": float(np.nanmean(seg[:, 0])),
                      "segmented_col_mm": float(np.nanmean(seg[:, 1])),
                      "registered_row_mm": float(np.nanmean(reg[:, 0])),
                      "registered_col_mm": float(np.nanmean(reg[:, 1])),
                      "dice_segmented": float(np.mean([r["dice_segmented"] for r in rs])),
                      "gland_fraction": float(np.mean([r["gland_fraction"] for r in rs]))})
    return {"cases": cases, "frames": len(rows),
            "correlation": correlation(stack(rows, "segmented_mm"), stack(rows, "registered_mm"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[5020, 5021, 5022, 5023])
    p.add_argument("--frames", type=int, default=10, help="frames per case")
    p.add_argument("--level", type=float, default=0.0, help="tracking error, mm and degrees")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    summary = summarise(measure(args.seeds, args.frames, args.level))
    print_table(summary["cases"], COLUMNS)
    print(f"correlation of the segmented and the registered gland's offsets: "
          f"{summary['correlation']:.3f} over {summary['frames']} frames")
    if args.json:
        write_json(args.json, "follows_segmentation", summary["cases"], argv,
                   seeds=args.seeds, level_mm=args.level, frames=summary["frames"],
                   correlation=summary["correlation"],
                   wall_s=round(time.perf_counter() - t0, 1))
    return 0


COLUMNS = [("name", "case", ""), ("frames", "frames", "d"),
           ("segmented_row_mm", "seg row mm", "+.2f"), ("segmented_col_mm", "seg col mm", "+.2f"),
           ("registered_row_mm", "reg row mm", "+.2f"), ("registered_col_mm", "reg col mm", "+.2f"),
           ("dice_segmented", "seg Dice", ".3f"), ("gland_fraction", "gland share", ".3f")]


if __name__ == "__main__":
    sys.exit(main())
