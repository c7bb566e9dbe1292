"""PLCReg 2-D live recipe: simulated frames after the affine stage, refined by a deformable field.

``regseg train plcreg2d --out DIR`` (see :mod:`regseg.train.plcreg`) writes ``DIR/plcreg2d.pt``
and ``DIR/plcreg2d.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from regseg import distributed, metrics, planes
from regseg.errors import InputError
from regseg.models import reg_losses
from regseg.models.plcreg import PLCReg, PLCRegConfig
from regseg.models.registry import default_weights_path, load_model
from regseg.registration_metrics import jacobian_stats, nanmean
from regseg.spatial import warp
from regseg.train.data import CACHEABLE_SCANNERS, frame_sample, mri_tensors
from regseg.train.distributed import main_first, wrap
from regseg.train.plcreg_recipe import (
    StepProgress,
    Weights,
    recent_losses,
    save_run,
    take_step,
)
from regseg.train.resume import load_state, save_state, state_path

VAL_SEED0 = 1000  # held-out phantoms, as for AlignSegNet
LIVE_DATA_VERSION = 1

#: The 2-D live model: MRI plane + its two label maps (moving) against the TRUS frame (fixed).
#: Working grid 64x64 (a 256x256 frame's field at 4 frame pixels per model pixel): tissue
#: deformation under the probe is smooth, and the finest level at 128x128 cost 3x the time
#: (CPU, 1 thread: 26 vs 8 ms per frame, ONNX Runtime; bench/engines.py) for the live budget.
CONFIG_2D = PLCRegConfig(ndim=2, size=(64, 64), moving_channels=3, fixed_channels=1,
                         channels=(8, 16, 32, 64), shared_encoder=False, heads=4, window=(8, 8))


@dataclasses.dataclass
class LiveSet:
    """Simulated frames after the affine stage, on the model grid (N frames of (h, w)).

    ``moving`` is the MRI and its label maps resliced at the AlignSegNet-registered plane R,
    ``fixed`` the TRUS frame; ``target_ddf`` the in-plane displacement that maps each model pixel
    u to where the simulator truly took it from (``R F (u + ddf*) ~ true (F u + d(F u))``, F the
    model-to-frame map, d the tissue displacement); ``pixel_to_mm`` the (3, 2) linear part of
    R F and ``residual_mm`` what no in-plane field can reach (out-of-plane error), both for TRE.
    """

    fixed: torch.Tensor  # (N, 1, h, w) float16
    moving: torch.Tensor  # (N, 3, h, w) float16: MRI, prostate map, lesion map
    label_maps: torch.Tensor  # (N, 2, h, w) uint8 truth (prostate incl. lesion, lesion)
    target_ddf: torch.Tensor  # (N, 2, h, w) float16, pixels, (dy, dx)
    pixel_to_mm: torch.Tensor  # (N, 3, 2) float32
    residual_mm: torch.Tensor | None  # (N, 3, h, w) float16, kept for evaluation sets only
    fan_mask: torch.Tensor  # (N, h, w) bool (or one (h, w) for all), inside the sector

    def __len__(self) -> int:
        return self.fixed.shape[0]

    def batch(self, index: Any) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(list(index), dtype=torch.long)
        residual = (torch.zeros(len(index), 3, *self.fixed.shape[2:])
                    if self.residual_mm is None else self.residual_mm[index].float())
        fan = (self.fan_mask[index] if self.fan_mask.dim() == 3
               else self.fan_mask.expand(len(index), -1, -1))
        return {"fixed": self.fixed[index].float(), "moving": self.moving[index].float(),
                "fan_mask": fan,
                "label_maps": self.label_maps[index].float(),
                "target_ddf": self.target_ddf[index].float(),
                "pixel_to_mm": self.pixel_to_mm[index], "residual_mm": residual}


def true_displacement(scanner: Any, pose: Any) -> torch.Tensor:
    """The simulator's tissue displacement of a pose at every frame pixel, (H, W, 2) (di, dj).

    Reads the scanner's private displacement model (regseg.sim.scanner has no public accessor yet):
    the label at frame pixel p comes from the MRI at ``image_to_mri (p + d(p))``.
    """
    geo = scanner.geometry
    return scanner._displacement(pose, scanner._modes_pixel, geo.pixel_radial_ij,
                                 geo.pixel_depth_mm)


@torch.inference_mode()
def live_frames(phantom_seeds: list[int], per_phantom: int, *, seed: int,
                size: tuple[int, int], keep_residual: bool, progress: bool,
                scanner: str = "plain", refine: int = 1) -> LiveSet:
    """Render frames, run the shipped AlignSegNet on them, and build :class:`LiveSet`.

    ``scanner``: "plain" (the demo scanner) or "randomised" (regseg.sim.randomise, drawn per
    phantom). ``refine``: AlignSegNet calls, each re-slicing the MRI at the previous estimate
    (as the live chain's ``--refine-iterations``).
    """
    open_scanner = CACHEABLE_SCANNERS[scanner]
    affine = load_model("alignsegnet")
    affine_size = (affine.config.size, affine.config.size)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "fixed", "moving", "label_maps", "target_ddf", "pixel_to_mm", "residual_mm", "fan")}
    for ps in phantom_seeds:
        phantom, scanner = open_scanner(ps, seed * 100_003 + ps)
        mri, labels, world_to_voxel = mri_tensors(phantom)
        rng = np.random.default_rng([seed, ps, 4])
        for _ in range(per_phantom):
            pose = scanner.path.random_pose(rng)  # as SimulatedScanner.random_frame draws
            frame = scanner.render(pose, 0, noise_seed=int(rng.integers(2**62)))
            hw = tuple(frame.pixels.shape)
            # AlignSegNet sees its own grid; the PLCReg grid ``size`` may differ
            plane = frame.image_to_reference
            for _ in range(refine):  # re-slice at the current estimate and register again
                s = frame_sample(dataclasses.replace(frame, image_to_reference=plane), mri,
                                 labels, world_to_voxel, affine_size)
                onehot = planes.labels_onehot(s["mri_labels"])
                theta = affine(s["trus"].float(), s["mri"].float(), onehot)["theta"][0].double()
                plane = metrics.registered_image_to_mri(theta.numpy(), plane, hw)
            if affine_size != size:  # only the frame and its truth are read from ``s`` below
                s = frame_sample(frame, mri, labels, world_to_voxel, size)
            mri_r, lab_r = planes.mri_inputs(mri, labels, world_to_voxel, plane, hw, size)
            to_frame = planes.model_to_frame(hw, size)
            disp = true_displacement(scanner, pose).permute(2, 0, 1)[None].float()
            disp = F.interpolate(disp, size=size, mode="bilinear", align_corners=False)[0]
            v, u = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
            uv = torch.stack([u, v]).double().reshape(2, -1)
            p = torch.as_tensor(to_frame[:2, :2]) @ uv + torch.as_tensor(to_frame[:2, 3])[:, None]
            p = p + disp.double().reshape(2, -1)
            true = torch.as_tensor(frame.truth.image_to_mri)
            x_true = true[:3, :2] @ p + true[:3, 3:]
            r_f = torch.as_tensor(plane @ to_frame)
            offset = x_true - (r_f[:3, :2] @ uv + r_f[:3, 3:])
            lin = r_f[:3, :2]
            target = torch.linalg.pinv(lin) @ offset  # (dx, dy)
            rows["fixed"].append(s["trus"])
            rows["moving"].append(torch.cat([mri_r, lab_r], 1).half())
            rows["label_maps"].append(planes.labels_onehot(s["labels"][:, None]).to(torch.uint8))
            rows["target_ddf"].append(target.flip(0).reshape(1, 2, *size).half())
            rows["pixel_to_mm"].append(lin.float()[None])
            if keep_residual:
                rows["residual_mm"].append((offset - lin @ target).reshape(1, 3, *size).half())
            mask = torch.from_numpy(scanner.sector_mask)[None, None].float()
            rows["fan"].append(F.interpolate(mask, size=size, mode="nearest-exact")[0] > 0.5)
        if progress:
            print(f"  live frames: phantom {ps} done", flush=True)
    if not rows["fan"]:
        raise InputError("live_frames: no frames requested")
    cat = {k: torch.cat(v) if v else None for k, v in rows.items()}
    fan = cat.pop("fan")
    if bool((fan == fan[:1]).all()):  # one scanner: one mask
        fan = fan[0]
    return LiveSet(**cat, fan_mask=fan)


def cached_live_set(cache_dir: Path | None, phantom_seeds: list[int], per_phantom: int, *,
                    seed: int, size: tuple[int, int], keep_residual: bool = True,
                    progress: bool = True, scanner: str = "plain", refine: int = 1) -> LiveSet:
    """:func:`live_frames`, cached on disk by its arguments and the AlignSegNet weights' hash."""
    weights = default_weights_path("alignsegnet")
    if not weights.is_file():
        raise InputError(f"{weights}: the 2-D recipe refines the shipped AlignSegNet; train it "
                         "first (`regseg train alignsegnet --out models/weights`).")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    key = json.dumps({"v": LIVE_DATA_VERSION, "seeds": phantom_seeds, "n": per_phantom,
                      "seed": seed, "size": list(size), "affine": digest,
                      "residual": keep_residual,
                      # the original sets' keys (plain, one AlignSegNet call) are unchanged
                      **({"scanner": scanner} if scanner != "plain" else {}),
                      **({"refine": refine} if refine != 1 else {})})
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"live-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            return LiveSet(**torch.load(path, weights_only=True))
    data = live_frames(phantom_seeds, per_phantom, seed=seed, size=size,
                       keep_residual=keep_residual, progress=progress, scanner=scanner,
                       refine=refine)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dataclasses.asdict(data), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return data


@torch.inference_mode()
def evaluate_2d(model: PLCReg | None, data: LiveSet, batch_size: int = 32) -> dict[str, float]:
    """Held-out frames: prostate Dice and TRE (mm) of the MRI labels, affine-only vs refined.

    ``model=None`` gives the affine-only numbers. TRE is over the true prostate pixels of the
    model grid, between where the registration and the truth put each pixel in the MRI.
    """
    rows: dict[str, list[float]] = {"dice": [], "tre_mm": [], "folding_pct": []}
    for start in range(0, len(data), batch_size):
        b = data.batch(range(start, min(start + batch_size, len(data))))
        if model is None:
            ddf = torch.zeros_like(b["target_ddf"])
        else:
            ddf = model.eval()(b["moving"], b["fixed"])["ddf"]
        moved = warp(b["moving"][:, 1:2], ddf, mode="nearest", padding_mode="zeros")[:, 0] > 0.5
        truth = b["label_maps"][:, 0] > 0.5
        for n in range(ddf.shape[0]):
            p, t = moved[n], truth[n]
            total = int(p.sum() + t.sum())
            rows["dice"].append(float("nan") if total == 0 else 2 * float((p & t).sum()) / total)
            # error vector in mm: L (ddf - ddf*) with L the plane's (3, 2) pixel -> mm map
            diff = (ddf[n] - b["target_ddf"][n]).flip(0).reshape(2, -1)  # (dx, dy)
            err = b["pixel_to_mm"][n] @ diff - b["residual_mm"][n].reshape(3, -1)
            sel = t.reshape(-1)
            rows["tre_mm"].append(float(err[:, sel].norm(dim=0).mean()) if sel.any()
                                  else float("nan"))
            if model is not None:
                rows["folding_pct"].append(jacobian_stats(ddf[n].numpy(),
                                                          b["fan_mask"][n].numpy())["folding_pct"])
    return {k: nanmean(v) for k, v in rows.items() if v}


def fit(model: PLCReg, train_set: LiveSet, *, deadline: float, seed: int, batch_size: int,
        lr: float, weights: Weights, progress: bool, history: list[dict[str, float]],
        steps: int | None = None, dist: distributed.Dist | None = None,
        state: Path | None = None, resume: bool = False, checkpoint_every: int = 0,
        run_key: dict[str, Any] | None = None) -> int:
    """Train ``model`` on ``train_set`` until ``deadline`` (time.monotonic()) or ``steps``;
    returns the steps.

    Loss: Dice of the warped MRI labels vs the frame's truth, end-point error to the simulator's
    true field inside each frame's sector, smoothness of the field — each the mean over the
    frames of the batch, so that under torchrun (``dist``) every rank draws the same global batch,
    trains on its slice, and DistributedDataParallel's mean gradient is the whole batch's.
    ``state``: the resumable state file (rank 0 writes it every ``checkpoint_every`` steps and at
    the end; ``resume`` continues from it, ``history`` is then replaced by the saved one).
    """
    dist = dist or distributed.Dist()
    dist.shard(batch_size)  # fails early unless the batch splits evenly over the ranks
    net = wrap(model, dist)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr, amsgrad=True)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    run_key = run_key or {}
    if resume and state is not None:
        step, saved = load_state(state, model=model, optimiser=optimiser, generator=gen,
                                 run_key=run_key)
        history[:] = saved["history"]
        deadline = time.monotonic() + saved["left_s"]
        if dist.main:
            print(f"resumed from {state} at step {step}", flush=True)

    def save() -> None:
        if dist.main and state is not None:
            save_state(state, model=model, optimiser=optimiser, step=step, generator=gen,
                       run_key=run_key, extra={"history": history,
                                               "left_s": deadline - time.monotonic()})

    bar = StepProgress("plcreg2d", deadline - time.monotonic(), progress and dist.main)
    while True:
        stop = time.monotonic() >= deadline or (steps is not None and step >= steps)
        if dist.from_main(float(stop)) >= 1.0:  # rank 0's clock decides for every rank
            break
        idx = torch.randint(len(train_set), (batch_size,), generator=gen)
        b = train_set.batch(idx[dist.shard(batch_size)].tolist())
        b = {k: v.to(dist.device) for k, v in b.items()}
        net.train()
        out = net(b["moving"], b["fixed"])
        parts = {
            "dice": reg_losses.dice_loss(out["moved"][:, 1:], b["label_maps"], per_sample=True),
            "epe": reg_losses.endpoint_error(out["ddf"], b["target_ddf"],
                                             b["fan_mask"][:, None].float(), per_sample=True),
            "smooth": reg_losses.gradient_loss(out["field"]),
        }
        loss = (weights.dice * parts["dice"] + weights.epe * parts["epe"]
                + weights.smooth * parts["smooth"])
        step = take_step(optimiser, loss, parts, history, dist=dist, progress=bar)
        if checkpoint_every and step % checkpoint_every == 0:
            save()
    bar.close()
    save()
    return step


def train_2d(out_dir: Path, *, minutes: float, seed: int, frames: int, phantoms: int,
             val_frames: int, batch_size: int, lr: float, weights: Weights,
             cache_dir: Path | None, progress: bool,
             size: tuple[int, int] | None = None, steps: int | None = None,
             resume: bool = False, checkpoint_every: int = 25,
             cfg: PLCRegConfig | None = None, val_phantoms: int = 4,
             dist: distributed.Dist | None = None) -> dict[str, Any] | None:
    """Train the live model; returns the summary (written to ``plcreg2d.json``) on rank 0,
    ``None`` on the other ranks under torchrun.

    ``size`` overrides the working grid of :data:`CONFIG_2D` (e.g. (128, 128)); ``cfg`` the
    whole model (a smaller one in tests). ``steps``: stop after this many steps (still cut at the
    deadline). ``resume``: continue from ``out_dir/plcreg2d.state.pt`` (same options).
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = dist or distributed.init()
    cfg = cfg or CONFIG_2D
    if size is not None:
        cfg = dataclasses.replace(cfg, size=tuple(size))
    with main_first(dist):  # rank 0 renders (and caches) the frames; the others read them back
        train_set = cached_live_set(cache_dir, list(range(1, phantoms + 1)),
                                    -(-frames // phantoms), seed=seed + 7, size=cfg.size,
                                    keep_residual=False, progress=progress and dist.main)
        val_set = (cached_live_set(cache_dir, list(range(VAL_SEED0, VAL_SEED0 + val_phantoms)),
                                   val_frames, seed=seed, size=cfg.size,
                                   progress=progress and dist.main) if dist.main else None)
    data_s = time.monotonic() - t0
    torch.manual_seed(seed)  # the initial weights (DDP then copies rank 0's to every rank)
    model = PLCReg(cfg)
    history: list[dict[str, float]] = []
    run_key = {"seed": seed, "frames": frames, "phantoms": phantoms, "batch_size": batch_size,
               "lr": lr, "steps": steps, "config": dataclasses.asdict(cfg),
               "weights": dataclasses.asdict(weights)}
    step = fit(model, train_set, deadline=t0 + 60 * minutes - 30, seed=seed,
               batch_size=batch_size, lr=lr, weights=weights, progress=progress, history=history,
               steps=steps, dist=dist, state=state_path(out_dir, "plcreg2d"), resume=resume,
               checkpoint_every=checkpoint_every, run_key=run_key)
    train_s = time.monotonic() - t0 - data_s
    if not dist.main:
        return None
    model = model.cpu()
    summary = {"affine_only": evaluate_2d(None, val_set), "refined": evaluate_2d(model, val_set)}
    summary.update(frames=len(train_set), val_frames=len(val_set), steps=step,
                   data_s=round(data_s, 1), train_s=round(train_s, 1), batch_size=batch_size,
                   ranks=dist.world, final_losses=recent_losses(history, 50))
    return save_run(out_dir, "plcreg2d", model, cfg, summary, weights, seed, lr, history=history)
