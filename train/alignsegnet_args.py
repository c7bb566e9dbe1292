"""The options of ``regseg train alignsegnet`` (train/alignsegnet.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regseg.train.appearance import add_augment_argument
from regseg.train.recipe_args import add_run_options

DEFAULT_CACHE = Path.home() / ".cache" / "regseg" / "train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``regseg train alignsegnet``."""
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--minutes", type=float, default=25.0,
                        help="wall-time budget including data generation (default 25)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data draw and the initial weights (default 0)")
    parser.add_argument("--samples", type=int, default=6000, help="training frames")
    parser.add_argument("--train-phantoms", type=int, default=16,
                        help="training phantom seeds 1..N (seed 0 is the demo case)")
    parser.add_argument("--val-phantoms", type=int, default=4,
                        help="held-out phantoms for validation, seeds 1000.. (default 4)")
    parser.add_argument("--val-frames", type=int, default=100, help="frames per val phantom")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="frames per step; the global batch under torchrun (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="Adam learning rate (default 2e-3)")
    parser.add_argument("--validate-every", type=float, default=120.0,
                        help="seconds between validations (default 120)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"simulated-frame cache (default {DEFAULT_CACHE})")
    parser.add_argument("--randomise", action="store_true",
                        help="train on domain-randomised cases (regseg.sim.randomise)")
    parser.add_argument("--plain-fraction", type=float, default=0.2,
                        help="with --randomise: share of plain-scanner frames (default 0.2)")
    parser.add_argument("--mri-stacks", action="store_true",
                        help="with --randomise: half the randomised cases' MRI is a thick, "
                        "oblique T2 stack with labels drawn on its slices (regseg.sim.mri_stack)")
    parser.add_argument("--restyled-fraction", type=float, default=0.0,
                        help="with --randomise: share of frames re-rendered in another "
                        "appearance per case (regseg.sim.restyle; default 0)")
    parser.add_argument("--restyled-losses", choices=("all", "segmentation"), default="all",
                        help="what the restyled frames train: every loss (default) or only the "
                        "segmentation (the registration losses skip them)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this checkpoint (fine-tune) instead of random weights")
    add_augment_argument(parser)
    add_run_options(parser, threads=2, checkpoint_every=50)
