"""Train AlignSegNet on simulated TRUS frames within a wall-time budget; writes the shipped files.

``regseg train alignsegnet --out DIR`` (or ``python -m regseg.train.alignsegnet --out DIR``)
writes ``DIR/alignsegnet.pt`` (checkpoint with its config), ``DIR/alignsegnet.json`` (validation
metrics and the exact command) and ``DIR/alignsegnet_training.png`` (loss and Dice curves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from regseg import distributed
from regseg.errors import InputError
from regseg.models import losses
from regseg.models.alignsegnet import AlignSegNet, AlignSegNetConfig
from regseg.models.checkpoint import save_checkpoint
from regseg.train.alignsegnet_args import DEFAULT_CACHE, add_arguments  # noqa: F401
from regseg.train.alignsegnet_data import DEMO_SEED, frame_sets
from regseg.train.alignsegnet_eval import _validate, evaluate, save_plot  # noqa: F401
from regseg.train.appearance import AUGMENTS, augment_appearance
from regseg.train.data import OpenScanner, open_simulated_scanner
from regseg.train.distributed import main_first, wrap
from regseg.train.resume import Checkpointer, load_state, state_path

NAME = "alignsegnet"
VAL_SEED0 = 1000  # held-out validation phantoms are 1000, 1001, ...


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the joint loss ``seg + reg * dice_reg + transform * mse_points + kl * kl``."""

    lesion: float = 3.0  # lesion class weight inside the segmentation loss
    reg: float = 1.0
    transform: float = 30.0  # our addition; its units are small: 0.1 (5 % of the view) -> 0.01
    kl: float = 0.1


def augment_trus(trus: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-frame random gamma (0.7-1.4) and gain (0.8-1.25) on (B, 1, H, W) TRUS in [0, 1].

    Scanner presets differ mostly in gain and dynamic range; geometry is left alone because the
    true transform and labels would have to follow it.
    """
    b = trus.shape[0]
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(math.log(0.7), math.log(1.4),
                                                       generator=generator))
    gain = torch.exp(torch.empty(b, 1, 1, 1).uniform_(math.log(0.8), math.log(1.25),
                                                      generator=generator))
    return (trus.clamp_min(1e-4) ** gamma * gain).clamp(0.0, 1.0)


def joint_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
               weights: LossWeights) -> dict[str, torch.Tensor]:
    """The AlignSegNet training loss and its parts (each a scalar tensor; ``total`` is the sum).

    ``batch["reg_mask"]`` (optional, (B,) bool): the frames the registration losses (label Dice,
    transform, KL) are taken over; the segmentation loss always takes every frame.
    """
    keep = batch.get("reg_mask")
    if keep is not None and not bool(keep.any()):
        zero = out["theta"].sum() * 0.0
        reg = transform = kl = zero
    else:
        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if keep is None else t[keep]
        reg = losses.registration_dice_loss(rows(out["warped_labels"]), rows(batch["label_maps"]))
        transform = losses.transform_loss(rows(out["theta"]), rows(batch["theta"]))
        kl = losses.kl_alignment_loss(rows(out["trus_latent"]), rows(out["mri_latent"]))
    parts = {
        "seg": losses.segmentation_loss(out["logits"], batch["labels"],
                                        lesion_weight=weights.lesion),
        "reg": reg, "transform": transform, "kl": kl,
    }
    parts["total"] = (parts["seg"] + weights.reg * parts["reg"]
                      + weights.transform * parts["transform"] + weights.kl * parts["kl"])
    return parts


def lr_factor(step: int, done: float, *, warmup_steps: int) -> float:
    """Linear warm-up over the first steps, then cosine decay to 0 as ``done`` goes 0 -> 1."""
    warm = min(1.0, (step + 1) / warmup_steps)
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, done))))


def train_alignsegnet(
    out_dir: str | Path,
    *,
    minutes: float = 25.0,
    seed: int = 0,
    samples: int = 6000,
    train_phantoms: int = 16,
    val_phantoms: int = 4,
    val_frames: int = 100,
    batch_size: int = 16,
    lr: float = 2e-3,
    steps: int | None = None,
    validate_every_s: float = 120.0,
    threads: int = 2,
    config: dict[str, Any] | None = None,
    weights: LossWeights | None = None,
    cache_dir: str | Path | None = DEFAULT_CACHE,
    open_scanner: OpenScanner = open_simulated_scanner,
    randomise: bool = False,
    plain_fraction: float = 0.2,
    mri_stacks: bool = False,
    restyled_fraction: float = 0.0,
    restyled_losses: str = "all",
    init: str | Path | None = None,
    augment: str = "gain",
    progress: bool = True,
    command: str | None = None,
    resume: bool = False,
    checkpoint_every: int = 50,
) -> dict[str, Any] | None:
    """Generate (or load cached) simulated frames, train, validate, save; within ``minutes``.

    Args:
        out_dir: where the checkpoint, the metrics JSON and the plot go.
        minutes: wall-time budget for everything, data generation included.
        seed: seeds data generation, initialisation, batch order and augmentation.
        samples: training frames, spread over phantom seeds 1..``train_phantoms`` (seed 0, the
            demo case, is never trained on).
        val_phantoms, val_frames: held-out phantoms 1000.. and frames per phantom; the demo
            phantom (seed 0) gets ``val_frames`` frames too and is reported apart.
        steps: a fixed number of optimisation steps (reproducible, still cut at the deadline);
            by default training fills the budget and the schedule follows elapsed time.
        config: :class:`AlignSegNetConfig` overrides.
        weights: loss weights (default :class:`LossWeights`).
        threads: torch CPU threads for training (frame rendering always uses one).
        open_scanner: frame source (the simulated scanner; a stand-in in tests).
        randomise: train on domain-randomised cases (``regseg.sim.randomise``) instead, with
            ``plain_fraction`` of the frames from the plain scanner; validation then reports
            the held-out phantoms both plain (``validation``) and randomised
            (``validation_randomised``, the one the curves follow).
        mri_stacks: with ``randomise``, the randomised cases' MRI is half the time a thick,
            oblique T2 stack with labels drawn on its slices (``regseg.sim.mri_stack``),
            training and randomised validation alike.
        restyled_fraction: with ``randomise``, this share of the training frames comes from
            randomised cases re-rendered in a per-case style (``regseg.sim.restyle``);
            ``restyled_losses="segmentation"``: they train the segmentation loss only.
        init: start from this checkpoint's weights (fine-tuning) instead of a random init.
        augment: ``"gain"`` (random gamma and gain, :func:`augment_trus`) or ``"appearance"``
            (first :func:`regseg.train.appearance.augment_appearance`: random texture filters,
            intensity curves, blur/sharpening and bias fields; then gamma and gain).
        resume: continue the run whose state ``out_dir/alignsegnet.state.pt`` holds (same
            options; its schedule, batch order and remaining time budget carry on).
        checkpoint_every: steps between the resumable states rank 0 writes (and at the end).
    Under torchrun (:mod:`regseg.train.distributed`) ``batch_size`` is the global batch: each
    rank trains on its share of the same samples, rank 0 validates and writes.
    Returns:
        the summary written to ``alignsegnet.json`` (``None`` on ranks other than 0).
    """
    if augment not in AUGMENTS:
        raise InputError(f"--augment {augment!r}: expected one of {', '.join(AUGMENTS)}")
    if mri_stacks and not randomise:
        raise InputError("--mri-stacks: the MRI stacks are part of the domain randomisation; "
                         "add --randomise")
    if not 0.0 <= restyled_fraction <= 1.0 - (plain_fraction if randomise else 0.0) or (
            restyled_fraction and not randomise):
        raise InputError(f"--restyled-fraction {restyled_fraction}: expected 0 to "
                         f"1 - --plain-fraction, with --randomise")
    if restyled_losses not in ("all", "segmentation"):
        raise InputError(f"--restyled-losses {restyled_losses!r}: expected all or segmentation")
    t_start = time.monotonic()
    deadline = t_start + 60.0 * minutes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # default 2 threads (the target machine class is a 2-core CPU), fewer per rank under torchrun
    dist = distributed.init(threads=threads)
    progress = progress and dist.main
    torch.manual_seed(seed)
    cfg = AlignSegNetConfig(**(config or {}))
    dist.shard(batch_size)  # the global batch must split evenly: fail before any work
    weights = weights or LossWeights()
    size = (cfg.size, cfg.size)

    train_seeds = list(range(1, train_phantoms + 1))
    val_seeds = list(range(VAL_SEED0, VAL_SEED0 + val_phantoms))
    data_args = dict(size=size, seed=seed, progress=progress)
    with main_first(dist):  # local rank 0 fills the cache, the others read it
        train_set, val_set, plain_val_set, demo_set, n_restyled = frame_sets(
            cache_dir, train_seeds, val_seeds, samples, val_frames, open_scanner, randomise,
            plain_fraction, data_args, mri_stacks, restyled_fraction)
    data_s = time.monotonic() - t_start
    if dist.main:
        print(f"data: {len(train_set)} train / {len(val_set)} val / {len(demo_set)} demo frames "
              f"in {data_s:.0f} s", flush=True)

    model = AlignSegNet(cfg)
    init_meta = None
    if init is not None:
        model, init_meta = _load_init(init, cfg)
    net = wrap(model, dist)  # DDP averages the gradients over the ranks
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    val_history: list[dict[str, float]] = []
    t_train = time.monotonic()
    budget_s = 0.0
    if dist.main:
        val_history.append(_validate(model, val_set, 0, history))  # the untrained baseline
        # Reserve the final validation (val + demo frames) and saving; the rest trains.
        val_s = time.monotonic() - t_start - data_s
        extra = len(demo_set) + (len(plain_val_set) if plain_val_set is not None else 0)
        reserve_s = val_s * (1.0 + extra / len(val_set)) + 15.0
        t_train = time.monotonic()
        budget_s = deadline - reserve_s - t_train
    budget_s = dist.from_main(budget_s)
    if steps is None and budget_s <= 0 and not resume:
        raise InputError(f"--minutes {minutes}: data generation took {data_s:.0f} s and leaves no "
                         "time to train; raise --minutes or lower --samples.")
    order, cursor, step, compute_s = torch.randperm(len(train_set), generator=generator), 0, 0, 0.0
    run_key = {"seed": seed, "batch_size": batch_size, "samples": len(train_set), "lr": lr,
               "steps": steps, "config": dataclasses.asdict(cfg), "augment": augment}
    state_file = state_path(out_dir, NAME)
    if resume:
        step, saved = load_state(state_file, model=model, optimiser=optimiser,
                                 generator=generator, run_key=run_key)
        order, cursor, history = saved["order"], saved["cursor"], saved["history"]
        budget_s, compute_s = saved["budget_s"], saved["compute_s"]
        val_history = saved["val_history"] if dist.main else []
        t_train = time.monotonic() - saved["elapsed_s"]
        if dist.main:
            print(f"resumed from {state_file} at step {step}", flush=True)
    train_end = t_train + budget_s
    t_last_val = time.monotonic()
    states = Checkpointer(state_file, model=model, optimiser=optimiser, generator=generator,
                          run_key=run_key, every=checkpoint_every, main=dist.main)

    def state_extra(elapsed_s: float) -> dict:  # read when a state is written
        return dict(order=order, cursor=cursor, history=history, val_history=val_history,
                    budget_s=budget_s, compute_s=compute_s, elapsed_s=elapsed_s)

    bar = tqdm(desc="train", unit="step", disable=not progress, leave=False, initial=step)
    while True:
        # Progress drives the cosine schedule: by step with --steps (reproducible), else by wall
        # time, which stays right when the machine's speed changes mid-run (shared CPUs).
        # Rank 0's clock decides for every rank.
        now = time.monotonic()
        done = step / steps if steps is not None else (now - t_train) / (train_end - t_train)
        done = dist.from_main(1.0 if now >= train_end else done)
        if done >= 1.0:
            break
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(train_set), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        batch = train_set.batch(index)
        if restyled_losses == "segmentation" and n_restyled:
            batch["reg_mask"] = index < len(train_set) - n_restyled
        cursor += batch_size
        if augment == "appearance":  # drawn for the global batch, like the gain below
            batch["trus"] = augment_appearance(batch["trus"], generator)
        batch["trus"] = augment_trus(batch["trus"], generator)  # drawn for the global batch
        share = dist.shard(batch_size)
        batch = {k: v[share].to(dist.device) for k, v in batch.items()}
        for group in optimiser.param_groups:
            group["lr"] = lr * lr_factor(step, done, warmup_steps=20)
        net.train()
        out = net(batch["trus"], batch["mri"], batch["mri_labels"])
        parts = joint_loss(out, batch, weights)
        optimiser.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimiser.step()
        history.append(dist.mean({k: float(v.detach()) for k, v in parts.items()}))
        step += 1
        compute_s += time.monotonic() - now
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean([h['total'] for h in history[-10:]]):.3f}")
        if dist.main and time.monotonic() - t_last_val > validate_every_s:
            val_history.append(_validate(model, val_set, step, history))
            t_last_val = time.monotonic()
        states.periodic(step, lambda: state_extra(time.monotonic() - t_train))
    bar.close()
    train_s = time.monotonic() - t_train
    samples_per_s = step * batch_size / max(compute_s, 1e-9)
    if not dist.main:
        return None
    print(f"trained {step} steps in {train_s:.0f} s: {samples_per_s:.1f} samples/s "
          f"(optimisation only, {dist.world} rank(s))", flush=True)
    states.final(step, state_extra(train_s))
    val_history.append(_validate(model, val_set, step, history))
    held_out = {k: v for k, v in val_history[-1].items() if k != "step"}
    held_out_randomised = None
    if plain_val_set is not None:  # report the plain held-out set as "validation", as before
        held_out_randomised, held_out = held_out, evaluate(model, plain_val_set)
    demo = evaluate(model, demo_set)
    summary = {
        "model": NAME,
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": dataclasses.asdict(cfg),
        "loss_weights": dataclasses.asdict(weights),
        "seed": seed, "batch_size": batch_size, "lr": lr, "steps": step, "augment": augment,
        "threads": torch.get_num_threads(), "ranks": dist.world,
        "train_frames": len(train_set), "train_phantom_seeds": train_seeds,
        "val_phantom_seeds": val_seeds, "demo_phantom_seed": DEMO_SEED,
        "data_s": round(data_s, 1), "train_s": round(train_s, 1),
        "samples_per_s": round(samples_per_s, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "validation": held_out, "demo": demo,
        "torch": torch.__version__,
    }
    if randomise:
        summary.update(randomise=True, plain_fraction=plain_fraction,
                       validation_randomised=held_out_randomised)
        if mri_stacks:
            summary["mri_stacks"] = True
        if restyled_fraction:
            summary.update(restyled_fraction=restyled_fraction, restyled_losses=restyled_losses)
    if init_meta is not None:
        summary["init"] = init_meta
    save_checkpoint(out_dir / f"{NAME}.pt", NAME, model, cfg,
                    meta={"validation": held_out, "demo": demo, "command": summary["command"],
                          "steps": step, "seed": seed})
    save_plot(out_dir / f"{NAME}_training.png", history, val_history)
    summary["wall_s"] = round(time.monotonic() - t_start, 1)
    (out_dir / f"{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _load_init(path: str | Path, cfg: AlignSegNetConfig) -> tuple[AlignSegNet, dict[str, Any]]:
    """A model built from ``cfg`` with the weights of checkpoint ``path`` (its config must match).

    Returns:
        the model and what identifies the start point (path, sha256, its recorded command).
    """
    import hashlib

    from regseg.models.checkpoint import load_state, read_checkpoint

    checkpoint = read_checkpoint(path)
    if checkpoint["model"] != NAME or checkpoint["config"] != dataclasses.asdict(cfg):
        raise InputError(f"--init {path}: model {checkpoint['model']!r} with config "
                         f"{checkpoint['config']}, expected {NAME!r} with "
                         f"{dataclasses.asdict(cfg)}")
    model = AlignSegNet(cfg)
    load_state(model, checkpoint["state_dict"], path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return model, {"path": str(path), "sha256": digest,
                   "command": checkpoint["meta"].get("command")}


def run(args: argparse.Namespace, *, command: str | None = None) -> int:
    """Run ``regseg train alignsegnet`` from parsed arguments; prints the held-out metrics.

    ``command`` is recorded in the JSON; by default the process's own command line.
    """
    try:
        summary = _train_from_args(args, command)
    finally:
        distributed.shutdown()
    if summary is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    for name in ("validation", "validation_randomised", "demo"):
        if summary.get(name) is None:
            continue
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[name].items()))
    print(f"wrote {args.out / (NAME + '.pt')} ({summary['wall_s']:.0f} s)")
    return 0


def _train_from_args(args: argparse.Namespace, command: str | None) -> dict[str, Any] | None:
    return train_alignsegnet(
        args.out, minutes=args.minutes, seed=args.seed, samples=args.samples,
        train_phantoms=args.train_phantoms, val_phantoms=args.val_phantoms,
        val_frames=args.val_frames, batch_size=args.batch_size, lr=args.lr, steps=args.steps,
        validate_every_s=args.validate_every, threads=args.threads, cache_dir=args.cache_dir,
        randomise=args.randomise, plain_fraction=args.plain_fraction,
        mri_stacks=args.mri_stacks, restyled_fraction=args.restyled_fraction,
        restyled_losses=args.restyled_losses, init=args.init,
        augment=args.augment,
        progress=not args.no_progress, command=command, resume=args.resume,
        checkpoint_every=args.checkpoint_every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regseg.train.alignsegnet",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(argv),
               command=shlex.join(["python", "-m", "regseg.train.alignsegnet", *argv]))


if __name__ == "__main__":
    sys.exit(main())
