"""Fine-tune the live PLCReg 2-D on domain-randomised family A, after the shipped AlignSegNet.

``python -m regseg.train.plcreg_randomised --out DIR [--init models/weights/plcreg2d.pt]``
writes ``DIR/plcreg2d.pt`` and ``DIR/plcreg2d.json``.

The deformable stage refines what the affine stage leaves. When AlignSegNet changes (it was
fine-tuned on randomised frames) or the frames look different, that residual changes too. This
recipe rebuilds the live training pairs with the shipped AlignSegNet refined as the live chain
refines (``--refine-iterations``), half from the demo scanner and half from the randomised
scanner (``regseg.sim.randomise``: probe, frame, speckle, gain, anatomy, MRI drawn per phantom),
fine-tunes the shipped model on them and reports the held-out TRE of the old and the new model on
plain and randomised family-A phantoms 1000-1003 (never family B). Phantom seeds: training
1..``--phantoms`` (AlignSegNet's training range), validation 1000-1003 or, with ``--val-seed0
3100``, the calibration phantoms 3100-3103.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from regseg.models.registry import WEIGHTS_DIR, load_model
from regseg.stream.capture import REFINE_ITERATIONS
from regseg.train.plcreg_live import (
    CONFIG_2D,
    VAL_SEED0,
    LiveSet,
    cached_live_set,
    evaluate_2d,
    fit,
)
from regseg.train.plcreg_recipe import Weights, recent_losses, save_run

DEFAULT_CACHE = Path.home() / ".cache" / "regseg" / "train"


def concat(sets: list[LiveSet]) -> LiveSet:
    """One LiveSet of several (per-frame sector masks)."""
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(s, name) for s in sets]
        return None if any(p is None for p in parts) else torch.cat(parts)

    fans = [s.fan_mask if s.fan_mask.dim() == 3 else s.fan_mask.expand(len(s), -1, -1)
            for s in sets]
    return LiveSet(fixed=cat("fixed"), moving=cat("moving"), label_maps=cat("label_maps"),
                   target_ddf=cat("target_ddf"), pixel_to_mm=cat("pixel_to_mm"),
                   residual_mm=cat("residual_mm"), fan_mask=torch.cat(fans))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regseg.train.plcreg_randomised",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, default=WEIGHTS_DIR / "plcreg2d.pt",
                        help="weights to fine-tune (default: the shipped PLCReg 2-D)")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time (data apart)")
    parser.add_argument("--frames", type=int, default=1600, help="training frames in all")
    parser.add_argument("--randomised-fraction", type=float, default=0.5)
    parser.add_argument("--phantoms", type=int, default=48, help="training phantoms 1..N")
    parser.add_argument("--val-frames", type=int, default=25, help="per held-out phantom")
    parser.add_argument("--val-seed0", type=int, default=VAL_SEED0,
                        help="held-out phantoms SEED0..SEED0+3 (default %(default)s, as for "
                        "AlignSegNet; 3100: the family-A calibration phantoms, which the "
                        "accuracy bench never evaluates on)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    t0 = time.monotonic()
    size, seeds = CONFIG_2D.size, list(range(1, args.phantoms + 1))
    n_rand = round(args.frames * args.randomised_fraction)
    common = dict(size=size, progress=progress, refine=REFINE_ITERATIONS)
    parts = []
    for scanner, n in (("plain", args.frames - n_rand), ("randomised", n_rand)):
        if n > 0:
            parts.append(cached_live_set(args.cache_dir, seeds, -(-n // len(seeds)),
                                         seed=args.seed + 7, keep_residual=False,
                                         scanner=scanner, **common))
    train_set = concat(parts)
    val_seeds = list(range(args.val_seed0, args.val_seed0 + 4))
    val = {scanner: cached_live_set(args.cache_dir, val_seeds, args.val_frames, seed=args.seed,
                                    scanner=scanner, **common)
           for scanner in ("plain", "randomised")}
    data_s = time.monotonic() - t0
    print(f"data: {len(train_set)} training, {sum(map(len, val.values()))} validation frames "
          f"({data_s:.0f} s)", flush=True)
    model = load_model(args.init)
    before = {k: {"affine_only": evaluate_2d(None, v), "init": evaluate_2d(model, v)}
              for k, v in val.items()}
    print("before:", before, flush=True)
    history: list[dict[str, float]] = []
    weights = Weights(epe=0.1)  # as the shipped model (plcreg2d.json loss_weights)
    t_train = time.monotonic()
    step = fit(model, train_set, deadline=t_train + 60 * args.minutes, seed=args.seed,
               batch_size=args.batch_size, lr=args.lr, weights=weights, progress=progress,
               history=history)
    train_s = time.monotonic() - t_train
    after = {k: evaluate_2d(model, v) for k, v in val.items()}
    print("after:", after, flush=True)
    command = shlex.join(["python", "-m", "regseg.train.plcreg_randomised",
                          *(argv if argv is not None else sys.argv[1:])])
    summary = {
        "command": command, "init": str(args.init),
        "affine_only": before["plain"]["affine_only"], "refined": after["plain"],
        "validation": {k: {**before[k], "refined": after[k]} for k in val},
        "frames": len(train_set), "randomised_frames": n_rand,
        "train_phantom_seeds": seeds, "val_phantom_seeds": val_seeds,
        "refine_iterations": REFINE_ITERATIONS, "val_frames": sum(map(len, val.values())),
        "steps": step, "data_s": round(data_s, 1), "train_s": round(train_s, 1),
        "batch_size": args.batch_size, "final_losses": recent_losses(history, 50),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_run(args.out, "plcreg2d", model, model.config, summary, weights, args.seed, args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
