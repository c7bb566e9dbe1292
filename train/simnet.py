"""Train SimNet (per-voxel atlas trust for label fusion) on simulated MRI-atlas -> TRUS pairs.

``regseg train simnet --out DIR`` writes ``DIR/simnet.pt`` and ``DIR/simnet.json`` (the exact
command, seconds, machine, validation Dice of vote / JLF / SimNet fusion).

Data (regseg.sim.sweep, TRAIN_SEEDS only; the bench's ATLAS_SEEDS and EVAL_SEEDS are never
seen): the MRIs of ``--atlases`` training cases are registered (regseg.crossmodal,
``--registration``) to the reconstructed TRUS sweeps of ``--targets`` other training cases;
each (atlas, target) pair is one sample, its inputs resampled to SimNet's working grid
(engines.label_fusion.simnet_inputs, the same function fusion uses). Validation: ``--val-targets``
further training-range cases fused from the same atlases. The set is cached (``--cache-dir``).

Recipe (ARCHITECTURES §2.3 SimNet, adapted to a CPU budget): Adam, lr 1e-3 with cosine decay
over the run (the seed: 1e-4, x0.96 per 1000 steps, 5003 steps); target s*(x) = fraction of the
3^3 cube around x where the atlas label equals the target's true label; loss = sigmoid cross-
entropy with s*, its mean over all voxels plus its mean over the band near either gland surface
(an addition: the contested voxels are a few percent of the volume). Augmentation: a random
integer shift of the atlas (image, foreground and labels together, U{-3..3} voxels per axis; the
seed shifts the label only) that simulates registration error, joint random flips, and a random
gamma on the target.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import distributed
from regseg.cli_checks import float_at_least, int_at_least
from regseg.models.simnet import SimNet, SimNetConfig, count_parameters
from regseg.train.distributed import main_first, unwrap, wrap
from regseg.train.recipe_args import add_run_options
from regseg.train.resume import load_state, save_state, state_path

NAME = "simnet"
#: Offsets into regseg.sim.sweep.TRAIN_SEEDS: targets, atlases, validation targets.
TARGET_OFFSET, ATLAS_OFFSET, VAL_OFFSET = 0, 500, 900


def add_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--minutes", type=float_at_least(0.1), default=20.0,
                   help="wall-time budget for the optimisation (default 20; data is extra)")
    p.add_argument("--targets", type=int_at_least(1), default=10,
                   help="training targets (TRUS sweeps of TRAIN_SEEDS cases; default 10)")
    p.add_argument("--atlases", type=int_at_least(1), default=6,
                   help="MRI atlases (other TRAIN_SEEDS cases) per target (default 6)")
    p.add_argument("--val-targets", type=int_at_least(0), default=2,
                   help="validation targets fused from the same atlases (default 2)")
    p.add_argument("--registration", choices=("biregnet", "affine"), default="affine",
                   help="atlas-to-target registration making the samples (default affine: "
                   "the shipped SimNet was trained before BiRegNet's weights existed)")
    p.add_argument("--batch-size", type=int_at_least(1), default=2,
                   help="pairs per step, the global batch under torchrun (default 2)")
    p.add_argument("--lr", type=float_at_least(0.0), default=1e-3,
                   help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and augmentation")
    p.add_argument("--size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="SimNet working grid (default 40 32 32; multiples of 8)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "regseg" / "train",
                   help="registered-pair cache (default ~/.cache/regseg/train)")
    add_run_options(p, threads=1, checkpoint_every=50)
    p.set_defaults(func=run)


@dataclasses.dataclass
class PairSet:
    """Samples at the working size: ``inputs`` (P, 3, *size) float16 (target, atlas image,
    atlas foreground), ``atlas_labels`` (P, *size) uint8, ``truth`` (T, *size) uint8 and the
    target of each pair ``target_of`` (P,) int64."""

    inputs: Tensor
    atlas_labels: Tensor
    truth: Tensor
    target_of: Tensor


def _key(**parts: Any) -> str:
    """Cache key of a registered set (its parameters; delete the cache after changing the
    registration code)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def _sweep_case(seed: int) -> Any:
    from regseg.sim.sweep import make_sweep_case

    return make_sweep_case(seed)


def registered(target_seeds: list[int], atlas_seeds: list[int], registration: str,
               progress: bool) -> list[dict[str, Any]]:
    """Per target: its TRUS volume, truth and every atlas registered to it (full resolution):
    ``{"target" (D,H,W), "truth" (D,H,W) uint8, "images" (N,D,H,W), "onehot" (N,3,D,H,W)}``."""
    from tqdm import tqdm

    from regseg.crossmodal import register_cross_modal
    from regseg.mas import SWEEP_GLAND_OFFSET_MM, Atlas, initial_transform
    from regseg.sim.sweep import make_sweep_case

    atlases = [_sweep_case(s) for s in tqdm(atlas_seeds, desc="atlas cases",
                                            disable=not progress)]
    out = []
    bar = tqdm(total=len(target_seeds) * len(atlas_seeds), desc="register pairs",
               disable=not progress)
    for seed in target_seeds:
        case = make_sweep_case(seed)
        images, onehots = [], []
        for atlas in atlases:
            start = initial_transform(Atlas("", atlas.mri, atlas.mri_labels), case.trus,
                                      "centre", SWEEP_GLAND_OFFSET_MM)
            r = register_cross_modal(atlas.mri, atlas.mri_labels, case.trus, n_classes=3,
                                     initial_fixed_to_moving=start, method=registration)
            images.append(torch.from_numpy(r.warped_image))
            onehots.append(torch.from_numpy(r.warped_onehot))
            bar.update()
        out.append({"target": torch.from_numpy(case.trus.data.astype(np.float32)),
                    "truth": torch.from_numpy(case.trus_labels.data.astype(np.uint8)),
                    "images": torch.stack(images).half(), "onehot": torch.stack(onehots).half()})
    bar.close()
    return out


def cached_registered(cache_dir: Path | None, target_seeds: list[int], atlas_seeds: list[int],
                      registration: str, progress: bool) -> list[dict[str, Any]]:
    """:func:`registered`, cached one target at a time (a killed run keeps what it did)."""
    out = []
    for seed in target_seeds:
        path = None if cache_dir is None else Path(cache_dir) / (
            "simnet-pairs-" + _key(t=seed, a=atlas_seeds, r=registration, i="centre") + ".pt")
        if path is not None and path.is_file():
            out.append(torch.load(path, weights_only=True))
            continue
        out += registered([seed], atlas_seeds, registration, progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(out[-1], path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
    return out


def to_pairs(cases: list[dict[str, Any]], size: tuple[int, int, int]) -> PairSet:
    """Working-size samples of every (atlas, target) pair (:class:`PairSet`)."""
    from regseg.engines.label_fusion import simnet_inputs

    inputs, labels, truth, target_of = [], [], [], []
    for t, case in enumerate(cases):
        truth_small = F.interpolate(F.one_hot(case["truth"].long(), 3).movedim(-1, 0)[None]
                                    .float(), size=size, mode="area")[0].argmax(0)
        truth.append(truth_small.to(torch.uint8))
        for image, onehot in zip(case["images"], case["onehot"], strict=True):
            x = simnet_inputs(case["target"], image.float(), onehot.float(), size)
            inputs.append(torch.cat([x["target"], x["atlas_image"], x["atlas_foreground"]], 1))
            small = F.interpolate(onehot.float()[None], size=size, mode="area")[0]
            labels.append(small.argmax(0).to(torch.uint8))
            target_of.append(t)
    return PairSet(torch.cat(inputs).half(), torch.stack(labels), torch.stack(truth),
                   torch.tensor(target_of))


def agreement(atlas_labels: Tensor, truth: Tensor) -> Tensor:
    """s*: fraction of the 3^3 cube where the atlas label equals the truth, (B, 1, *size)."""
    same = (atlas_labels == truth).float()[:, None]
    return F.avg_pool3d(F.pad(same, (1,) * 6, mode="replicate"), 3, stride=1)


def _shift(x: Tensor, shift: list[int]) -> Tensor:
    """Integer shift of (C, *size) with border replication (no wrap-around)."""
    pad, crop = [], []
    for s in reversed(shift):
        pad += [max(s, 0), max(-s, 0)]
    y = F.pad(x[None].float(), pad, mode="replicate")[0]
    for s, n in zip(shift, x.shape[1:], strict=True):
        start = max(-s, 0)
        crop.append(slice(start, start + n))
    return y[(slice(None), *crop)]


def batch_of(data: PairSet, index: list[int], gen: torch.Generator, augment: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs (B, 3, *size), atlas labels (B, *size), truth (B, *size)) with augmentation."""
    xs, labs, truths = [], [], []
    for i in index:
        x = data.inputs[i].float()
        lab = data.atlas_labels[i].float()[None]
        truth = data.truth[data.target_of[i]].float()[None]
        if augment:
            shift = torch.randint(-3, 4, (3,), generator=gen).tolist()
            atlas = _shift(torch.cat([x[1:], lab]), shift)
            x, lab = torch.cat([x[:1], atlas[:2]]), atlas[2:].round()
            flips = [d + 1 for d in range(3) if torch.rand(1, generator=gen) < 0.5]
            if flips:
                x, lab, truth = x.flip(flips), lab.flip(flips), truth.flip(flips)
            gamma = float(torch.empty(1).uniform_(0.7, 1.4, generator=gen))
            t = x[0]
            lo, hi = t.min(), t.max()
            t = ((t - lo) / (hi - lo).clamp_min(1e-6)) ** gamma
            x = torch.cat([((t - t.mean()) / t.std().clamp_min(1e-6))[None], x[1:]])
        xs.append(x)
        labs.append(lab[0])
        truths.append(truth[0])
    return torch.stack(xs), torch.stack(labs).long(), torch.stack(truths).long()


def loss_of(logit: Tensor, labels: Tensor, truth: Tensor) -> Tensor:
    """Sigmoid cross-entropy with s*, over all voxels plus over the band near the glands."""
    target = agreement(labels, truth)
    ce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    near = F.max_pool3d(((labels > 0) | (truth > 0)).float()[:, None], 7, stride=1, padding=3)
    band = near - (-F.max_pool3d(-((labels > 0) & (truth > 0)).float()[:, None], 7, stride=1,
                                 padding=3))
    band = band.clamp(0, 1)
    return ce.mean() + (ce * band).sum() / band.sum().clamp_min(1.0)


@torch.inference_mode()
def validate(model: SimNet, cases: list[dict[str, Any]]) -> dict[str, float]:
    """Mean gland Dice of vote / JLF / SimNet fusion on the validation targets."""
    from regseg.engines.label_fusion import LabelFusionEngine
    from regseg.metrics import dice

    engines = {m: LabelFusionEngine(m) for m in ("vote", "jlf")}
    engines["simnet"] = LabelFusionEngine("simnet", simnet_weights=model)
    rows: dict[str, list[float]] = {m: [] for m in engines}
    for case in cases:
        args = (case["target"], case["images"].float(), case["onehot"].float())
        for m, engine in engines.items():
            rows[m].append(dice(engine(*args).labels, case["truth"].numpy(), 1))
    return {f"gland_dice_{m}": float(np.mean(v)) if v else float("nan") for m, v in rows.items()}


def lr_at(lr: float, done: float) -> float:
    """Cosine decay from ``lr`` to 5 % of it over the run (``done`` in [0, 1])."""
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    from regseg.sim.sweep import TRAIN_SEEDS
    from regseg.train.plcreg_recipe import StepProgress

    t0 = time.monotonic()
    dist = distributed.init(threads=args.threads, device="cpu")
    dist.shard(args.batch_size)  # fails early unless the batch splits over the ranks
    progress = dist.main and not args.no_progress
    cfg = SimNetConfig(size=tuple(args.size)) if args.size else SimNetConfig()
    seeds = list(TRAIN_SEEDS)
    target_seeds = seeds[TARGET_OFFSET:TARGET_OFFSET + args.targets]
    atlas_seeds = seeds[ATLAS_OFFSET:ATLAS_OFFSET + args.atlases]
    val_seeds = seeds[VAL_OFFSET:VAL_OFFSET + args.val_targets]
    with main_first(dist):  # local rank 0 registers and caches; the others read the cache
        train_cases = cached_registered(args.cache_dir, target_seeds, atlas_seeds,
                                        args.registration, progress)
        val_cases = (cached_registered(args.cache_dir, val_seeds, atlas_seeds,
                                       args.registration, progress) if val_seeds else [])
    data = to_pairs(train_cases, tuple(cfg.size))
    del train_cases
    data_s = time.monotonic() - t0
    torch.manual_seed(args.seed)
    model = SimNet(cfg)
    net = wrap(model, dist)
    optimiser = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    budget = 60.0 * args.minutes
    history: list[float] = []
    step, used = 0, 0.0
    run_key = {"seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
               "targets": target_seeds, "atlases": atlas_seeds, "steps": args.steps,
               "registration": args.registration, "config": dataclasses.asdict(cfg)}
    state_file = state_path(args.out, NAME)
    if args.resume:
        step, extra = load_state(state_file, model=model, optimiser=optimiser, generator=gen,
                                 run_key=run_key)
        history, used = extra["history"], extra["used_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    bar = StepProgress(NAME, budget - used, progress)
    t_train = time.monotonic() - used
    while True:
        elapsed = time.monotonic() - t_train
        done = step / args.steps if args.steps else elapsed / budget
        stop = elapsed >= budget or (args.steps is not None and step >= args.steps)
        if dist.from_main(float(stop)) >= 1.0:
            break
        for group in optimiser.param_groups:
            group["lr"] = lr_at(args.lr, dist.from_main(done))
        index = torch.randint(len(data.target_of), (args.batch_size,), generator=gen).tolist()
        x, labels, truth = batch_of(data, index[dist.shard(args.batch_size)], gen, augment=True)
        net.train()
        out = net(x[:, :1], x[:, 1:2], x[:, 2:3])
        loss = loss_of(out["logit"], labels, truth)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append(dist.mean({"loss": float(loss.detach())})["loss"])
        step += 1
        if dist.main:
            bar.update(step, [{"loss": h} for h in history[-10:]])
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save_state(state_file, model=model, optimiser=optimiser, step=step,
                           generator=gen, run_key=run_key,
                           extra={"history": history, "used_s": time.monotonic() - t_train})
    bar.close()
    train_s = time.monotonic() - t_train
    if not dist.main:
        return 0
    save_state(state_file, model=model, optimiser=optimiser, step=step, generator=gen,
               run_key=run_key, extra={"history": history, "used_s": train_s})
    model = unwrap(net).cpu().eval()
    t_val = time.monotonic()
    validation = validate(model, val_cases) if val_cases else {}
    summary = {
        "model": NAME, "command": ("regseg " if sys.argv[1:2] == ["train"] else
                                   "python -m regseg.train ") + shlex.join(sys.argv[1:]),
        "config": dataclasses.asdict(cfg),
        "parameters": count_parameters(model), "steps": step, "batch_size": args.batch_size,
        "ranks": dist.world, "lr": args.lr, "seed": args.seed, "registration": args.registration,
        "train_target_seeds": target_seeds, "train_atlas_seeds": atlas_seeds,
        "val_target_seeds": val_seeds, "pairs": len(data.target_of),
        "data_s": round(data_s, 1), "train_s": round(train_s, 1),
        "validate_s": round(time.monotonic() - t_val, 1), "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                   f"thread(s), {platform.system()}", "torch": torch.__version__,
        "validation": validation,
        "final_loss": float(np.mean(history[-25:])) if history else float("nan")}
    from regseg.models.checkpoint import save_checkpoint

    save_checkpoint(args.out / f"{NAME}.pt", NAME, model, cfg,
                    meta={k: summary[k] for k in ("command", "seed", "steps")})
    (args.out / f"{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("validation:", validation)
    print(f"wrote {args.out / (NAME + '.pt')} after {step} steps")
    return 0
