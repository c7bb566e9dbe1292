"""Capture range of the affine stage: TRE after affine vs the initial rotation and translation.

MNI152 pairs (``regseg.train.affine3d.render``: the template with a smooth 6 mm deformation and
an intensity change per image, every second moving image in the "other modality"): the fixed
image has no affine, the moving one an exact rotation (about a random axis) or translation (in a
random direction) of the stated size and a random scale change up to 5 %. TRE is the mean
distance (mm) between the estimated and the true affine images of 512 brain points of the fixed
image. Methods: no alignment, centre of mass, ``optimise`` (120 MIND steps), ``learned``
(Affine3D), ``learned+optimise`` (20 MIND steps after it).

Pairs come from generator streams ``[10000 + n, level, 318]`` (``--validation``: ``[20000 + n,
level, 318]``), apart from training's ``[seed, step, pair, 318]``.

``python bench/affine_capture.py [--pairs 3] [--json PATH]``; run alone under
``flock /tmp/regseg-cpu.lock`` when the seconds matter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from regseg.engines.affine import AffineStage, optimise_affine, theta_to_voxels
from regseg.sim import mni
from regseg.train.affine3d import POINTS, brain_points, render

ROTATIONS_DEG = (0, 5, 10, 15, 20, 25)
SHIFTS_MM = (0, 5, 10, 15, 20, 25)


def controlled_affine(rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: float,
                      rotation_deg: float, shift_mm: float) -> np.ndarray:
    """(4, 4) array-order voxel affine about the grid centre: an exact rotation angle and shift
    length, random axis and direction, per-axis scale within 5 %."""
    rotation = mni.rotation_of_angle(rng, rotation_deg)
    linear = rotation @ np.diag(1.0 + rng.uniform(-0.05, 0.05, 3))
    direction = rng.standard_normal(3)
    shift = shift_mm / spacing_mm * direction / np.linalg.norm(direction)
    centre = (np.asarray(shape) - 1) / 2.0
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ centre + shift
    return out


def tre_mm(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray, spacing_mm: float
           ) -> float:
    """Mean distance (mm) between two (4, 4) voxel maps' images of (N, 3) voxel points."""
    p = np.concatenate([points, np.ones((len(points), 1))], 1)
    return float(np.linalg.norm((p @ (estimate - truth).T)[:, :3], axis=1).mean() * spacing_mm)


def run(pairs: int, seed0: int, weights: str = "affine3d") -> dict:
    base = mni.load_base()
    cfg = base.config
    shape = tuple(cfg.shape[::-1])
    brain = brain_points(base)
    learned = AffineStage("learned", weights=weights)
    AffineStage("optimise")  # its load-time warm-up (torch.optim's first import) out of the timing
    methods = ("initial", "centre_of_mass", "optimise", "learned", "learned+optimise")
    curves: dict[str, list[dict]] = {"rotation": [], "translation": []}
    levels = [("rotation", r, 0.0) for r in ROTATIONS_DEG] + [("translation", 0.0, s)
                                                              for s in SHIFTS_MM[1:]]
    for n_level, (kind, rot, shift) in enumerate(levels):
        errors: dict[str, list[float]] = {m: [] for m in methods}
        seconds: dict[str, list[float]] = {m: [] for m in methods}
        for n in range(pairs):
            rng = np.random.default_rng([seed0 + n, n_level, 318])
            a_m = controlled_affine(rng, shape, cfg.spacing_mm, rot, shift)
            fixed = render(base, np.eye(4), rng, False)
            moving = render(base, a_m, rng, bool(n % 2))
            truth = np.linalg.inv(a_m)  # fixed voxel x shows T(x); the moving shows it at A^-1 x
            points = brain[rng.choice(len(brain), POINTS, replace=False)]
            t0 = time.perf_counter()
            theta_l = learned.learned(fixed, moving)
            t_learned = time.perf_counter() - t0
            estimates = {"initial": (np.eye(4), 0.0)}
            t0 = time.perf_counter()
            com = optimise_affine(fixed, moving, iterations=0)
            estimates["centre_of_mass"] = (theta_to_voxels(com, shape),
                                           time.perf_counter() - t0)
            t0 = time.perf_counter()
            estimates["optimise"] = (theta_to_voxels(optimise_affine(fixed, moving), shape),
                                     time.perf_counter() - t0)
            estimates["learned"] = (theta_to_voxels(theta_l, shape), t_learned)
            t0 = time.perf_counter()
            both = optimise_affine(fixed, moving, iterations=20, initial=theta_l)
            estimates["learned+optimise"] = (theta_to_voxels(both, shape),
                                             t_learned + time.perf_counter() - t0)
            for m, (est, s) in estimates.items():
                errors[m].append(tre_mm(est, truth, points, cfg.spacing_mm))
                seconds[m].append(s)
        row = {"kind": kind, "rotation_deg": rot, "shift_mm": shift,
               **{f"{m}_tre_mm": float(np.mean(errors[m])) for m in methods},
               **{f"{m}_tre_max_mm": float(np.max(errors[m])) for m in methods},
               **{f"{m}_s": float(np.mean(seconds[m])) for m in methods}}
        curves[kind].append(row)
        print(f"{kind:<12} rot {rot:4.0f} deg shift {shift:4.0f} mm: " + "  ".join(
            f"{m} {row[m + '_tre_mm']:.2f}" for m in methods), flush=True)
        if kind == "rotation" and rot == 0:
            curves["translation"].append(row)  # the shared zero point
    return {"methods": list(methods), "curves": curves}


def sweep_iterations(pairs: int, first_seed: int, steps: tuple[int, ...], weights: str) -> dict:
    """The MIND steps after the network: affine-only TRE (landmarks, mm), AAL Dice and seconds on
    ``mni.make_pair`` pairs ``first_seed..`` (20000..: validation), beside ``optimise`` (120)."""
    from regseg.engines.registration import RegistrationEngine
    from regseg.imageio import Volume
    from regseg.register_cli import score, score_fine

    base = mni.load_base()
    variants = {"optimise": RegistrationEngine("plcreg3d", affine="optimise")}
    for k in steps:
        variants[f"learned+optimise{k}"] = RegistrationEngine(
            "plcreg3d", affine="learned+optimise" if k else "learned", affine_iterations=k or None,
            affine_weights=weights)
    rows: dict[str, list[dict]] = {k: [] for k in variants}
    for n, seed in enumerate(range(first_seed, first_seed + pairs)):
        pair = mni.make_pair(base, seed, other_modality=bool(n % 2))
        v2w = pair.voxel_to_world
        fixed, moving = Volume(pair.fixed, v2w), Volume(pair.moving, v2w)
        lm = (pair.landmarks_fixed_mm, pair.landmarks_moving_mm)
        for name, engine in variants.items():
            t0 = time.perf_counter()
            res = engine.register(fixed, moving, Volume(pair.moving_labels, v2w),
                                  deformable=False)
            seconds = time.perf_counter() - t0
            fine = engine.warp_labels(Volume(pair.moving_fine_labels, v2w), fixed, res).data
            rows[name].append({**score(Volume(pair.fixed_labels, v2w), res.moved_labels,
                                       res.ddf_mm, v2w, lm),
                               **score_fine(pair.fixed_fine_labels, fine), "seconds": seconds})
    out = {name: {k: float(np.nanmean([r[k] for r in v]))
                  for k in ("tre_mm", "dice_mean", "dice_fine_mean", "seconds")}
           for name, v in rows.items()}
    print(f"\naffine only, {pairs} make_pair pairs from seed {first_seed}")
    print(f"{'variant':<24}{'tre_mm':>10}{'dice':>10}{'dice_fine':>11}{'seconds':>10}")
    for name, r in out.items():
        print(f"{name:<24}{r['tre_mm']:10.3f}{r['dice_mean']:10.3f}{r['dice_fine_mean']:11.3f}"
              f"{r['seconds']:10.3f}")
    return out


def print_table(result: dict) -> None:
    methods = result["methods"]
    print(f"\nTRE after affine (mm, mean over pairs); {result['pairs']} pairs per level")
    print(f"{'initial misalignment':<24}" + "".join(f"{m:>18}" for m in methods))
    for kind, unit, key in (("rotation", "deg", "rotation_deg"),
                            ("translation", "mm", "shift_mm")):
        for row in result["curves"][kind]:
            print(f"{kind + ' ' + str(int(row[key])) + ' ' + unit:<24}"
                  + "".join(f"{row[m + '_tre_mm']:18.2f}" for m in methods))
    rows = result["curves"]["rotation"] + result["curves"]["translation"]
    print(f"{'seconds per pair':<24}" + "".join(
        f"{np.mean([r[m + '_s'] for r in rows]):18.3f}" for m in methods))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="pairs per misalignment level (3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--validation", action="store_true",
                   help="validation streams 20000.. instead of the test streams 10000..")
    p.add_argument("--weights", default="affine3d", help="Affine3D checkpoint (default shipped)")
    p.add_argument("--sweep", type=int, nargs="*", default=None, metavar="K",
                   help="instead: affine-only scores of learned+optimise with K MIND steps on "
                   "mni.make_pair pairs (0: learned alone), e.g. --sweep 0 10 20 40")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.sweep is not None:
        first = 20_000 if args.validation else 10_000
        result = {"sweep": sweep_iterations(args.pairs, first, tuple(args.sweep), args.weights),
                  "pairs": args.pairs, "first_seed": first}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
        return 0
    result = run(args.pairs, 20_000 if args.validation else 10_000, args.weights)
    from common import load_average

    from regseg.machine import machine_name, utc_now

    result.update({"command": " ".join(["python", "bench/affine_capture.py",
                                        *(argv if argv is not None else sys.argv[1:])]),
                   "machine": machine_name(), "date": utc_now(),
                   "load_average": load_average(), "threads": args.threads,
                   "pairs": args.pairs, "wall_s": time.perf_counter() - t0,
                   "streams": f"[{20_000 if args.validation else 10_000} + n, level, 318]"})
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
