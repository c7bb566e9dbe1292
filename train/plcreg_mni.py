"""PLCReg 3-D offline recipe: pairs of MNI152 templates deformed by known smooth fields.

``regseg train plcreg3d --out DIR`` (see :mod:`regseg.train.plcreg`) writes ``DIR/plcreg3d.pt``
and ``DIR/plcreg3d.json``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regseg import distributed, spatial
from regseg.models import reg_losses
from regseg.models.plcreg import PLCReg, PLCRegConfig
from regseg.registration_metrics import jacobian_stats, nanmean, sample_field
from regseg.sim import mni
from regseg.spatial import identity_grid, warp
from regseg.train.distributed import wrap
from regseg.train.plcreg_recipe import (
    StepProgress,
    Weights,
    recent_losses,
    save_run,
    take_step,
)
from regseg.train.resume import Checkpointer, load_state, state_path

#: The 3-D offline model at the reduced MNI grid (48 x 64 x 48 voxels of 3.25 mm).
CONFIG_3D = PLCRegConfig(ndim=3, size=(48, 64, 48), channels=(8, 16, 32, 32), heads=4,
                         window=(3, 4, 3))
#: The recipe's default voxel size, mm: the CPU reduction the shipped ``plcreg3d`` is trained at.
SPACING_DEFAULT = 3.25
#: Above this many working-grid voxels (4 x the shipped grid) a CPU run says it will be slow.
CPU_GRID_VOXELS = 4 * 48 * 64 * 48
#: The end-point-error weight at :data:`SPACING_DEFAULT` (the error is in voxels).
EPE_3D = 0.1


def epe_at_spacing(spacing_mm: float, epe: float | None = None) -> float:
    """``epe`` if given, else :data:`EPE_3D` scaled by ``spacing_mm / SPACING_DEFAULT``: a
    millimetre is more voxels on a finer grid, so the weight shrinks to keep the pull per mm (as
    the 2-D recipe doubled it when its grid halved)."""
    return float(epe) if epe is not None else EPE_3D * spacing_mm / SPACING_DEFAULT


def grid_at_spacing(spacing_mm: float, levels: int) -> mni.MniConfig:
    """The MNI box of the shipped model (156 x 208 x 156 mm) on ``spacing_mm`` voxels, each axis
    rounded *up* to a multiple of ``2 ** (levels - 1)`` (what the network's pooling needs), the
    spacing kept exact: 3.25 mm -> 48 x 64 x 48, 2.0 mm -> 80 x 104 x 80, 1.5 mm -> 104 x 144 x
    104 voxels (I, J, K). ``mni.load_base`` centres the grid on the brain.

    Raises:
        InputError: a spacing that is not a positive number, or a grid under 8 voxels.
    """
    grid = mni.config_at_spacing(spacing_mm)
    factor = 2 ** (levels - 1)
    return dataclasses.replace(grid, shape=tuple(-(-n // factor) * factor for n in grid.shape))


def model_at_spacing(spacing_mm: float = SPACING_DEFAULT, *,
                      channels: tuple[int, ...] | None = None,
                      window: tuple[int, ...] | None = None) -> PLCRegConfig:
    """:data:`CONFIG_3D` with its working grid at ``spacing_mm`` (:func:`grid_at_spacing`) and,
    if given, other encoder widths and PoLaCA window (voxels of the first attention level)."""
    cfg = dataclasses.replace(CONFIG_3D, channels=tuple(channels or CONFIG_3D.channels),
                              window=tuple(window or CONFIG_3D.window))
    grid = grid_at_spacing(spacing_mm, len(cfg.channels))
    return dataclasses.replace(cfg, size=tuple(grid.shape[::-1]))


def mni_pool(base: mni.MniBase, n: int, seed: int, affine_scale: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` deformed, intensity-changed templates (half "other modality") and their tissue maps.

    Args:
        affine_scale: multiplies the config's rotation, scale and shift bounds: the network
            works after the affine stage, so it mostly needs to learn what an affine leaves.
    Returns:
        images (n, 1, K, J, I) float16 in [0, 1], maps (n, 2, K, J, I) float16 (grey, white),
        and the template displacements u (n, 3, K, J, I) float32: image(x) = T(x + u(x)).
    """
    c = base.config
    cfg = dataclasses.replace(c, rotation_deg=c.rotation_deg * affine_scale,
                              scale=c.scale * affine_scale, shift_mm=c.shift_mm * affine_scale)
    images, maps, fields = [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 3])
        u = mni.random_displacement(rng, cfg)
        img = warp(base.t1, u, padding_mode="zeros")
        images.append(mni.intensity_change(img, rng, cfg, other_modality=bool(i % 2)))
        maps.append(warp(base.probs[:, 1:], u, padding_mode="border"))
        fields.append(u)
    return torch.cat(images).half(), torch.cat(maps).half(), torch.cat(fields)


def true_pair_ddf(u_moving: torch.Tensor, u_fixed: torch.Tensor) -> torch.Tensor:
    """The displacement that aligns pool image ``moving`` to ``fixed``, (1, 3, K, J, I) voxels.

    Fixed voxel x shows template point x + u_f(x); the moving image shows it at z with
    z + u_m(z) = x + u_f(x) (fixed-point solve, ``regseg.sim.mni.invert_points``).
    """
    shape = tuple(u_fixed.shape[2:])
    grid = identity_grid(shape, device=u_fixed.device)
    targets = (grid + u_fixed[0]).reshape(3, -1).T
    z = mni.invert_points(u_moving, targets, iterations=15).T.reshape(3, *shape)
    return (z - grid)[None]


@torch.inference_mode()
def evaluate_3d(model: PLCReg, base: mni.MniBase, seeds: list[int]) -> dict[str, float]:
    """Dice (grey, white mean) before/after and folding on pairs of ``seeds`` (no affine stage)."""
    rows: dict[str, list[float]] = {"dice_before": [], "dice_after": [], "folding_pct": [],
                                    "tre_mm": []}
    for n, s in enumerate(seeds):
        pair = mni.make_pair(base, s, other_modality=bool(n % 2))
        fixed = torch.from_numpy(pair.fixed.transpose(2, 1, 0).copy())[None, None]
        moving = torch.from_numpy(pair.moving.transpose(2, 1, 0).copy())[None, None]
        lab_m = torch.from_numpy(pair.moving_labels.transpose(2, 1, 0).copy())[None, None]
        ddf = model.eval()(moving, fixed)["ddf"]
        moved = warp(lab_m.float(), ddf, mode="nearest", padding_mode="zeros")[0, 0].numpy()
        truth = pair.fixed_labels.transpose(2, 1, 0)
        before = pair.moving_labels.transpose(2, 1, 0)
        for key, pred in (("dice_before", before), ("dice_after", moved)):
            d = [2 * np.sum((pred == k) & (truth == k)) / max(1, np.sum(pred == k)
                                                              + np.sum(truth == k))
                 for k in (1, 2)]
            rows[key].append(float(np.mean(d)))
        rows["folding_pct"].append(jacobian_stats(ddf[0].numpy())["folding_pct"])
        ijk = spatial.apply(np.linalg.inv(pair.voxel_to_world), pair.landmarks_fixed_mm)
        kji = ijk[:, ::-1] + sample_field(ddf[0].numpy(), ijk[:, ::-1])
        moved_mm = spatial.apply(pair.voxel_to_world, kji[:, ::-1])
        rows["tre_mm"].append(float(np.linalg.norm(moved_mm - pair.landmarks_moving_mm,
                                                   axis=1).mean()))
    return {k: nanmean(v) for k, v in rows.items()}


def _pair_losses(out: dict[str, torch.Tensor], moving_maps: torch.Tensor,
                 fixed_maps: torch.Tensor, fixed: torch.Tensor, true_ddf: torch.Tensor | None,
                 weights: Weights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a batch of pairs: the *mean of each pair's loss* (so a batch split over
    ranks, whose gradients DDP averages, is the same batch; PLCReg's InstanceNorm keeps the
    pairs independent). Returns the loss and its parts (means over the pairs)."""
    rows: list[dict[str, torch.Tensor]] = []
    for p in range(fixed.shape[0]):
        one = slice(p, p + 1)
        moved_maps = warp(moving_maps[one], out["ddf"][one])
        parts = {
            "mind": reg_losses.mind_loss(fixed[one], out["moved"][one]),
            "dice": reg_losses.dice_loss(moved_maps, fixed_maps[one]),
            "smooth": reg_losses.gradient_loss(out["field"][one]),
        }
        if true_ddf is not None:  # the simulated pairs know their true field: supervise it too
            brain = (fixed_maps[one].sum(1, keepdim=True) > 0.5).float()
            parts["epe"] = reg_losses.endpoint_error(out["ddf"][one], true_ddf[one], brain)
        rows.append(parts)
    parts = {k: torch.stack([r[k] for r in rows]).mean() for k in rows[0]}
    loss = (weights.mind * parts["mind"] + weights.dice * parts["dice"]
            + weights.smooth * parts["smooth"])
    if "epe" in parts:
        loss = loss + weights.epe * parts["epe"]
    return loss, parts


def train_3d(out_dir: Path, *, minutes: float, seed: int, pool: int, val_pairs: int, lr: float,
             weights: Weights, progress: bool, affine_scale: float = 1.0, batch_size: int = 1,
             steps: int | None = None, resume: bool = False, checkpoint_every: int = 25,
             cfg: PLCRegConfig = CONFIG_3D, spacing_mm: float = SPACING_DEFAULT,
             dist: distributed.Dist | None = None) -> dict[str, Any] | None:
    """Train the offline model on MNI152-derived pairs; returns the summary (rank 0; ``None``
    on the other ranks under torchrun).

    Args:
        batch_size: pairs per step (the global batch; split evenly over torchrun's ranks).
        steps: stop after this many steps (still cut at the deadline); default: fill the time.
        resume: continue from ``out_dir/plcreg3d.state.pt`` (same options).
        checkpoint_every: steps between the resumable states (and at the end).
        cfg: the model (a smaller one in tests); the MNI grid follows ``cfg.size``.
        spacing_mm: the MNI grid's voxel size (``cfg.size`` voxels of it, centred on the
            brain; :func:`model_at_spacing` gives the model for the shipped box at a spacing).
        dist: this rank (default :func:`regseg.distributed.init`).
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = dist or distributed.init()
    dist.shard(batch_size)  # fails early unless the batch splits evenly over the ranks
    progress = progress and dist.main
    if dist.main and dist.device.type == "cpu" and np.prod(cfg.size) > CPU_GRID_VOXELS:
        print(f"plcreg3d: a {' x '.join(map(str, cfg.size))} grid on the CPU: expect tens of "
              "seconds per step (1.5 mm measured 28 s on 2 cores, against 1.4 s at 3.25 mm); a "
              "GPU is where this grid trains", file=sys.stderr, flush=True)
    base = mni.load_base(mni.MniConfig(shape=tuple(cfg.size[::-1]), spacing_mm=spacing_mm))
    images, maps, fields = mni_pool(base, pool, seed, affine_scale)  # the same on every rank
    data_s = time.monotonic() - t0
    torch.manual_seed(seed)  # the initial weights (DDP then copies rank 0's to every rank)
    model = PLCReg(cfg)
    net = wrap(model, dist)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr, amsgrad=True)
    gen = torch.Generator().manual_seed(seed)
    val_seeds = list(range(20_000, 20_000 + val_pairs))  # apart from the eval set (10000..)
    deadline = t0 + 60 * minutes - 20 * val_pairs - 10
    history: list[dict[str, float]] = []
    step = 0
    run_key = {"seed": seed, "pool": pool, "batch_size": batch_size, "lr": lr, "steps": steps,
               "config": dataclasses.asdict(cfg), "weights": dataclasses.asdict(weights),
               "spacing_mm": spacing_mm}
    state_file = state_path(out_dir, "plcreg3d")
    if resume:
        step, saved = load_state(state_file, model=model, optimiser=optimiser, generator=gen,
                                 run_key=run_key)
        history = saved["history"]
        deadline = time.monotonic() + saved["left_s"]
        if dist.main:
            print(f"resumed from {state_file} at step {step}", flush=True)
    dev = dist.device
    states = Checkpointer(state_file, model=model, optimiser=optimiser, generator=gen,
                          run_key=run_key, every=checkpoint_every, main=dist.main)
    bar = StepProgress("plcreg3d", deadline - time.monotonic(), progress)
    while True:
        now = time.monotonic()
        stop = now >= deadline or (steps is not None and step >= steps)
        if dist.from_main(float(stop)) >= 1.0:  # rank 0's clock decides for every rank
            break
        pairs = [torch.randperm(pool, generator=gen)[:2].tolist() for _ in range(batch_size)]
        mine = pairs[dist.shard(batch_size)]
        i, j = [p[0] for p in mine], [p[1] for p in mine]
        moving, fixed = images[i].float().to(dev), images[j].float().to(dev)
        net.train()
        out = net(moving, fixed)
        true = (torch.cat([true_pair_ddf(fields[a : a + 1].to(dev), fields[b : b + 1].to(dev))
                           for a, b in mine]) if weights.epe > 0 else None)
        loss, parts = _pair_losses(out, maps[i].float().to(dev), maps[j].float().to(dev), fixed,
                                   true, weights)
        step = take_step(optimiser, loss, parts, history, dist=dist, progress=bar)
        states.periodic(step, lambda: {"history": history,
                                       "left_s": deadline - time.monotonic()})
    bar.close()
    train_s = time.monotonic() - t0 - data_s
    if not dist.main:
        return None
    states.final(step, {"history": history, "left_s": deadline - time.monotonic()})
    model = model.cpu()
    summary = {"validation": evaluate_3d(model, base, val_seeds), "pool": pool, "steps": step,
               "batch_size": batch_size, "ranks": dist.world,
               "data_s": round(data_s, 1), "train_s": round(train_s, 1),
               "val_seeds": val_seeds, "mni_config": dataclasses.asdict(base.config),
               "pool_affine_scale": affine_scale,
               "final_losses": recent_losses(history, 25)}
    return save_run(out_dir, "plcreg3d", model, cfg, summary, weights, seed, lr, history=history)
