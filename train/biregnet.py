"""Train BiRegNet (cross-modality MRI <-> 3-D TRUS registration) on simulated sweep pairs.

``regseg train biregnet --out DIR`` writes ``DIR/biregnet.pt`` and ``DIR/biregnet.json`` (the
exact command, seconds, machine, validation Dice before/after).

Data (regseg.sim.sweep, TRAIN_SEEDS offsets 200.. only; the benches' ATLAS_SEEDS and EVAL_SEEDS
are never seen): ``--cases`` simulated cases (MRI + labels, direct-rendered TRUS volume +
labels). A sample is a pair (MRI of case a, TRUS of case b): the same patient (a = b) half the
time, another phantom otherwise. The affine stage in front is stood in for, to keep a step
cheap, by its typical result: the same patient: the true Reference -> MRI; another phantom: the
true one of b then the gland-moment affine from b's MRI to a's (centroids and per-axis spreads);
either way then a random rigid error (up to ``--affine-error-mm`` / degrees about the gland) and
a random scale (up to 4 %). Inputs come from the very function inference uses
(:func:`regseg.crossmodal.work_inputs`) on the work grid around the gland.

Loss (ARCHITECTURES §2.2, ``LabAttentionReg``): -(1/4) sum over sigma in {0, 1, 2, 4} of soft Dice
of the Gaussian-blurred labels, in both directions (moving labels through U against the fixed
labels, fixed labels through V against the moving ones; gland and lesion channels), + 0.1 x the
two image round trips mean |I - (I o V) o U|, + ``--smooth`` x the diffusion regulariser of U
and V (ours: the spec optimises none). Adam, lr ``--lr`` (the seed's 1e-5 over 15k steps does
not fit a CPU budget), batch 1 per rank.

Under torchrun (issue 15): regseg.distributed.init, the model wrapped by train.distributed.wrap,
the global batch drawn the same on every rank and sharded, the time budget from rank 0, and only
rank 0 writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from regseg.crossmodal import WorkGrid, gland_centre, work_inputs
from regseg.models.biregnet import BiRegNet, BiRegNetConfig
from regseg.models.checkpoint import save_checkpoint
from regseg.models.reg_losses import gradient_loss
from regseg.spatial import warp
from regseg.train.distributed import main_first, unwrap, wrap
from regseg.train.recipe_args import add_run_options
from regseg.train.resume import load_state, save_state, state_path

NAME = "biregnet"
CASE_OFFSET, VAL_OFFSET = 200, 950  # into regseg.sim.sweep.TRAIN_SEEDS
SIGMAS = (0.0, 1.0, 2.0, 4.0)
DEFAULT_CACHE = Path.home() / ".cache" / "regseg" / "biregnet"


def add_cli(p: argparse.ArgumentParser) -> None:
    """Options of ``regseg train biregnet`` (regseg/cli.py TRAIN_MODELS)."""
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--minutes", type=float_at_least(0.1), default=25.0,
                   help="wall-time budget of the optimisation (default 25; data is extra)")
    p.add_argument("--cases", type=int_at_least(2), default=24,
                   help="simulated training cases, TRAIN_SEEDS from offset 200 (default 24)")
    p.add_argument("--val-cases", type=int_at_least(1), default=4,
                   help="validation cases, TRAIN_SEEDS from offset 950 (default 4)")
    p.add_argument("--val-pairs", type=int_at_least(1), default=8,
                   help="validation pairs drawn from the validation cases (default 8)")
    p.add_argument("--size", type=int_at_least(16), default=32,
                   help="work grid voxels per axis, a multiple of 16, >= 32 (default 32)")
    p.add_argument("--spacing", type=float_at_least(0.5), default=2.0,
                   help="work grid voxel size in mm (default 2.0: a 64 mm cube at 32)")
    p.add_argument("--lr", type=float_at_least(1e-7), default=1e-3,
                   help="Adam learning rate (default 1e-3)")
    p.add_argument("--smooth", type=float_at_least(0.0), default=0.5,
                   help="weight of the diffusion regulariser on U and V (default 0.5)")
    p.add_argument("--affine-error-mm", type=float_at_least(0.0), default=3.0,
                   help="largest simulated affine-stage error, mm and degrees (default 3)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1,
                   help="pairs per step, global over the ranks (default 1)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of the weights and the pair draws (default 0)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"simulated-case cache (default {DEFAULT_CACHE})")
    add_run_options(p, threads=1, checkpoint_every=50)
    p.set_defaults(func=run)


def _cases(seeds: list[int], cache: Path, quiet: bool) -> list[Any]:
    """Simulated sweep cases (pickled per seed in ``cache``)."""
    import pickle

    from tqdm import tqdm

    from regseg.sim.sweep import make_sweep_case

    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in tqdm(seeds, desc="cases", unit="case", disable=quiet):
        path = cache / f"case_{seed}.pkl"
        if path.is_file():
            out.append(pickle.loads(path.read_bytes()))
            continue
        case = make_sweep_case(seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(case))
        tmp.replace(path)
        out.append(case)
    return out


def _moment_affine(src_labels, dst_labels) -> np.ndarray:
    """MRI world of one case -> another's: gland centroids matched, per-axis spreads scaled."""
    def stats(labels):
        idx = np.argwhere(labels.data > 0)
        pts = idx @ labels.voxel_to_world[:3, :3].T + labels.voxel_to_world[:3, 3]
        return pts.mean(0), pts.std(0)

    (cs, ss), (cd, sd) = stats(src_labels), stats(dst_labels)
    a = np.eye(4)
    a[:3, :3] = np.diag(sd / ss)
    a[:3, 3] = cd - a[:3, :3] @ cs
    return a


def draw_pair(cases: list[Any], rng: np.random.Generator, error: float, size: int,
              spacing: float) -> dict[str, Tensor]:
    """One training/validation pair's work-grid tensors (see the module docstring)."""
    from regseg.sim.sweep import _rotation, rigid_about

    b = int(rng.integers(len(cases)))
    a = b if rng.random() < 0.5 else int(rng.integers(len(cases)))
    fixed_case, moving_case = cases[b], cases[a]
    fixed_to_moving = fixed_case.reference_to_mri_true
    if a != b:
        fixed_to_moving = _moment_affine(fixed_case.mri_labels, moving_case.mri_labels) \
            @ fixed_to_moving
    centre = gland_centre(moving_case.mri_labels)
    rot = _rotation(rng.standard_normal(3), np.deg2rad(rng.uniform(0, error)))
    lin = rot * (1.0 + rng.uniform(-0.04, 0.04, 3))
    shift = rng.standard_normal(3)
    shift *= rng.uniform(0, error) / np.linalg.norm(shift)
    fixed_to_moving = rigid_about(centre, lin, shift) @ fixed_to_moving
    centre_fixed = gland_centre(moving_case.mri_labels, spatial.invert(fixed_to_moving))
    grid = WorkGrid.around(fixed_case.trus, centre_fixed + rng.uniform(-3, 3, 3), size, spacing)
    return work_inputs(moving_case.mri, fixed_case.trus, fixed_to_moving, grid,
                       moving_case.mri_labels, fixed_case.trus_labels)


def _blur(x: Tensor, sigma: float) -> Tensor:
    if sigma <= 0:
        return x
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        x = F.conv3d(F.pad(x, pad), k.reshape(shape).repeat(c, 1, 1, 1, 1), groups=c)
    return x


def multiscale_dice(a: Tensor, b: Tensor) -> Tensor:
    """Mean over :data:`SIGMAS` and channels of soft Dice of the blurred label maps."""
    total = 0.0
    for s in SIGMAS:
        x, y = _blur(a, s), _blur(b, s)
        dims = (2, 3, 4)
        total = total + (2 * (x * y).sum(dims) / (x.sum(dims) + y.sum(dims) + 1e-6)).mean()
    return total / len(SIGMAS)


def losses(model, batch: dict[str, Tensor], smooth: float) -> dict[str, Tensor]:
    out = model(batch["moving"], batch["fixed"])
    u, v = out["ddf"], out["ddf_inverse"]
    dice_u = multiscale_dice(warp(batch["moving_labels"], u, padding_mode="zeros"),
                             batch["fixed_labels"])
    dice_v = multiscale_dice(warp(batch["fixed_labels"], v, padding_mode="zeros"),
                             batch["moving_labels"])
    cyc_f = (batch["fixed"] - warp(warp(batch["fixed"], v), u)).abs().mean()
    cyc_m = (batch["moving"] - warp(warp(batch["moving"], u), v)).abs().mean()
    smooth_loss = gradient_loss(u) + gradient_loss(v)
    total = -dice_u - dice_v + 0.1 * (cyc_f + cyc_m) + smooth * smooth_loss
    return {"loss": total, "dice_u": dice_u, "dice_v": dice_v, "cycle": cyc_f + cyc_m,
            "smooth": smooth_loss}


@torch.inference_mode()
def validate(model: BiRegNet, pairs: list[dict[str, Tensor]]) -> dict[str, float]:
    """Gland Dice (hard, 0.5) of the moving labels on the fixed grid before and after U."""
    before, after = [], []
    for p in pairs:
        u = model(p["moving"], p["fixed"])["ddf"]
        truth = p["fixed_labels"][:, :1] > 0.5
        for moved, rows in ((p["moving_labels"][:, :1], before),
                            (warp(p["moving_labels"][:, :1], u, padding_mode="zeros"), after)):
            m = moved > 0.5
            rows.append(float(2 * (m & truth).sum() / max(1, int(m.sum() + truth.sum()))))
    return {"gland_dice_before": float(np.mean(before)), "gland_dice_after": float(np.mean(after))}


def run(args: argparse.Namespace) -> int:
    from regseg.sim.sweep import TRAIN_SEEDS
    from regseg.train.plcreg_recipe import StepProgress

    if args.size % 16 or args.size < 32:
        from regseg.errors import InputError
        raise InputError(f"--size {args.size}: a multiple of 16 from 32 expected (4 poolings "
                         "leave at least 2 voxels per axis)")
    t_start = time.perf_counter()
    with distributed.joined(threads=args.threads, device="cpu") as dist:
        if args.batch_size % dist.world:
            dist.shard(args.batch_size)  # raises the clear error
        seeds = [TRAIN_SEEDS[CASE_OFFSET + i] for i in range(args.cases)]
        val_seeds = [TRAIN_SEEDS[VAL_OFFSET + i] for i in range(args.val_cases)]
        with main_first(dist):
            cases = _cases(seeds, args.cache, args.no_progress or not dist.main)
            val_cases = _cases(val_seeds, args.cache, args.no_progress or not dist.main)
        val_rng = np.random.default_rng([args.seed, 99])
        val_pairs = [draw_pair(val_cases, val_rng, args.affine_error_mm, args.size, args.spacing)
                     for _ in range(args.val_pairs)]
        torch.manual_seed(args.seed)
        config = BiRegNetConfig(size=(args.size,) * 3, spacing_mm=args.spacing)
        model = BiRegNet(config)
        optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
        generator = torch.Generator().manual_seed(args.seed)
        run_key = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k in ("cases", "size", "spacing", "lr", "smooth", "affine_error_mm",
                            "batch_size", "seed")}
        step, extra = 0, {"history": [], "seconds": 0.0}
        if args.resume:
            step, extra = load_state(state_path(args.out, NAME), model=model,
                                     optimiser=optimiser, generator=generator, run_key=run_key)
        net = wrap(model, dist)
        val_start = validate(model, val_pairs)
        budget = dist.from_main(args.minutes * 60.0 - extra["seconds"])
        progress = StepProgress(NAME, budget, enabled=dist.main and not args.no_progress)
        t0, history = time.perf_counter(), extra["history"]
        while True:
            elapsed = dist.from_main(time.perf_counter() - t0)
            if elapsed >= budget or (args.steps is not None and step >= args.steps):
                break
            rng = np.random.default_rng([args.seed, step])  # the same global batch on every rank
            batch = [draw_pair(cases, rng, args.affine_error_mm, args.size, args.spacing)
                     for _ in range(args.batch_size)][dist.shard(args.batch_size)]
            parts = {k: torch.cat([b[k] for b in batch]) for k in batch[0]}
            model.train()
            out = losses(net, parts, args.smooth)
            optimiser.zero_grad()
            out["loss"].backward()
            optimiser.step()
            step += 1
            history.append(dist.mean({k: float(v.detach()) for k, v in out.items()}))
            progress.update(step, history)
            if dist.main and args.checkpoint_every and step % args.checkpoint_every == 0:
                args.out.mkdir(parents=True, exist_ok=True)
                save_state(state_path(args.out, NAME), model=unwrap(net), optimiser=optimiser,
                           step=step, generator=generator,
                           extra={"history": history,
                                  "seconds": extra["seconds"] + time.perf_counter() - t0},
                           run_key=run_key)
        progress.close()
        model.eval()
        if dist.main:
            val = validate(model, val_pairs)
            seconds = extra["seconds"] + time.perf_counter() - t0
            summary = {
                "model": NAME, "command": "regseg train biregnet " + shlex.join(sys.argv[3:])
                if sys.argv[1:3] == ["train", "biregnet"] else shlex.join(sys.argv),
                "config": dataclasses.asdict(config), "steps": step,
                "train_seconds": round(seconds, 1),
                "total_seconds": round(time.perf_counter() - t_start, 1),
                "ranks": dist.world, "threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {platform.processor() or ''} "
                           f"{torch.get_num_threads()} thread(s), shared 2-core CPU".strip(),
                "train_seeds": f"TRAIN_SEEDS[{CASE_OFFSET}:{CASE_OFFSET + args.cases}]",
                "val_seeds": f"TRAIN_SEEDS[{VAL_OFFSET}:{VAL_OFFSET + args.val_cases}]",
                "validation_start": val_start, "validation": val,
                "final_losses": {k: float(np.mean([h[k] for h in history[-50:]]))
                                 for k in (history[-1] if history else {})},
            }
            args.out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(args.out / f"{NAME}.pt", NAME, model, config, meta=summary)
            (args.out / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
            print(json.dumps({"steps": step, **val}))
    return 0
