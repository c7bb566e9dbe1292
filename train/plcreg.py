"""Train PLCReg: 2-D live refinement on simulated frames after the affine stage; 3-D on MNI152.

``regseg train plcreg2d --out DIR`` / ``regseg train plcreg3d --out DIR`` (or
``python -m regseg.train.plcreg {2d,3d} --out DIR``) write ``DIR/plcreg{2d,3d}.pt`` (checkpoint
with its config) and ``DIR/plcreg{2d,3d}.json`` (held-out metrics, timing and the exact command).
Both fit a wall-time budget: data generation counts against it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from regseg import distributed
from regseg.cli_checks import float_at_least, int_at_least
from regseg.train.plcreg_live import train_2d
from regseg.train.plcreg_mni import (
    CONFIG_3D,
    EPE_3D,
    SPACING_DEFAULT,
    epe_at_spacing,
    model_at_spacing,
    train_3d,
)
from regseg.train.plcreg_recipe import Weights
from regseg.train.recipe_args import add_run_options


def add_arguments(parser: argparse.ArgumentParser, dim: int) -> None:
    """Options of ``regseg train plcreg2d`` / ``plcreg3d``."""
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--minutes", type=float, default=15.0,
                        help="wall-time budget including data generation (default 15)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data draw and the initial weights (default 0)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam learning rate (default 1e-3)")
    if dim == 2:
        parser.add_argument("--frames", type=int, default=2400, help="training frames")
        parser.add_argument("--phantoms", type=int, default=16, help="training phantoms 1..N")
        parser.add_argument("--val-frames", type=int, default=40, help="per held-out phantom")
        parser.add_argument("--batch-size", type=int, default=8,
                            help="frame pairs per step (default 8)")
        parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                            help="working grid (default 64 64)")
        parser.add_argument("--epe", type=float, default=0.1,
                            help="weight of the end-point error to the true field, in working-"
                                 "grid pixels (default 0.1; 0.05 was used at 128x128)")
        parser.add_argument("--cache-dir", type=Path,
                            default=Path.home() / ".cache" / "regseg" / "train",
                            help="simulated-frame cache (default ~/.cache/regseg/train)")
    else:
        parser.add_argument("--pool", type=int, default=96, help="deformed templates to pair")
        parser.add_argument("--val-pairs", type=int, default=4,
                            help="validation pairs, MNI152 seeds 20000.. (default 4)")
        parser.add_argument("--epe", type=float, default=None,
                            help="weight of the end-point error to the true field, in voxels "
                                 f"(default {EPE_3D:g} at {SPACING_DEFAULT:g} mm, scaled by "
                                 f"spacing / {SPACING_DEFAULT:g} so that a millimetre of error "
                                 "pulls the same at every --spacing)")
        parser.add_argument("--smooth", type=float, default=0.05, help="smoothness weight")
        parser.add_argument("--affine-scale", type=float, default=0.4,
                            help="scales the random affine of the training pairs (default 0.4)")
        parser.add_argument("--batch-size", type=int, default=1,
                            help="pairs per step, the global batch under torchrun (default 1)")
        parser.add_argument("--spacing", type=float_at_least(1.0, 6.5), default=SPACING_DEFAULT,
                            metavar="MM",
                            help="voxel size of the MNI grid the network works on, mm (default "
                                 f"{SPACING_DEFAULT:g}: 48 x 64 x 48, the CPU reduction; 1.5: "
                                 "104 x 144 x 104, the resolution users register brains at, "
                                 "for a GPU)")
        parser.add_argument("--channels", type=int_at_least(2), nargs="+", default=None,
                            metavar="C", help="encoder widths, finest first (default "
                            f"{' '.join(map(str, CONFIG_3D.channels))})")
        parser.add_argument("--window", type=int_at_least(1), nargs=3, default=None,
                            metavar=("D", "H", "W"), help="PoLaCA window, voxels (default "
                            f"{' '.join(map(str, CONFIG_3D.window))})")
    add_run_options(parser, threads=2, checkpoint_every=25)
    parser.set_defaults(dim=dim)


def run(args: argparse.Namespace) -> int:
    """Run a recipe from parsed arguments and print its held-out metrics."""
    try:
        return _run(args)
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    # the 3-D model's config is checked before anything starts or is written
    cfg = (model_at_spacing(args.spacing, channels=args.channels, window=args.window)
           if args.dim == 3 else None)
    dist = distributed.init(threads=args.threads)  # fewer threads per rank under torchrun
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dim == 2:
        summary = train_2d(args.out, minutes=args.minutes, seed=args.seed, frames=args.frames,
                           phantoms=args.phantoms, val_frames=args.val_frames,
                           batch_size=args.batch_size, lr=args.lr,
                           weights=Weights(epe=args.epe),
                           cache_dir=args.cache_dir, progress=not args.no_progress,
                           size=args.size, steps=args.steps, resume=args.resume,
                           checkpoint_every=args.checkpoint_every, dist=dist)
        if summary is None:  # a rank other than 0: rank 0 reports
            return 0
        print("affine only:", summary["affine_only"], "\nrefined:", summary["refined"])
    else:
        summary = train_3d(args.out, minutes=args.minutes, seed=args.seed, pool=args.pool,
                           val_pairs=args.val_pairs, lr=args.lr,
                           weights=Weights(dice=0.5, smooth=args.smooth,
                                           epe=epe_at_spacing(args.spacing, args.epe)),
                           progress=not args.no_progress, affine_scale=args.affine_scale,
                           batch_size=args.batch_size, steps=args.steps, resume=args.resume,
                           checkpoint_every=args.checkpoint_every, cfg=cfg,
                           spacing_mm=args.spacing, dist=dist)
        if summary is None:  # a rank other than 0: rank 0 reports
            return 0
        print("validation:", summary["validation"])
    print(f"wrote {args.out / (summary['model'] + '.pt')} after {summary['steps']} steps")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regseg.train.plcreg",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="recipe", required=True)
    add_arguments(sub.add_parser("2d", help="live 2-D refinement"), 2)
    add_arguments(sub.add_parser("3d", help="offline 3-D on MNI152 pairs"), 3)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
