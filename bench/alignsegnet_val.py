"""AlignSegNet checkpoints side by side on the family-A held-out validation sets (phantoms 1000..).

``python bench/alignsegnet_val.py --weights A.pt B.pt [--cache-dir DIR] [--json F]`` evaluates
each checkpoint (``regseg.train.alignsegnet_eval.evaluate``: Dice, TRE mean / median / p90 over
the true prostate) on the same frames the trainer validates on: the plain scanner, the randomised
one (``--randomise``) and the randomised one with thick, oblique MRI stacks (``--mri-stacks``).
The sets are loaded from (or rendered into) the trainer's cache, so the numbers are those a
training run reports. Family A only: selecting weights on family B would be tuning to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from regseg.models.registry import load_model
from regseg.train.alignsegnet import VAL_SEED0
from regseg.train.alignsegnet_args import DEFAULT_CACHE
from regseg.train.alignsegnet_eval import evaluate
from regseg.train.data import CACHEABLE_SCANNERS, cached_samples

SETS = {"plain": "plain", "randomised": "randomised", "randomised_stack": "randomised-stack"}
KEYS = ("prostate_dice", "lesion_dice", "reg_dice_after", "tre_mm_before_median",
        "tre_mm_after", "tre_mm_after_median", "tre_mm_after_p90")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", nargs="+", type=Path, required=True,
                   help="AlignSegNet checkpoints to compare")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help=f"the trainer's frame cache (default {DEFAULT_CACHE})")
    p.add_argument("--val-phantoms", type=int, default=4, help=f"phantoms {VAL_SEED0}..")
    p.add_argument("--val-frames", type=int, default=50, help="frames per phantom (default 50)")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS),
                   help="validation sets (default all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", type=Path, default=None, help="write the metrics here")
    args = p.parse_args(argv)
    for path in args.weights:
        if not path.is_file():
            print(f"alignsegnet_val: --weights {path}: no such file", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    seeds = list(range(VAL_SEED0, VAL_SEED0 + args.val_phantoms))
    models = {str(w): load_model(w) for w in args.weights}
    out: dict[str, dict] = {str(w): {"sha256": hashlib.sha256(w.read_bytes()).hexdigest()[:12]}
                            for w in args.weights}
    for name in args.sets:
        samples = cached_samples(args.cache_dir, seeds, args.val_frames, size=(128, 128),
                                 open_scanner=CACHEABLE_SCANNERS[SETS[name]],
                                 desc=f"{name} val frames")
        for path, model in models.items():
            metrics = evaluate(model, samples)
            out[path][name] = metrics
            print(f"{name:17s} {path}: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in KEYS),
                  flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]),
                                         "val_phantom_seeds": seeds, "results": out},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
