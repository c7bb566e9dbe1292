"""Diagnosis: an out-of-plane pose error, the in-plane LC2 search, and a search that also tilts.

``--lc2`` moves the plane in-plane only. Where the pose is off *out of* plane, the best in-plane
match can sit further from the truth than the start (seen in the probe-calibration e2e test,
README "Image-based refinement"). This measures it directly: frames at their true plane, moved by
a known 3-D error (in-plane shifts and rotation up to 2 mm / 2 deg, a normal shift of 2-4 mm,
tilts up to 4 deg about both in-plane axes, about the gland), then (a) the shipped in-plane search
(:func:`regseg.lc2.refine_in_plane`) and (b) the same pattern search over six parameters (the
three in-plane ones, the normal shift and both tilts; LC2 on the same 0.6 mm grid, steps 2 ->
0.25, at most 40 rounds of 12 poses). Plane TRE over the true gland, before and after.

A diagnosis, not a choice: family-A calibration phantoms 3100.. and family-B DIAGNOSIS cases
5020.. (never evaluation cases), frames straight from the simulator (no network in the loop).

``python bench/lc2_out_of_plane.py [--frames 6] [--json F]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
from common import device_name, print_table, write_json  # noqa: E402

from regseg import metrics  # noqa: E402
from regseg.lc2 import (  # noqa: E402
    FrameScorer,
    Lc2Config,
    pattern_search,
    refine_in_plane,
    rigid_move,
)

CASES = (("A", 3100), ("A", 3101), ("B", 5020), ("B", 5021))


def search_six(scorer: FrameScorer, plane: np.ndarray, centre_ij: np.ndarray, nz: float,
               step: float = 2.0, min_step: float = 0.25, max_rounds: int = 40):
    """:func:`regseg.lc2.pattern_search` over the six parameters: (plane, params, rounds)."""
    def score(params):
        return scorer.scores([plane @ rigid_move(q, centre_ij, scorer.spacing, nz)
                              for q in params]).tolist()

    p, _, _, rounds = pattern_search(score, np.zeros(6), float(scorer.scores([plane])[0]), step,
                                     min_step=min_step, max_rounds=max_rounds)
    return plane @ rigid_move(p, centre_ij, scorer.spacing, nz), p, rounds


def run(frames: int) -> list[dict]:
    from regseg.sim.family_b.anatomy import make_case
    from regseg.stream.context import build_context

    rows = []
    for family, seed in CASES:
        mri, labels, stream = (accuracy.family_a_frames(seed, 0.0, frames) if family == "A" else
                               accuracy.family_b_frames(seed, 0.0, frames, make_case(seed)))
        context = build_context(mri, labels)
        rng = np.random.default_rng([seed, 0x0F])
        for frame in stream:
            true = frame.truth.image_to_mri
            gland = np.argwhere(frame.truth.labels > 0)[:, ::-1]
            if len(gland) < 100:
                continue
            sp = (float(np.linalg.norm(true[:3, 0])), float(np.linalg.norm(true[:3, 1])))
            nz = float(np.linalg.norm(true[:3, 2]))
            centre = gland.mean(0)
            error = np.array([rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(-2, 2),
                              rng.choice([-1.0, 1.0]) * rng.uniform(2, 4), rng.uniform(-4, 4),
                              rng.uniform(-4, 4)])
            start = true @ rigid_move(error, centre, sp, nz)
            t0 = time.perf_counter()
            inplane = refine_in_plane(frame.pixels, start, context.mri, context.world_to_voxel,
                                      centre)
            t1 = time.perf_counter()
            scorer = FrameScorer(frame.pixels, start, context.mri, context.world_to_voxel,
                                 Lc2Config())
            with torch.inference_mode():
                six, _, rounds = search_six(scorer, start, centre, nz)
            t2 = time.perf_counter()
            rows.append({"family": family, "case": seed,
                         "normal_error_mm": float(error[3]),
                         "tre_start_mm": metrics.tre_mm(start, true, gland),
                         "tre_in_plane_mm": metrics.tre_mm(inplane.image_to_mri, true, gland),
                         "tre_six_mm": metrics.tre_mm(six, true, gland),
                         "in_plane_applied": inplane.applied,
                         "in_plane_significance": inplane.significance,
                         "in_plane_ms": 1e3 * (t1 - t0), "six_ms": 1e3 * (t2 - t1),
                         "six_rounds": rounds})
        print(f"  {family} {seed} done", flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for family in ("A", "B", "all"):
        sel = [r for r in rows if family in ("all", r["family"])]
        if not sel:
            continue

        def med(key, sel=sel):
            return float(np.median([r[key] for r in sel]))

        out.append({"name": family, "frames": len(sel), "tre_start_mm": med("tre_start_mm"),
                    "tre_in_plane_mm": med("tre_in_plane_mm"), "tre_six_mm": med("tre_six_mm"),
                    "worse_in_plane": sum(r["tre_in_plane_mm"] > r["tre_start_mm"] for r in sel),
                    "worse_six": sum(r["tre_six_mm"] > r["tre_start_mm"] for r in sel),
                    "refused_in_plane": sum(not r["in_plane_applied"] for r in sel),
                    "in_plane_ms": med("in_plane_ms"), "six_ms": med("six_ms")})
    return out


COLUMNS = (("name", "family", ""), ("frames", "frames", "d"),
           ("tre_start_mm", "TRE_start", ".2f"), ("tre_in_plane_mm", "in_plane", ".2f"),
           ("tre_six_mm", "six_dof", ".2f"), ("worse_in_plane", "worse_ip", "d"),
           ("worse_six", "worse_6", "d"), ("refused_in_plane", "ip_refused", "d"),
           ("in_plane_ms", "ip_ms", ".0f"),
           ("six_ms", "6dof_ms", ".0f"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=6, help="frames per case")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.frames < 1:
        print(f"bench/lc2_out_of_plane.py: --frames {args.frames}: expected >= 1",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = run(args.frames)
    table = summary(rows)
    print(f"\nlc2 out of plane: median plane TRE (mm) from a 3-D error, in-plane vs six-parameter "
          f"search; {device_name()}")
    print_table(table, COLUMNS)
    if args.json:
        write_json(args.json, "lc2_out_of_plane", table, argv, device=device_name(),
                   frames_per_case=args.frames, cases=[list(c) for c in CASES],
                   frames_detail=rows, wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
