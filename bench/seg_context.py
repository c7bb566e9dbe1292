"""Where the live segmentation's error comes from: its MRI context, or the network itself.

The segmentation U-Net (``--resegment on``: at the published plane) sees the frame and the MRI and
its labels resliced at a plane. Per frame of the live chain (``bench/accuracy.py``'s frames, the
CLI's default chain, one tracking-error level), the same network is run again with the MRI context
at the TRUE plane (a perfect registration) and at the tracked plane (none), and compared with the
truth beside what the chain published and the registered MRI labels themselves:

- ``published``: the chain's labels (context at the published plane);
- ``true_plane``: the context at the true plane: what a perfect registration would give this
  network; if it is not better than ``published``, the network, not the registration, is the limit;
- ``tracked``: the context at the tracked plane (no registration);
- ``registered``: the MRI labels through the published registration (``MRILabels``), no network.

Prostate and lesion Dice means over the frames whose truth holds a gland. Diagnosis sets by default
(family-A phantoms 3400.., which no training or choice used, the calibration range 3100-3199 being
spent; family-B diagnosis cases 5092..), never the evaluation ones.

``python bench/seg_context.py [--quick] [--json F]`` (full: 4 cases per family, 12 frames each at
3 mm / 3 deg: ~3 min on 2 cores; quick: 1 case per family, 4 frames).
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
from accuracy import family_a_frames, family_b_frames  # noqa: E402
from common import device_name, print_table, write_json  # noqa: E402

from regseg.stream.deformable_lag import bench_stage  # noqa: E402
from regseg.stream.lc2_lag import in_order  # noqa: E402

SEEDS = {"A": range(3400, 3412), "B": range(5092, 5100)}  # fresh plain phantoms / diagnosis cases
CONTEXTS = ("published", "true_plane", "tracked", "registered")


def frame_dice(result, pipeline, segment_at) -> dict[str, float]:
    """Prostate and lesion Dice of each context's labels on one frame (``segment_at(plane)``:
    the network's labels with the MRI context at ``plane``)."""
    from regseg import metrics
    from regseg.types import LESION, PROSTATE

    truth = result.frame.truth
    labels = {"published": result.labels, "true_plane": segment_at(truth.image_to_mri),
              "tracked": segment_at(pipeline.plane(result.frame)),
              "registered": result.warped_labels}
    out = {}
    for name, lab in labels.items():
        out[f"{name}_prostate"] = metrics.dice(lab, truth.labels, PROSTATE)
        out[f"{name}_lesion"] = metrics.dice(lab, truth.labels, LESION)
    return out


def run(families: list[str], cases: int, n: int, level: float, threads: int,
        seeds: dict[str, list[int]]) -> list[dict]:
    from regseg.stream.build import (
        build_default_capture,
        build_deformable,
        build_engine,
        build_pipeline,
    )
    from regseg.stream.context import build_context
    from regseg.stream.resegment import segment_published

    engine = build_engine(backend="auto", threads=threads)
    records = []
    for family in families:
        for seed in list(seeds[family])[:cases]:
            case = None
            if family == "B":
                from regseg.sim.family_b.anatomy import make_case
                case = make_case(seed)
            mri, labels, frames = (family_a_frames(seed, level, n) if family == "A" else
                                   family_b_frames(seed, level, n, case))
            context = build_context(mri, labels)
            stage = build_deformable(context, backend="auto", threads=threads)
            pipeline = build_pipeline(context, engine, deformable=bench_stage(stage),
                                      capture=build_default_capture(backend="auto",
                                                                    threads=threads),
                                      lc2=in_order("default"))
            for frame in frames:
                for result in pipeline.submit(frame) + pipeline.flush():
                    if not (result.frame.truth.labels > 0).any():
                        continue

                    def segment_at(plane, frame=result.frame, pipeline=pipeline):
                        return segment_published(pipeline, frame, plane)[0]

                    records.append({"family": family, "case": seed, "seq": result.frame.seq,
                                    **frame_dice(result, pipeline, segment_at)})
            print(f"  {family} case {seed} done", flush=True)
    return records


def summarise(family: str, records: list[dict]) -> dict:
    mine = [r for r in records if r["family"] == family]
    row: dict = {"name": f"family {family}", "family": family, "frames": len(mine)}
    for name in CONTEXTS:
        for label in ("prostate", "lesion"):
            values = np.asarray([r[f"{name}_{label}"] for r in mine], np.float64)
            row[f"{name}_{label}"] = (float(np.nanmean(values)) if np.isfinite(values).any()
                                      else math.nan)
    return row


COLUMNS = (("name", "family", ""), ("frames", "frames", "d"),
           ("published_prostate", "published", ".3f"), ("true_plane_prostate", "true plane", ".3f"),
           ("tracked_prostate", "tracked", ".3f"), ("registered_prostate", "registered", ".3f"),
           ("published_lesion", "les. published", ".3f"),
           ("true_plane_lesion", "les. true plane", ".3f"),
           ("registered_lesion", "les. registered", ".3f"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 case per family, 4 frames")
    p.add_argument("--families", default="A,B")
    p.add_argument("--level", type=float, default=3.0, help="tracking error, mm and deg in plane")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--a-seeds", type=int, nargs="+", default=None, metavar="SEED")
    p.add_argument("--b-seeds", type=int, nargs="+", default=None, metavar="SEED")
    args = p.parse_args(argv)
    families = [f.strip().upper() for f in args.families.split(",") if f.strip()]
    if not families or any(f not in SEEDS for f in families):
        p.error(f"--families {args.families!r}: A, B or A,B expected")
    if not (math.isfinite(args.level) and 0 <= args.level <= 20):
        p.error(f"--level {args.level}: expected 0-20 mm")
    torch.set_num_threads(args.threads)
    cases, n = (1, 4) if args.quick else (4, 12)
    seeds = {"A": args.a_seeds or list(SEEDS["A"]), "B": args.b_seeds or list(SEEDS["B"])}
    t0 = time.perf_counter()
    records = run(families, cases, n, args.level, args.threads, seeds)
    rows = [summarise(f, records) for f in families]
    wall = time.perf_counter() - t0
    print(f"\nsegmentation by MRI context, prostate / lesion Dice means, {args.level:g} mm / "
          f"{args.level:g} deg tracking error, {cases} cases per family x {n} frames, "
          f"{device_name()}")
    print_table(rows, COLUMNS)
    print(f"wall {wall:.0f} s")
    if args.json:
        write_json(args.json, "seg_context", rows, argv, device=device_name(), quick=args.quick,
                   level=args.level, cases_per_family=cases, frames_per_case=n,
                   seeds={f: seeds[f][:cases] for f in families}, wall_s=wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
