"""Train PLCReg: 2-D live refinement on simulated frames after the affine stage; 3-D on MNI152.

``regseg train plcreg2d --out DIR`` / ``regseg train plcreg3d --out DIR`` (or
``python -m regseg.train.plcreg {2d,3d} --out DIR``) write ``DIR/plcreg{2d,3d}.pt`` (checkpoint
with its config) and ``DIR/plcreg{2d,3d}.json`` (held-out metrics, timing and the exact command).
Both fit a wall-time budget: data generation counts against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from regseg import metrics, mni, planes, spatial
from regseg.errors import InputError
from regseg.models import reg_losses
from regseg.models.checkpoint import save_checkpoint
from regseg.models.plcreg import PLCReg, PLCRegConfig, count_parameters
from regseg.models.registry import default_weights_path, load_model
from regseg.registration_metrics import jacobian_stats, nanmean, sample_field
from regseg.spatial import identity_grid, warp
from regseg.train.data import frame_sample, mri_tensors, open_simulated_scanner

VAL_SEED0 = 1000  # held-out phantoms, as for AlignSegNet
LIVE_DATA_VERSION = 1

#: The 2-D live model: MRI plane + its two label maps (moving) against the TRUS frame (fixed).
CONFIG_2D = PLCRegConfig(ndim=2, size=(128, 128), moving_channels=3, fixed_channels=1,
                         channels=(8, 16, 32, 64), shared_encoder=False, heads=4, window=(8, 8))
#: The 3-D offline model at the reduced MNI grid (48 x 64 x 48 voxels of 3.25 mm).
CONFIG_3D = PLCRegConfig(ndim=3, size=(48, 64, 48), channels=(8, 16, 32, 32), heads=4,
                         window=(3, 4, 3))


@dataclasses.dataclass(frozen=True)
class Weights:
    """Loss weights. 2-D: Dice + epe * EPE + smooth * Grad; 3-D: MIND + dice * Dice + smooth
    (+ epe * EPE to the true field when asked)."""

    dice: float = 1.0
    epe: float = 0.05  # per voxel of end-point error (the simulator knows the true field)
    mind: float = 1.0
    smooth: float = 0.1


# ---------------------------------------------------------------------------------------- 2-D
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
    fan_mask: torch.Tensor  # (h, w) bool, inside the ultrasound sector

    def __len__(self) -> int:
        return self.fixed.shape[0]

    def batch(self, index: Any) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(list(index), dtype=torch.long)
        residual = (torch.zeros(len(index), 3, *self.fixed.shape[2:])
                    if self.residual_mm is None else self.residual_mm[index].float())
        return {"fixed": self.fixed[index].float(), "moving": self.moving[index].float(),
                "label_maps": self.label_maps[index].float(),
                "target_ddf": self.target_ddf[index].float(),
                "pixel_to_mm": self.pixel_to_mm[index], "residual_mm": residual}


def true_displacement(scanner: Any, pose: Any) -> torch.Tensor:
    """The simulator's tissue displacement of a pose at every frame pixel, (H, W, 2) (di, dj).

    Reads the scanner's private displacement model (regseg.scanner has no public accessor yet):
    the label at frame pixel p comes from the MRI at ``image_to_mri (p + d(p))``.
    """
    geo = scanner.geometry
    return scanner._displacement(pose, scanner._modes_pixel, geo.pixel_radial_ij,
                                 geo.pixel_depth_mm)


@torch.inference_mode()
def live_frames(phantom_seeds: list[int], per_phantom: int, *, seed: int,
                size: tuple[int, int], keep_residual: bool, progress: bool) -> LiveSet:
    """Render frames, run the shipped AlignSegNet on them, and build :class:`LiveSet`."""
    affine = load_model("alignsegnet")
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "fixed", "moving", "label_maps", "target_ddf", "pixel_to_mm", "residual_mm")}
    fan = None
    for ps in phantom_seeds:
        phantom, scanner = open_simulated_scanner(ps, seed * 100_003 + ps)
        mri, labels, world_to_voxel = mri_tensors(phantom)
        rng = np.random.default_rng([seed, ps, 4])
        for _ in range(per_phantom):
            pose = scanner.path.random_pose(rng)  # as SimulatedScanner.random_frame draws
            frame = scanner.render(pose, 0, noise_seed=int(rng.integers(2**62)))
            hw = tuple(frame.pixels.shape)
            s = frame_sample(frame, mri, labels, world_to_voxel, size)
            onehot = planes.labels_onehot(s["mri_labels"])
            theta = affine(s["trus"].float(), s["mri"].float(), onehot)["theta"][0].double()
            plane = metrics.registered_image_to_mri(theta.numpy(), frame.image_to_reference, hw)
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
            if fan is None:
                mask = torch.from_numpy(scanner.sector_mask)[None, None].float()
                fan = F.interpolate(mask, size=size, mode="nearest-exact")[0, 0] > 0.5
        if progress:
            print(f"  live frames: phantom {ps} done", flush=True)
    if fan is None:
        raise InputError("live_frames: no frames requested")
    cat = {k: torch.cat(v) if v else None for k, v in rows.items()}
    return LiveSet(**cat, fan_mask=fan)


def cached_live_set(cache_dir: Path | None, phantom_seeds: list[int], per_phantom: int, *,
                    seed: int, size: tuple[int, int], keep_residual: bool = True,
                    progress: bool = True) -> LiveSet:
    """:func:`live_frames`, cached on disk by its arguments and the AlignSegNet weights' hash."""
    weights = default_weights_path("alignsegnet")
    if not weights.is_file():
        raise InputError(f"{weights}: the 2-D recipe refines the shipped AlignSegNet; train it "
                         "first (`regseg train alignsegnet --out models/weights`).")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    key = json.dumps({"v": LIVE_DATA_VERSION, "seeds": phantom_seeds, "n": per_phantom,
                      "seed": seed, "size": list(size), "affine": digest,
                      "residual": keep_residual})
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"live-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            return LiveSet(**torch.load(path, weights_only=True))
    data = live_frames(phantom_seeds, per_phantom, seed=seed, size=size,
                       keep_residual=keep_residual, progress=progress)
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
                                                          data.fan_mask.numpy())["folding_pct"])
    return {k: nanmean(v) for k, v in rows.items() if v}


def train_2d(out_dir: Path, *, minutes: float, seed: int, frames: int, phantoms: int,
             val_frames: int, batch_size: int, lr: float, weights: Weights,
             cache_dir: Path | None, progress: bool) -> dict[str, Any]:
    """Train the live model; returns the summary (written to ``plcreg2d.json``)."""
    t0 = time.monotonic()
    cfg = CONFIG_2D
    train_set = cached_live_set(cache_dir, list(range(1, phantoms + 1)), -(-frames // phantoms),
                                seed=seed + 7, size=cfg.size, keep_residual=False,
                                progress=progress)
    val_set = cached_live_set(cache_dir, list(range(VAL_SEED0, VAL_SEED0 + 4)), val_frames,
                              seed=seed, size=cfg.size, progress=progress)
    data_s = time.monotonic() - t0
    model = PLCReg(cfg)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True)
    gen = torch.Generator().manual_seed(seed)
    mask = train_set.fan_mask[None, None].float()
    deadline = t0 + 60 * minutes - 30  # keep half a minute for validation and saving
    step, history = 0, []
    while time.monotonic() < deadline:
        idx = torch.randint(len(train_set), (batch_size,), generator=gen)
        b = train_set.batch(idx)
        model.train()
        out = model(b["moving"], b["fixed"])
        parts = {
            "dice": reg_losses.dice_loss(out["moved"][:, 1:], b["label_maps"]),
            "epe": reg_losses.endpoint_error(out["ddf"], b["target_ddf"],
                                             mask.expand(len(idx), -1, -1, -1)),
            "smooth": reg_losses.gradient_loss(out["field"]),
        }
        loss = (weights.dice * parts["dice"] + weights.epe * parts["epe"]
                + weights.smooth * parts["smooth"])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
        step += 1
        if progress and step % 50 == 0:
            recent = {k: np.mean([h[k] for h in history[-50:]]) for k in history[-1]}
            print(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in recent.items()),
                  flush=True)
    train_s = time.monotonic() - t0 - data_s
    summary = {"affine_only": evaluate_2d(None, val_set), "refined": evaluate_2d(model, val_set)}
    summary.update(frames=len(train_set), val_frames=len(val_set), steps=step,
                   data_s=round(data_s, 1), train_s=round(train_s, 1), batch_size=batch_size,
                   final_losses={k: float(np.mean([h[k] for h in history[-50:]]))
                                 for k in history[-1]} if history else {})
    return _save(out_dir, "plcreg2d", model, cfg, summary, weights, seed, lr)


# ---------------------------------------------------------------------------------------- 3-D
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
    z + u_m(z) = x + u_f(x) (fixed-point solve, ``regseg.mni.invert_points``).
    """
    shape = tuple(u_fixed.shape[2:])
    grid = identity_grid(shape)
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


def train_3d(out_dir: Path, *, minutes: float, seed: int, pool: int, val_pairs: int, lr: float,
             weights: Weights, progress: bool, affine_scale: float = 1.0) -> dict[str, Any]:
    """Train the offline model on MNI152-derived pairs; returns the summary."""
    t0 = time.monotonic()
    cfg = CONFIG_3D
    base = mni.load_base(mni.MniConfig(shape=tuple(cfg.size[::-1])))
    images, maps, fields = mni_pool(base, pool, seed, affine_scale)
    data_s = time.monotonic() - t0
    model = PLCReg(cfg)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True)
    gen = torch.Generator().manual_seed(seed)
    val_seeds = list(range(20_000, 20_000 + val_pairs))  # apart from the eval set (10000..)
    deadline = t0 + 60 * minutes - 20 * val_pairs - 10
    step, history = 0, []
    while time.monotonic() < deadline:
        i, j = torch.randperm(pool, generator=gen)[:2].tolist()
        moving, fixed = images[i : i + 1].float(), images[j : j + 1].float()
        model.train()
        out = model(moving, fixed)
        moved_maps = warp(maps[i : i + 1].float(), out["ddf"])
        parts = {
            "mind": reg_losses.mind_loss(fixed, out["moved"]),
            "dice": reg_losses.dice_loss(moved_maps, maps[j : j + 1].float()),
            "smooth": reg_losses.gradient_loss(out["field"]),
        }
        loss = (weights.mind * parts["mind"] + weights.dice * parts["dice"]
                + weights.smooth * parts["smooth"])
        if weights.epe > 0:  # the simulated pairs know their true field: supervise it too
            brain = (maps[j : j + 1].float().sum(1, keepdim=True) > 0.5).float()
            true = true_pair_ddf(fields[i : i + 1], fields[j : j + 1])
            parts["epe"] = reg_losses.endpoint_error(out["ddf"], true, brain)
            loss = loss + weights.epe * parts["epe"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
        step += 1
        if progress and step % 25 == 0:
            recent = {k: np.mean([h[k] for h in history[-25:]]) for k in history[-1]}
            print(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in recent.items()),
                  flush=True)
    train_s = time.monotonic() - t0 - data_s
    summary = {"validation": evaluate_3d(model, base, val_seeds), "pool": pool, "steps": step,
               "data_s": round(data_s, 1), "train_s": round(train_s, 1),
               "val_seeds": val_seeds, "mni_config": dataclasses.asdict(base.config),
               "pool_affine_scale": affine_scale,
               "final_losses": {k: float(np.mean([h[k] for h in history[-25:]]))
                                for k in history[-1]} if history else {}}
    return _save(out_dir, "plcreg3d", model, cfg, summary, weights, seed, lr)


def _save(out_dir: Path, name: str, model: PLCReg, cfg: PLCRegConfig, summary: dict[str, Any],
          weights: Weights, seed: int, lr: float) -> dict[str, Any]:
    """Write ``<name>.pt`` and ``<name>.json``; the JSON holds the summary and the command."""
    command = shlex.join(["python", "-m", "regseg.train.plcreg", *sys.argv[1:]])
    summary = {"model": name, "command": command, "config": dataclasses.asdict(cfg),
               "loss_weights": dataclasses.asdict(weights), "seed": seed, "lr": lr,
               "parameters": count_parameters(model), "threads": torch.get_num_threads(),
               "device": "cpu", "torch": torch.__version__, **summary}
    meta = {k: v for k, v in summary.items() if k in ("command", "seed", "steps")}
    save_checkpoint(out_dir / f"{name}.pt", "plcreg", model, cfg, meta=meta)
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser, dim: int) -> None:
    """Options of ``regseg train plcreg2d`` / ``plcreg3d``."""
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--minutes", type=float, default=15.0,
                        help="wall-time budget including data generation (default 15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    if dim == 2:
        parser.add_argument("--frames", type=int, default=2400, help="training frames")
        parser.add_argument("--phantoms", type=int, default=16, help="training phantoms 1..N")
        parser.add_argument("--val-frames", type=int, default=40, help="per held-out phantom")
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--cache-dir", type=Path,
                            default=Path.home() / ".cache" / "regseg" / "train")
    else:
        parser.add_argument("--pool", type=int, default=96, help="deformed templates to pair")
        parser.add_argument("--val-pairs", type=int, default=4)
        parser.add_argument("--epe", type=float, default=0.1,
                            help="weight of the end-point error to the true field (default 0.1)")
        parser.add_argument("--smooth", type=float, default=0.05, help="smoothness weight")
        parser.add_argument("--affine-scale", type=float, default=0.4,
                            help="scales the random affine of the training pairs (default 0.4)")
    parser.set_defaults(dim=dim)


def run(args: argparse.Namespace) -> int:
    """Run a recipe from parsed arguments and print its held-out metrics."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dim == 2:
        summary = train_2d(args.out, minutes=args.minutes, seed=args.seed, frames=args.frames,
                           phantoms=args.phantoms, val_frames=args.val_frames,
                           batch_size=args.batch_size, lr=args.lr, weights=Weights(),
                           cache_dir=args.cache_dir, progress=not args.no_progress)
        print("affine only:", summary["affine_only"], "\nrefined:", summary["refined"])
    else:
        summary = train_3d(args.out, minutes=args.minutes, seed=args.seed, pool=args.pool,
                           val_pairs=args.val_pairs, lr=args.lr,
                           weights=Weights(dice=0.5, smooth=args.smooth, epe=args.epe),
                           progress=not args.no_progress, affine_scale=args.affine_scale)
        print("validation:", summary["validation"])
    print(f"wrote {args.out / (summary['model'] + '.pt')} after {summary['steps']} steps")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regseg.train.plcreg",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="recipe", required=True)
    add_arguments(sub.add_parser("2d", help="live 2-D refinement"), 2)
    add_arguments(sub.add_parser("3d", help="offline 3-D on MNI152 pairs"), 3)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
