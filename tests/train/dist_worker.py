"""Run by tests/train/test_distributed.py as one process or under torchrun: tiny recipes.

``python dist_worker.py OUT [--steps N] [--resume] [--recipes alignsegnet plcreg2d plcreg3d]``
trains the tiny AlignSegNet (stand-in scanner), the tiny PLCReg 2-D (16^2 grid, 4 simulated frames
after the shipped AlignSegNet) and the tiny PLCReg 3-D (16^3 MNI grid) with fixed steps and one
thread per rank, through the same functions ``regseg train`` runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from regseg import distributed
from regseg.models.plcreg import PLCRegConfig
from regseg.train.alignsegnet import train_alignsegnet
from regseg.train.plcreg_live import train_2d
from regseg.train.plcreg_mni import train_3d
from regseg.train.plcreg_recipe import Weights

sys.path.insert(0, str(Path(__file__).parent))
from test_ascseg_train import toy_data  # noqa: E402
from test_train_smoke import TINY, open_stand_in  # noqa: E402

TINY_3D = PLCRegConfig(ndim=3, size=(16, 16, 16), channels=(4, 8, 8), heads=2, window=(2, 2, 2))
TINY_2D = PLCRegConfig(ndim=2, size=(16, 16), moving_channels=3, fixed_channels=1,
                       channels=(4, 8, 8), shared_encoder=False, heads=2, window=(2, 2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--recipes", nargs="+",
                   default=["alignsegnet", "ascseg", "plcreg2d", "plcreg3d"])
    args = p.parse_args(argv)
    dist = distributed.init(threads=1)
    try:
        if "alignsegnet" in args.recipes:
            train_alignsegnet(args.out / "alignsegnet", minutes=5, steps=args.steps, samples=16,
                              train_phantoms=2, val_phantoms=1, val_frames=2, batch_size=4,
                              config=TINY, cache_dir=None, open_scanner=open_stand_in,
                              progress=False, command="test", threads=1, resume=args.resume,
                              checkpoint_every=1, validate_every_s=1e9)
        if "ascseg" in args.recipes:  # the 2-D segmenters' loop (train/seg_loop.py)
            from regseg.models.ascseg import ASCSeg, ASCSegConfig
            from regseg.train.seg_loop import fit

            torch.manual_seed(0)
            net = ASCSeg(ASCSegConfig(size=16, channels=(4, 4, 4, 4)))
            data = toy_data(n=8)
            (args.out / "ascseg").mkdir(parents=True, exist_ok=True)
            fit(net, data, data, seconds=1e9, batch_size=4, seed=0, progress=False,
                max_steps=args.steps, dist=dist, state=args.out / "ascseg" / "ascseg.state.pt",
                resume=args.resume, checkpoint_every=1, run_key={"test": 1})
        if "plcreg2d" in args.recipes:
            train_2d(args.out / "plcreg2d", minutes=5, seed=0, frames=4, phantoms=2,
                     val_frames=1, batch_size=2, lr=1e-3, weights=Weights(epe=0.1),
                     cache_dir=args.out / "cache2d", progress=False, steps=args.steps,
                     resume=args.resume, checkpoint_every=1, cfg=TINY_2D, val_phantoms=1,
                     dist=dist)
        if "plcreg3d" in args.recipes:
            train_3d(args.out / "plcreg3d", minutes=5, seed=0, pool=4, val_pairs=1, lr=1e-3,
                     weights=Weights(dice=0.5, smooth=0.05, epe=0.1), progress=False,
                     batch_size=2, steps=args.steps, resume=args.resume, checkpoint_every=1,
                     cfg=TINY_3D, dist=dist)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
