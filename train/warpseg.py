"""``regseg train warpseg``: WarpSeg from a few labelled atlases and registration pseudo-labels.

One command makes a shipped model: the data (phantoms, then ``regseg pseudolabel``'s registrations
of atlas ``ATLAS_SEEDS0`` to every unlabelled phantom, cached under ``--cache``), training until
``--minutes`` (data included) run out, validation on seeds 300..303, and
``OUT/warpseg_prostate.pt`` + ``.json`` (command, seconds, machine, validation) +
``_training.png``. ``--single-decoder`` trains the hierarchy ablation on the same data
(``warpseg_prostate_single.pt``). Under torchrun the global batch is sharded over the ranks
(train/distributed.py): the same seeded draw on every rank, rank 0's clock, rank 0 writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regseg import distributed
from regseg.cli_checks import float_at_least, int_at_least
from regseg.errors import InputError
from regseg.machine import machine_name, utc_now
from regseg.models.checkpoint import save_checkpoint
from regseg.models.warpseg import WarpSeg, WarpSegConfig, warpseg_loss
from regseg.train import resume as resume_state
from regseg.train.distributed import main_first, unwrap, wrap
from regseg.train.plcreg_recipe import StepProgress, recent_losses, save_curves, take_step
from regseg.train.recipe_args import add_run_options
from regseg.train.warpseg_data import (
    PROSTATE_CONFIG,
    PSEUDO_SETS,
    VAL_SEEDS,
    dump,
    fine_sets,
    prostate_training_set,
    quality_summary,
    validation_cases,
)

DEFAULT_CACHE = Path("runs/warpseg_data")
#: Share of each batch's draws that are labelled atlases (the rest: pseudo-labelled images).
ATLAS_SHARE = 0.35


def brain_seeds(labelled: int, unlabelled: int) -> dict[str, Any]:
    from regseg.train import warpseg_brain as b

    return {"atlas_seeds": "the MNI152 template + " + str(
        list(range(b.LABELLED_SEED0, b.LABELLED_SEED0 + labelled))),
        "unlabelled_seeds": list(range(b.UNLABELLED_SEED0, b.UNLABELLED_SEED0 + unlabelled)),
        "validation_seeds": list(range(b.VAL_SEED0, b.VAL_SEED0 + 4)),
        "evaluation_seeds": f"{b.EVAL_SEED0}.. (bench/warpseg.py --task brain)",
        "grid": "subjects 48 x 64 x 48 at 3.25 mm (regseg.sim.mni.MniConfig, CPU reduction); "
                "network working grid 32 x 40 x 32 (4.9 x 5.2 x 4.9 mm) over the same box",
        "pseudo_label_registration": f"affine {b.BRAIN_AFFINE}, PLCReg 3-D, then `refine` "
                                     "instance-optimisation steps"}


def recipe_command() -> str:
    """This run as one ``regseg train warpseg ...`` command (from ``regseg`` or ``python -m
    regseg.train``)."""
    argv = sys.argv[1:]
    rest = argv[argv.index("warpseg") + 1:] if "warpseg" in argv else argv
    return shlex.join(["regseg", "train", "warpseg", *rest])


def augment(images: torch.Tensor, labels: list[torch.Tensor], gen: torch.Generator,
            flip: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Left-right flip (p 0.5; ``flip=False``: never -- the brain's AAL regions are left or
    right, so a mirrored image would carry wrong labels), a shift of up to 3 voxels per axis,
    gamma 0.7..1.4, gain 0.85..1.15 and Gaussian noise (sigma up to 0.03), the same draw for a
    volume and its labels.

    Args:
        images: (B, 1, D, H, W); labels: tensors (B, ..., D, H, W) moved like the image.
    """
    out_i, out_l = [], [[] for _ in labels]
    for b in range(images.shape[0]):
        r = torch.rand(6, generator=gen)
        shift = [int(v) for v in torch.randint(-3, 4, (3,), generator=gen)]
        x = images[b]
        ls = [lab[b] for lab in labels]
        if flip and r[0] < 0.5:
            x, ls = x.flip(-1), [lab.flip(-1) for lab in ls]
        x = torch.roll(x, shift, dims=(-3, -2, -1))
        ls = [torch.roll(lab, shift, dims=(-3, -2, -1)) for lab in ls]
        gamma = float(0.7 + 0.7 * r[1])
        gain = float(0.85 + 0.3 * r[2])
        x = x.clamp_min(0) ** gamma * gain
        x = x + float(0.03 * r[3]) * torch.randn(x.shape, generator=gen)
        out_i.append(x)
        for k, lab in enumerate(ls):
            out_l[k].append(lab)
    return torch.stack(out_i), [torch.stack(v) for v in out_l]


def validate(model: WarpSeg, cases, config: WarpSegConfig) -> dict[str, float]:
    """Mean Dice of the coarse and the fine classes on the validation cases (a class missing from
    a prediction counts 0), through the engine's own pre/post-processing; with up to 8 classes,
    per class too."""
    from regseg.engines.warpseg import logits_to_image, to_working
    from regseg.models.warpseg import both_heads_coarse
    from regseg.registration_metrics import dice_per_label

    model.eval()
    groups = np.asarray(config.fine_groups)
    per: dict[str, list[float]] = {}
    with torch.inference_mode():
        for image, fine_truth in cases:
            out = model(torch.from_numpy(to_working(image, config))[None, None])
            out = {**out, "coarse": both_heads_coarse(out, config.fine_groups)}  # as the engine
            coarse, fine = logits_to_image(out, image, config)
            for level, pred, truth, names in (
                    ("fine", fine, fine_truth, config.fine_names),
                    ("coarse", coarse, groups[fine_truth], config.coarse_names)):
                d = dice_per_label(pred, truth, [c for c in range(1, len(names))
                                                 if (truth == c).any()])
                d = {k: 0.0 if np.isnan(v) else float(v) for k, v in d.items()}
                per.setdefault(f"dice_{level}_mean", []).append(float(np.mean(list(d.values()))))
                if len(names) <= 8:
                    for k, v in d.items():
                        per.setdefault("dice_" + names[k].replace(" ", "_"), []).append(v)
    return {k: round(float(np.mean(v)), 4) for k, v in per.items()}


def train_warpseg(out_dir: Path, *, minutes: float, atlases: int, unlabelled: int, refine: int,
                  batch_size: int, lr: float, seed: int, single_decoder: bool, cache: Path,
                  threads: int, progress: bool, steps: int | None = None, resume: bool = False,
                  checkpoint_every: int = 50, command: str | None = None,
                  task: str = "prostate") -> dict[str, Any] | None:
    """Build the data, train, validate, save; the summary (rank 0; None on other ranks)."""
    t0 = time.monotonic()
    dist = distributed.init(threads=threads)
    dist.shard(batch_size)
    progress = progress and dist.main
    name = f"warpseg_{task}" + ("_single" if single_decoder else "")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if task == "brain":
        from regseg.train.warpseg_brain import brain_config, brain_training_set

        config, lookup = brain_config()
        config = dataclasses.replace(config, single_decoder=single_decoder)
        with main_first(dist):
            data, val_cases = brain_training_set(labelled=atlases, unlabelled=unlabelled,
                                                 refine=refine, config=config, lookup=lookup,
                                                 progress=progress, cache=Path(cache) / "brain")
        pseudo_sets, seeds = None, brain_seeds(atlases, unlabelled)
    else:
        config = dataclasses.replace(PROSTATE_CONFIG, single_decoder=single_decoder)
        with main_first(dist):
            data = prostate_training_set(cache, atlases=atlases, unlabelled=unlabelled,
                                         refine=refine, config=config, progress=progress)
            val_cases = validation_cases(cache)
        pseudo_sets = None if single_decoder else PSEUDO_SETS
        seeds = {"atlas_seeds": list(range(100, 100 + atlases)),
                 "unlabelled_seeds": list(range(200, 200 + unlabelled)),
                 "validation_seeds": list(VAL_SEEDS),
                 "evaluation_seeds": "0 and 9000.. (bench/warpseg.py, tests/warpseg)"}
    data_s = time.monotonic() - t0
    deadline = t0 + 60.0 * minutes - 45.0  # the validation and saving after the loop
    if deadline <= time.monotonic() and steps is None:
        raise InputError(f"--minutes {minutes}: the data took {data_s:.0f} s and leaves no time "
                         "to train; raise --minutes")
    torch.manual_seed(seed)
    model = WarpSeg(config)
    net = wrap(model, dist)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    run_key = {"atlases": atlases, "unlabelled": unlabelled, "refine": refine, "lr": lr,
               "batch_size": batch_size, "seed": seed, "config": dataclasses.asdict(config)}
    state_file = resume_state.state_path(out_dir, name)
    history: list[dict[str, float]] = []
    step = 0
    if resume:
        step, extra = resume_state.load_state(state_file, model=model, optimiser=optimiser,
                                              generator=gen, run_key=run_key)
        history, deadline = extra["history"], time.monotonic() + extra["left_s"]
    n_atlas = int(data.exact.sum())
    n_all = len(data.exact)
    bar = StepProgress(name, deadline - time.monotonic(), progress)
    while True:
        stop = time.monotonic() >= deadline or (steps is not None and step >= steps)
        if dist.from_main(float(stop)) >= 1.0:
            break
        # the global batch, the same on every rank: atlases with ATLAS_SHARE, else pseudo-labelled
        pick_atlas = torch.rand(batch_size, generator=gen) < ATLAS_SHARE
        idx = torch.where(pick_atlas, torch.randint(0, n_atlas, (batch_size,), generator=gen),
                          torch.randint(n_atlas, n_all, (batch_size,), generator=gen))
        idx = idx[dist.shard(batch_size)]
        images, (coarse, fine) = augment(data.images[idx], [data.coarse[idx], data.fine[idx]], gen,
                                         flip=task != "brain")
        sets = fine_sets(fine, data.exact[idx], config.fine_classes, pseudo_sets)
        net.train()
        out = net(images.to(dist.device))
        loss, parts = warpseg_loss(out, coarse.to(dist.device), sets.to(dist.device),
                                   data.exact[idx].to(dist.device),
                                   data.weight[idx].to(dist.device), config)
        step = take_step(optimiser, loss, parts, history, dist=dist, progress=bar)
        if dist.main and checkpoint_every and step % checkpoint_every == 0:
            resume_state.save_state(state_file, model=model, optimiser=optimiser, step=step,
                                    generator=gen, run_key=run_key,
                                    extra={"history": history,
                                           "left_s": deadline - time.monotonic()})
    bar.close()
    if not dist.main:
        return None
    train_s = time.monotonic() - t0 - data_s
    model = unwrap(net).cpu()
    validation = validate(model, val_cases, config)
    summary = {
        "model": name, "command": command or recipe_command(),
        "config": dataclasses.asdict(config), "seed": seed, "lr": lr, "batch_size": batch_size,
        "steps": step, "threads": torch.get_num_threads(), "ranks": dist.world,
        "machine": machine_name(), "date": utc_now(),
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
        **seeds,
        "pseudo_label_quality": quality_summary(data.quality), "refine": refine,
        **({"pseudo_label_dice_vs_truth": {
            k: round(float(np.mean([r[f"dice_{k}"] for r in data.quality])), 4)
            for k in ("fine", "coarse")}} if task == "brain" else {}),
        "data_s": round(data_s, 1), "train_s": round(train_s, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "validation": validation, "final_losses": recent_losses(history, 25),
        "torch": torch.__version__,
    }
    save_checkpoint(out_dir / f"{name}.pt", "warpseg", model, config,
                    meta={"command": summary["command"], "steps": step, "seed": seed,
                          "validation": validation})
    save_curves(out_dir / f"{name}_training.png", history)
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    dump(out_dir / f"{name}.json", summary)
    return summary


def add_cli(p: argparse.ArgumentParser) -> None:
    """Options of ``regseg train warpseg`` (regseg/cli.py TRAIN_MODELS)."""
    p.add_argument("--task", choices=("prostate", "brain"), default="prostate",
                   help="prostate zones on phantom MRIs (default), or brain: AAL regions "
                        "grouped into lobes on MNI152-derived subjects")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--minutes", type=float_at_least(0.1), default=28.0,
                   help="wall-time budget including data and pseudo-labels (default 28)")
    p.add_argument("--atlases", type=int_at_least(1), default=4,
                   help="labelled atlases: prostate phantoms 100.. (the first is registered to "
                        "the unlabelled ones); brain: subjects 40000.. besides the template "
                        "(default 4)")
    p.add_argument("--unlabelled", type=int_at_least(1), default=16,
                   help="unlabelled cases given pseudo-labels: prostate phantoms 200.., brain "
                        "subjects 41000.. (default 16)")
    p.add_argument("--refine", type=int_at_least(0), default=None,
                   help="registration instance-optimisation steps for the pseudo-labels "
                        "(default: prostate 25, brain 10: what the shipped models' pseudo-labels "
                        "were made with)")
    p.add_argument("--single-decoder", action="store_true",
                   help="the ablation: one fine decoder, plain CE + Dice on hard pseudo-labels")
    p.add_argument("--batch-size", type=int_at_least(1), default=2,
                   help="volumes per step (global batch; default 2)")
    p.add_argument("--lr", type=float_at_least(1e-7), default=2e-3,
                   help="AdamW learning rate (default 2e-3)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of the initial weights, batches and augmentation (default 0)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"phantoms and pseudo-labels cache (default {DEFAULT_CACHE}; the brain's "
                        "pseudo-labels go to its brain/ subfolder)")
    add_run_options(p, threads=1, checkpoint_every=50)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``regseg train warpseg``."""
    if args.refine is None:
        from regseg.train.warpseg_brain import BRAIN_REFINE

        args.refine = BRAIN_REFINE if args.task == "brain" else 25
    summary = train_warpseg(
        args.out, minutes=args.minutes, atlases=args.atlases, unlabelled=args.unlabelled,
        refine=args.refine, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        single_decoder=args.single_decoder, cache=args.cache, threads=args.threads,
        progress=not args.no_progress, steps=args.steps, resume=args.resume,
        checkpoint_every=args.checkpoint_every, task=args.task)
    if summary is None:
        return 0
    print("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["validation"].items()))
    print(f"wrote {args.out / (summary['model'] + '.pt')} ({summary['wall_s']:.0f} s, "
          f"{summary['steps']} steps)")
    return 0
