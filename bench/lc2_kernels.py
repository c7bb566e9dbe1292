"""The image-based refinement's stage time (``--lc2 on``), with the compiled per-pixel kernels of
session 22 against the code before them, side by side on the same frames, and whether they find
the same planes.

``now``: the reslicer's interior fast path (:func:`regseg.kernels.plane_sample.sample_planes`,
``interior=True``) and LC2's maps and explained variance by :mod:`regseg.kernels.lc2_maps`, every
map's window sums in one multi-channel OpenCV call. ``before``: the reslicer testing every
neighbour, the maps and the share in numpy and torch, one OpenCV call per map and candidate (the
shipped path until session 22). The two alternate frame by frame (which goes first alternates
too), one thread, on the same frames: family-A phantoms (the plain scanner and a randomised one
per phantom) and family-B cases, each frame's true plane moved in-plane by a random 0-4 mm / 0-4
deg (what the network leaves for the stage to correct). Per set: the stage's median ms per frame
for each path, their ratio, on how many frames they found the same plane and move (to the bit),
and the largest relative difference of their significances (float32 rounding: torch's and
numpy's square roots differ in the last bit).

``python bench/lc2_kernels.py [--quick] [--json F]`` (full: 3 cases x 3 sets x 20 frames; quick:
1 x 3 x 6).
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
from common import device_name, print_table, write_json  # noqa: E402

import regseg.lc2 as search  # noqa: E402
import regseg.lc2_score as score  # noqa: E402
from regseg.lc2 import in_plane_move  # noqa: E402
from regseg.stream.context import build_context  # noqa: E402
from regseg.stream.lc2_stage import build_lc2  # noqa: E402

A_SEEDS = (3100, 3101, 3102)  # family-A calibration phantoms (never evaluation ones)
B_SEEDS = (5160, 5161, 5162)  # family-B diagnosis cases (never the evaluation cases 5000-5003)
SETS = ("A plain", "A randomised", "B")
PATHS = ("before", "now")


def use(path: str) -> None:
    """Switch the CPU path of the search's kernels."""
    now = path == "now"
    search.RESLICE_INTERIOR = now
    score.NUMBA_ON_CPU = now


def frames_of(name: str, seed: int, n: int):
    """(mri, labels, [(pixels, start plane)]): ``n`` frames of one case, each plane moved."""
    from regseg.sim.phantom import make_phantom
    from regseg.sim.randomise import randomise_scanner
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner

    rng = np.random.default_rng([seed, 22])
    if name == "B":
        from regseg.sim.family_b.anatomy import make_case
        from regseg.sim.family_b.session import Session

        case = make_case(seed)
        session = Session(case, seed=seed * 7 + 3)
        mri, labels = case.mri, case.labels
        frames = [session.frame(k * (1200 // n)) for k in range(n)]
    else:
        phantom = make_phantom(seed)
        config = (dataclasses.replace(randomise_scanner(np.random.default_rng([seed, 77])))
                  if name == "A randomised" else ScannerConfig())
        scanner = SimulatedScanner(phantom, config, seed=seed)
        step = scanner.config.sweep_frames * 2 // n
        mri, labels = phantom.mri, phantom.labels
        frames = [scanner.frame(k * step) for k in range(n)]
    out = []
    for frame in frames:
        h, w = frame.pixels.shape
        shift = rng.uniform(-1, 1, 2)
        shift *= rng.uniform(0, 4) / max(np.linalg.norm(shift), 1e-9)
        move = in_plane_move(shift, rng.uniform(-4, 4), np.array([w / 2, h / 2]),
                             tuple(float(s) for s in frame.spacing_mm[::-1]))
        out.append((frame.pixels, frame.truth.image_to_mri @ move))
    return mri, labels, out


def same(a, b) -> bool:
    """Whether two stage outputs (plane, move mm, significance) are the same plane and move."""
    return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1], equal_nan=True)


def significance_gap(a, b) -> float:
    """Relative difference of their significances (0 when both are NaN)."""
    if np.isnan(a[2]) and np.isnan(b[2]):
        return 0.0
    return abs(a[2] - b[2]) / max(abs(a[2]), 1e-12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 case a set, 6 frames")
    parser.add_argument("--frames", type=int, default=None, help="frames per case (full 20)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = 1 if args.quick else 3
    n = args.frames or (6 if args.quick else 20)
    rows, t0 = [], time.monotonic()
    for name in SETS:
        times = {p: [] for p in PATHS}
        identical = frames = 0
        gap = 0.0
        for seed in (B_SEEDS if name == "B" else A_SEEDS)[:cases]:
            mri, labels, work = frames_of(name, seed, n)
            stage = build_lc2(build_context(mri, labels), "on")
            for k, (pixels, plane) in enumerate(work):
                got = {}
                for path in (PATHS if k % 2 else PATHS[::-1]):
                    use(path)
                    start = time.perf_counter()
                    got[path] = stage(pixels, plane)
                    times[path].append(1000 * (time.perf_counter() - start))
                frames += 1
                identical += same(got["before"], got["now"])
                gap = max(gap, significance_gap(got["before"], got["now"]))
        use("now")
        before, now = (float(np.median(times[p])) for p in PATHS)
        rows.append({"name": name, "frames": frames, "before_p50_ms": round(before, 3),
                     "now_p50_ms": round(now, 3), "ratio": round(before / now, 2),
                     "same_plane": identical, "significance_max_rel_diff": gap})
        print(f"{name} done ({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"\nlc2 stage (--lc2 on), before vs now on the same frames, {device_name()}, 1 thread")
    print_table(rows, (("name", "set", ""), ("frames", "frames", "d"),
                       ("before_p50_ms", "before ms", ".2f"), ("now_p50_ms", "now ms", ".2f"),
                       ("ratio", "x faster", ".2f"), ("same_plane", "same plane", "d"),
                       ("significance_max_rel_diff", "significance rel diff", ".1e")))
    if args.json:
        write_json(args.json, "lc2_kernels", rows, argv, device=device_name(), threads=1,
                   frames_per_case=n, cases_per_set=cases, wall_s=round(time.monotonic() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
