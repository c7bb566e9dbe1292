"""Train Affine3D (the learned 3-D affine stage) on MNI152 synthetic pairs with large affines.

``regseg train affine3d --out DIR`` writes ``DIR/affine3d.pt`` and ``DIR/affine3d.json`` (the
exact command, seconds, machine, validation point errors).

Data (drawn fresh every step, nothing cached): the bundled MNI152 template T on the PLCReg 3-D
grid (48 x 64 x 48 voxels of 3.25 mm, ``regseg.sim.mni``). A pair is ``fixed(x) = T(A_f x +
s_f(x))`` and ``moving(x) = T(A_m x + s_m(x))`` with smooth displacements s (peak 6 mm, as the
evaluation pairs), each image with its own intensity change (gamma, bias, noise) and, for every
second pair, the moving image in the "other modality" (``mni.intensity_change``). ``A_f`` is an
evaluation-sized affine (5 deg, 5 mm, 5 %); ``A_m`` is LARGER, up to ``--rotation-deg`` (20),
``--shift-mm`` (20 per axis) and ``--scale`` (0.15): the capture range. The true affine fixed ->
moving is ``A_m^-1 A_f``. Pairs come from ``np.random.default_rng([seed, step, pair, 318])``,
a stream apart from the evaluation (``make_pair`` seeds 10000.., ``[s, 152]``) and validation
(seeds 20000..) pairs; validation here uses the same generator at ``[20000 + n, 0, 0, 318]``.

Loss per pair (our choice): mean point error (mm) over 512 template brain points (grey + white
matter probability > 0.5) between the predicted and the true affine, / 10 mm, plus
``--mind`` x MIND between the fixed image and the moving image warped by the prediction, on the
network's grid. Adam, lr ``--lr`` with cosine decay over the run.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from regseg import distributed, spatial
from regseg.cli_checks import float_at_least, int_at_least
from regseg.models.affine3d import Affine3D, Affine3DConfig, count_parameters
from regseg.models.reg_losses import mind_loss
from regseg.sim import mni
from regseg.sim.phantom import random_rotation, smooth_noise
from regseg.train.distributed import unwrap, wrap
from regseg.train.recipe_args import add_run_options
from regseg.train.resume import Checkpointer, load_state, state_path

NAME = "affine3d"
#: Validation pairs: generator streams [VAL_SEED0 + n, 0, 0, 318], apart from training's.
VAL_SEED0 = 20_000
POINTS = 512


@dataclasses.dataclass(frozen=True)
class AffineRange:
    """Bounds of a random affine: rotation about a uniform axis (deg), per-axis scale change
    (fraction) and per-axis shift (mm)."""

    rotation_deg: float
    scale: float
    shift_mm: float


#: The fixed image's affine: the evaluation pairs' range (``mni.MniConfig``).
FIXED_RANGE = AffineRange(5.0, 0.05, 5.0)


def random_affine(rng: np.random.Generator, bounds: AffineRange, shape: tuple[int, ...],
                  spacing_mm: float) -> np.ndarray:
    """(4, 4) array-order voxel affine x -> L (x - c) + c + shift about the grid centre c."""
    rotation = random_rotation(rng)
    angle = np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))
    target = rng.uniform(0, np.radians(bounds.rotation_deg))
    rotation = mni._axis_rotation(rotation, target / max(angle, 1e-9))
    linear = rotation @ np.diag(1.0 + rng.uniform(-bounds.scale, bounds.scale, 3))
    centre = (np.asarray(shape) - 1) / 2.0
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ centre + rng.uniform(-bounds.shift_mm, bounds.shift_mm, 3
                                                        ) / spacing_mm
    return out


def render(base: mni.MniBase, affine: np.ndarray, rng: np.random.Generator,
           other_modality: bool) -> Tensor:
    """T(A x + s(x)) with a smooth s and an intensity change, (1, 1, K, J, I) in [0, 1],
    percentile-normalised as the registration engine normalises its inputs."""
    cfg = base.config
    shape = tuple(cfg.shape[::-1])
    grid = spatial.identity_grid(shape, dtype=torch.float64)
    a = torch.from_numpy(affine)
    moved = torch.einsum("ab,b...->a...", a[:3, :3], grid) + a[:3, 3].reshape(3, 1, 1, 1)
    smooth = np.stack([smooth_noise(rng, shape, cfg.warp_cells) for _ in range(3)])
    smooth *= cfg.warp_mm / cfg.spacing_mm / max(float(np.sqrt((smooth**2).sum(0)).max()), 1e-6)
    ddf = (moved - grid).float() + torch.from_numpy(smooth.astype(np.float32))
    image = spatial.warp(base.t1, ddf[None], padding_mode="zeros")
    image = mni.intensity_change(image, rng, cfg, other_modality)
    lo, hi = torch.quantile(image.flatten()[::7], torch.tensor([0.01, 0.99]))
    return ((image - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def to_normalised(points_kji: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(N, 3) array-order voxels -> (N, 3) normalised (x, y, z), align_corners=False."""
    size = torch.tensor(shape, dtype=points_kji.dtype)
    return ((2 * points_kji + 1) / size - 1).flip(-1)


@dataclasses.dataclass
class Pair:
    """One training pair on the network's grid and its truth at template brain points."""

    fixed: Tensor  # (1, 1, *size)
    moving: Tensor
    points: Tensor  # (N, 3) normalised fixed positions
    targets: Tensor  # (N, 3) normalised true moving positions


def make_training_pair(base: mni.MniBase, brain_kji: np.ndarray, stream: list[int],
                       moving_range: AffineRange, size: tuple[int, ...]) -> Pair:
    """The pair of generator ``stream`` (see the module docstring)."""
    rng = np.random.default_rng(stream)
    cfg = base.config
    shape = tuple(cfg.shape[::-1])
    a_f = random_affine(rng, FIXED_RANGE, shape, cfg.spacing_mm)
    a_m = random_affine(rng, moving_range, shape, cfg.spacing_mm)
    other = bool(rng.integers(2))
    fixed = render(base, a_f, rng, False)
    moving = render(base, a_m, rng, other)
    p = brain_kji[rng.choice(len(brain_kji), POINTS, replace=False)]
    p_h = np.concatenate([p, np.ones((len(p), 1))], 1)
    x = (np.linalg.inv(a_f) @ p_h.T).T[:, :3]  # where the template point is in the fixed image
    z = (np.linalg.inv(a_m) @ p_h.T).T[:, :3]  # ... and in the moving image
    factor = shape[0] // size[0]
    return Pair(fixed=F.avg_pool3d(fixed, factor), moving=F.avg_pool3d(moving, factor),
                points=to_normalised(torch.from_numpy(x).float(), shape),
                targets=to_normalised(torch.from_numpy(z).float(), shape))


def point_error_mm(theta: Tensor, pair: Pair, extent_mm: Tensor) -> Tensor:
    """Mean distance (mm) between theta's and the true images of the pair's points."""
    pred = pair.points @ theta[:, :3].T + theta[:, 3]
    return (((pred - pair.targets) * extent_mm / 2) ** 2).sum(-1).clamp_min(1e-9).sqrt().mean()


def pair_loss(theta: Tensor, pair: Pair, extent_mm: Tensor, mind: float
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Point error / 10 mm + ``mind`` x MIND(fixed, moving warped by theta)."""
    pe = point_error_mm(theta, pair, extent_mm)
    parts = {"point_mm": pe}
    loss = pe / 10.0
    if mind > 0:
        grid = F.affine_grid(theta[None], list(pair.fixed.shape), align_corners=False)
        warped = F.grid_sample(pair.moving, grid, padding_mode="zeros", align_corners=False)
        parts["mind"] = mind_loss(pair.fixed, warped)
        loss = loss + mind * parts["mind"]
    return loss, parts


def brain_points(base: mni.MniBase) -> np.ndarray:
    """Array-order voxel positions (N, 3) of the template's brain (grey + white > 0.5)."""
    return np.argwhere((base.probs[0, 1:].sum(0) > 0.5).numpy()).astype(np.float64)


@torch.inference_mode()
def validate(model: Affine3D, base: mni.MniBase, pairs: int, moving_range: AffineRange
             ) -> dict[str, float]:
    """Mean point error (mm) on ``pairs`` validation pairs: at the start, after the centre-of-mass
    alignment and after the network."""
    shape = tuple(base.config.shape[::-1])
    extent = torch.tensor(shape[::-1], dtype=torch.float32) * base.config.spacing_mm
    brain = brain_points(base)
    rows: dict[str, list[float]] = {"start_mm": [], "centre_of_mass_mm": [], "learned_mm": []}
    eye = torch.eye(3, 4)
    for n in range(pairs):
        pair = make_training_pair(base, brain, [VAL_SEED0 + n, 0, 0, 318], moving_range,
                                  tuple(model.config.size))
        out = model.eval()(pair.fixed, pair.moving)
        for key, theta in (("start_mm", eye), ("centre_of_mass_mm", out["initial"][0]),
                           ("learned_mm", out["theta"][0])):
            rows[key].append(float(point_error_mm(theta, pair, extent)))
    return {k: float(np.mean(v)) for k, v in rows.items()}


def lr_at(base_lr: float, done: float) -> float:
    """Cosine decay from ``base_lr`` to 5 % of it over the run (``done`` in [0, 1])."""
    return base_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def add_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--minutes", type=float_at_least(0.05), default=20.0,
                   help="wall-time budget of the optimisation (default 20)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4,
                   help="pairs per step, the global batch under torchrun (default 4)")
    p.add_argument("--lr", type=float_at_least(0.0), default=2e-3,
                   help="Adam learning rate, cosine-decayed (default 2e-3)")
    p.add_argument("--mind", type=float_at_least(0.0), default=0.5,
                   help="weight of the MIND similarity term (default 0.5)")
    p.add_argument("--rotation-deg", type=float_at_least(0.0), default=20.0,
                   help="largest rotation of the moving image's affine (default 20 deg)")
    p.add_argument("--shift-mm", type=float_at_least(0.0), default=20.0,
                   help="largest shift per axis of the moving image's affine (default 20 mm)")
    p.add_argument("--scale", type=float_at_least(0.0), default=0.15,
                   help="largest per-axis scale change of the moving image (default 0.15)")
    p.add_argument("--val-pairs", type=int_at_least(0), default=8,
                   help="validation pairs (generator streams 20000..; default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and training pairs")
    add_run_options(p, threads=1, checkpoint_every=50)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    from regseg.train.plcreg_recipe import StepProgress

    dist = distributed.init(threads=args.threads, device="cpu")
    mine = dist.shard(args.batch_size)  # fails early unless the batch splits over the ranks
    cfg = Affine3DConfig()
    base = mni.load_base()
    brain = brain_points(base)
    shape = tuple(base.config.shape[::-1])
    extent = torch.tensor(shape[::-1], dtype=torch.float32) * base.config.spacing_mm
    moving_range = AffineRange(args.rotation_deg, args.scale, args.shift_mm)
    torch.manual_seed(args.seed)  # the initial weights (DDP copies rank 0's to every rank)
    model = Affine3D(cfg)
    net = wrap(model, dist)
    optimiser = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)  # unused by the data; kept for resume
    budget = 60.0 * args.minutes
    history: list[dict[str, float]] = []
    step, used = 0, 0.0
    run_key = {"seed": args.seed, "batch_size": args.batch_size, "lr": args.lr,
               "mind": args.mind, "range": dataclasses.asdict(moving_range),
               "steps": args.steps, "config": dataclasses.asdict(cfg)}
    state_file = state_path(args.out, NAME)
    if args.resume:
        step, extra = load_state(state_file, model=model, optimiser=optimiser, generator=gen,
                                 run_key=run_key)
        history, used = extra["history"], extra["used_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    states = Checkpointer(state_file, model=model, optimiser=optimiser, generator=gen,
                          run_key=run_key, every=args.checkpoint_every, main=dist.main)
    bar = StepProgress(NAME, budget - used, dist.main and not args.no_progress)
    t_train = time.monotonic() - used
    while True:
        elapsed = time.monotonic() - t_train
        done = step / args.steps if args.steps else elapsed / budget
        stop = elapsed >= budget or (args.steps is not None and step >= args.steps)
        if dist.from_main(float(stop)) >= 1.0:  # rank 0's clock decides for every rank
            break
        for group in optimiser.param_groups:
            group["lr"] = lr_at(args.lr, dist.from_main(done))
        # every pair is a function of (seed, step, index): each rank draws only its shard
        pairs = [make_training_pair(base, brain, [args.seed, step, i, 318], moving_range,
                                    tuple(cfg.size))
                 for i in range(args.batch_size)[mine]]
        net.train()
        out = net(torch.cat([p.fixed for p in pairs]), torch.cat([p.moving for p in pairs]))
        losses = [pair_loss(out["theta"][n], p, extent, args.mind) for n, p in enumerate(pairs)]
        loss = torch.stack([l for l, _ in losses]).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        parts = {k: float(torch.stack([p[k] for _, p in losses]).mean().detach())
                 for k in losses[0][1]}
        history.append(dist.mean(parts))
        step += 1
        if dist.main:
            bar.update(step, history)
        states.periodic(step, lambda: {"history": history,
                                       "used_s": time.monotonic() - t_train})
    bar.close()
    train_s = time.monotonic() - t_train
    if not dist.main:
        return 0
    states.final(step, {"history": history, "used_s": train_s})
    model = unwrap(net).cpu().eval()
    t_val = time.monotonic()
    validation = validate(model, base, args.val_pairs, moving_range) if args.val_pairs else {}
    summary: dict[str, Any] = {
        "model": NAME, "command": ("regseg " if sys.argv[1:2] == ["train"] else
                                   "python -m regseg.train ") + shlex.join(sys.argv[1:]),
        "config": dataclasses.asdict(cfg), "parameters": count_parameters(model),
        "steps": step, "batch_size": args.batch_size, "ranks": dist.world, "lr": args.lr,
        "mind": args.mind, "seed": args.seed,
        "train_moving_range": dataclasses.asdict(moving_range),
        "train_fixed_range": dataclasses.asdict(FIXED_RANGE),
        "train_streams": f"np.random.default_rng([{args.seed}, step, pair, 318])",
        "val_streams": f"np.random.default_rng([{VAL_SEED0}.., 0, 0, 318]), {args.val_pairs}",
        "train_s": round(train_s, 1), "validate_s": round(time.monotonic() - t_val, 1),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                   f"thread(s), {platform.system()}", "torch": torch.__version__,
        "validation": validation,
        "final_losses": {k: float(np.mean([h[k] for h in history[-25:]]))
                         for k in (history[-1] if history else {})}}
    from regseg.models.checkpoint import save_checkpoint

    save_checkpoint(args.out / f"{NAME}.pt", NAME, model, cfg,
                    meta={k: summary[k] for k in ("command", "seed", "steps")})
    (args.out / f"{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("validation:", validation)
    print(f"wrote {args.out / (NAME + '.pt')} after {step} steps in {train_s:.0f} s")
    return 0
