"""Train QualityNet (the per-frame registration-error estimate) on family-A simulated frames.

``python -m regseg.train.quality --out models/weights`` writes ``qualitynet.pt`` (weights, config
and calibration) and ``qualitynet.json`` (metrics and the exact command).

A sample: a simulated frame (regseg.sim, family A) and the MRI resliced at its TRUE plane composed
with a KNOWN random rigid error about the gland (0-20 mm, 0-20 degrees, in and out of plane); the
target is that error's TRE over the frame's prostate pixels. The registered labels are the MRI
labels on that perturbed plane, as the live path has them after registration. Phantom seeds:
training 3000.., calibration 3100..; disjoint from AlignSegNet's (1..16), its validation and the
held-out evaluation phantoms (1000-1003) and from family B. Calibration (flag threshold, margin
factor) uses the calibration phantoms only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regseg import planes
from regseg.models.qualitynet import QualityNet, QualityNetConfig, save_qualitynet
from regseg.train.appearance import add_augment_argument, augment_appearance
from regseg.train.data import CACHEABLE_SCANNERS, mri_tensors

TRAIN_SEED0, CALIB_SEED0 = 3000, 3100
RAND_SEED0 = 3200  # randomised family-A training phantoms (regseg.sim.randomise)
DEFAULT_CACHE = Path.home() / ".cache" / "regseg" / "train"
DATA_VERSION = 1
MAX_ERROR_MM = 20.0  # the target given to frames without ultrasound content
TRE_POINTS = 400
BATCH = 64  # training pairs per step
BAD_MM, GOOD_MM = 5.0, 2.0  # a frame with TRE > BAD_MM must be flagged; <= GOOD_MM must not


def random_rigid(rng: np.random.Generator, centre: np.ndarray, shift_mm: float,
                 angle_deg: float) -> np.ndarray:
    """(4, 4) rotation by ``angle_deg`` about a random axis through ``centre``, then a shift of
    ``shift_mm`` in a random direction (world mm)."""
    axis, direction = rng.standard_normal(3), rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    direction /= np.linalg.norm(direction)
    a = math.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = centre + shift_mm * direction - rot @ centre
    return out


def draw_error(rng: np.random.Generator) -> tuple[float, float]:
    """(shift mm, angle deg): a third near-perfect, a third up to 6, a third up to 20."""
    scale = (1.0, 6.0, 20.0)[int(rng.integers(3))]
    return float(rng.uniform(0, scale)), float(rng.uniform(0, scale))


def generate(phantom_seeds: list[int], frames: int, errors: int, *, size: int, seed: int,
             progress: bool = True, scanner: str = "plain", open_scanner=None
             ) -> dict[str, torch.Tensor]:
    """Samples: trus, mri (N, 1, s, s) float16; mri_labels (N, 1, s, s) uint8; tre_mm (N,).

    ``scanner``: "plain" (the demo scanner) or "randomised" (regseg.sim.randomise: probe, frame
    size, spacing, speckle, gain, anatomy, MRI contrast drawn per case). ``open_scanner``:
    instead, ``(seed, scanner seed) -> (case with .mri and .labels, source with
    .random_frame(rng))`` (e.g. bench/quality_domain_gap.py's family-B cases)."""
    open_scanner = open_scanner or CACHEABLE_SCANNERS[scanner]
    torch.set_num_threads(1)
    rows: dict[str, list] = {"trus": [], "mri": [], "mri_labels": [], "tre_mm": [], "seed": []}
    for n, ps in enumerate(phantom_seeds):
        phantom, sim = open_scanner(ps, seed * 100_003 + ps)
        mri, labels, world_to_voxel = mri_tensors(phantom)
        rng = np.random.default_rng([seed, ps, 17])
        made = 0
        while made < frames:
            frame = sim.random_frame(rng)
            ji = np.argwhere(frame.truth.labels > 0)
            if len(ji) < 200:  # no gland in view: the TRE is undefined (flagged "no_gland" live)
                continue
            made += 1
            ji = ji[np.linspace(0, len(ji) - 1, min(TRE_POINTS, len(ji))).astype(int)]
            points = np.column_stack([ji[:, 1], ji[:, 0], np.zeros(len(ji)), np.ones(len(ji))])
            true = np.asarray(frame.truth.image_to_mri, np.float64)
            world = points @ true.T
            trus = planes.trus_input(torch.from_numpy(frame.pixels), (size, size))
            for _ in range(errors):
                error = random_rigid(rng, world[:, :3].mean(0), *draw_error(rng))
                plane = error @ true
                tre = float(np.linalg.norm(world @ (error.T - np.eye(4)), axis=1).mean())
                mri_plane, onehot = planes.mri_inputs(mri, labels, world_to_voxel, plane,
                                                      frame.pixels.shape, (size, size))
                rows["trus"].append(trus.half())
                rows["mri"].append(mri_plane.half())
                rows["mri_labels"].append((onehot[:, :1] + onehot[:, 1:]).to(torch.uint8))
                rows["tre_mm"].append(tre)
                rows["seed"].append(ps)
        if progress:
            print(f"  phantom {ps}: {n + 1}/{len(phantom_seeds)}", flush=True)
    out = {k: torch.cat(v) for k, v in rows.items() if k in ("trus", "mri", "mri_labels")}
    out["tre_mm"] = torch.tensor(rows["tre_mm"], dtype=torch.float32)
    out["seed"] = torch.tensor(rows["seed"])
    return out


def cached(cache_dir: Path | None, seeds: list[int], frames: int, errors: int, *, size: int,
           seed: int, scanner: str = "plain") -> dict[str, torch.Tensor]:
    key = {"v": DATA_VERSION, "seeds": seeds, "n": frames, "e": errors, "s": size, "seed": seed}
    if scanner != "plain":  # the plain key stays as it was (its caches remain valid)
        key["scanner"] = scanner
    key = json.dumps(key)
    path = None
    if cache_dir is not None:
        path = cache_dir / f"quality-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
    data = generate(seeds, frames, errors, size=size, seed=seed, scanner=scanner)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return data


def noise_frames(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, s, s) frames without ultrasound content: blank, iid, blurred or speckle noise."""
    kind = torch.randint(0, 4, (n,), generator=generator)
    level = torch.rand(n, 1, 1, 1, generator=generator)
    iid = torch.rand(n, 1, size, size, generator=generator)
    blurred = F.avg_pool2d(torch.rand(n, 1, size + 2, size + 2, generator=generator), 3, 1)
    speckle = torch.sqrt(-2 * torch.log(torch.rand(n, 1, size, size, generator=generator)
                                        .clamp_min(1e-6))) * 0.25
    out = torch.where(kind[:, None, None, None] == 0, level * 0.05, iid)
    out = torch.where(kind[:, None, None, None] == 2, blurred * (0.5 + level), out)
    out = torch.where(kind[:, None, None, None] == 3, speckle * (0.5 + level), out)
    return out.clamp(0, 1)


def model_input(trus: torch.Tensor, mri: torch.Tensor, mri_labels: torch.Tensor) -> torch.Tensor:
    """(B, 4, s, s): trus, mri, gland map, lesion map (label values 0/1/2 -> two maps)."""
    return torch.cat([trus, mri, planes.labels_onehot(mri_labels)], dim=1)


def augment(x: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
            noise_fraction: float = 0.05, appearance: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gain/gamma on the TRUS channel, random left-right flip of all channels, and a fraction of
    frames replaced by noise (target MAX_ERROR_MM). ``appearance``: first the TRUS channel's
    appearance is changed (:func:`regseg.train.appearance.augment_appearance`)."""
    b, size = x.shape[0], x.shape[-1]
    if appearance:
        x = torch.cat([augment_appearance(x[:, :1], generator), x[:, 1:]], dim=1)
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(math.log(0.6), math.log(1.6),
                                                       generator=generator))
    gain = torch.exp(torch.empty(b, 1, 1, 1).uniform_(math.log(0.7), math.log(1.4),
                                                      generator=generator))
    trus = (x[:, :1].clamp_min(1e-4) ** gamma * gain).clamp(0, 1)
    noisy = torch.rand(b, generator=generator) < noise_fraction
    trus = torch.where(noisy[:, None, None, None], noise_frames(b, size, generator), trus)
    target = torch.where(noisy, torch.full_like(target, MAX_ERROR_MM), target)
    x = torch.cat([trus, x[:, 1:]], dim=1)
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x, target


def regression_step(model: QualityNet, optimiser: torch.optim.Optimizer, x: torch.Tensor,
                    target_mm: torch.Tensor) -> float:
    """One optimiser step of the TRE regression (smooth L1 on log(1 + mm)); returns the loss."""
    loss = F.smooth_l1_loss(model(x), torch.log1p(target_mm), beta=0.1)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return float(loss.detach())


@torch.inference_mode()
def predict(model: QualityNet, data: dict[str, torch.Tensor], batch: int = 256) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(data["tre_mm"]), batch):
        x = model_input(data["trus"][s:s + batch].float(), data["mri"][s:s + batch].float(),
                        data["mri_labels"][s:s + batch])
        out.append(torch.expm1(model(x)).clamp_min(0))
    return torch.cat(out).numpy()


def detection(estimate: np.ndarray, tre: np.ndarray, threshold: float) -> dict[str, float]:
    """Flag rates at ``threshold``: of frames with TRE > BAD_MM (detection), <= GOOD_MM and
    <= BAD_MM (false alarms)."""
    flagged = estimate > threshold
    return {
        "detection_tre_gt_5mm": float(flagged[tre > BAD_MM].mean()),
        "false_alarm_tre_le_2mm": float(flagged[tre <= GOOD_MM].mean()),
        "false_alarm_tre_le_5mm": float(flagged[tre <= BAD_MM].mean()),
    }


def calibrate(estimate: np.ndarray, tre: np.ndarray) -> dict[str, float]:
    """Threshold: the largest that still flags >= 95 % of calibration frames with TRE > 5 mm.
    Margin factor: the 90th percentile of TRE / estimate (target margin = factor * estimate)."""
    bad = np.sort(estimate[tre > BAD_MM])
    threshold = float(bad[int(math.floor(0.05 * len(bad)))]) - 1e-6
    ratio = tre / np.maximum(estimate, 0.5)
    return {"threshold_mm": math.floor(threshold * 1e4) / 1e4,  # rounded down: still flags
            "margin_factor": round(float(np.quantile(ratio, 0.9)), 4)}


def fit(model: QualityNet, train_set: dict[str, torch.Tensor], *, seed: int, budget_s: float,
        steps: int | None = None, appearance: bool = False) -> tuple[int, list[float]]:
    """Train ``model`` on ``train_set``'s pairs (:data:`BATCH` a step, AdamW, cosine learning
    rate from 3e-3, :func:`augment`) for ``budget_s`` seconds, or exactly ``steps`` steps;
    returns (steps, losses)."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    n, batch = len(train_set["tre_mm"]), BATCH
    t_train, step, losses = time.monotonic(), 0, []
    while True:
        elapsed = time.monotonic() - t_train
        if (elapsed >= budget_s) if steps is None else (step >= steps):
            break
        progress = elapsed / budget_s if steps is None else step / steps
        lr = 3e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        model.train()
        index = torch.randint(0, n, (batch,), generator=generator)
        x = model_input(train_set["trus"][index].float(), train_set["mri"][index].float(),
                        train_set["mri_labels"][index])
        losses.append(regression_step(model, optimiser,
                                      *augment(x, train_set["tre_mm"][index], generator,
                                               appearance=appearance)))
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss {np.mean(losses[-200:]):.4f} lr {lr:.2e} "
                  f"{elapsed:.0f} s", flush=True)
    return step, losses


def train(out_dir: Path, *, minutes: float, seed: int, train_phantoms: int, calib_phantoms: int,
          frames: int, errors: int, threads: int, cache_dir: Path | None,
          command: str, normalise: bool = False, randomised_phantoms: int = 0,
          restyled_phantoms: int = 0,
          steps: int | None = None, appearance: bool = False) -> dict:
    """``normalise``: QualityNetConfig.normalise; ``restyled_phantoms``: also train on pairs of
    that many randomised family-A scenes in another appearance (seeds RAND_SEED0..,
    regseg.sim.restyle); ``randomised_phantoms``: also train on pairs
    of that many randomised family-A phantoms (seeds RAND_SEED0..); ``steps``: train exactly
    that many steps (reproducible) instead of filling ``minutes``; ``appearance``: the
    appearance augmentation on the TRUS channel (:func:`augment`)."""
    t0 = time.monotonic()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = QualityNetConfig(normalise=normalise)
    train_seeds = list(range(TRAIN_SEED0, TRAIN_SEED0 + train_phantoms))
    calib_seeds = list(range(CALIB_SEED0, CALIB_SEED0 + calib_phantoms))
    train_set = cached(cache_dir, train_seeds, frames, errors, size=cfg.size, seed=seed)
    if randomised_phantoms:
        extra = cached(cache_dir, list(range(RAND_SEED0, RAND_SEED0 + randomised_phantoms)),
                       frames, errors, size=cfg.size, seed=seed, scanner="randomised")
        train_set = {k: torch.cat([train_set[k], extra[k]]) for k in train_set}
    if restyled_phantoms:
        extra = cached(cache_dir, list(range(RAND_SEED0, RAND_SEED0 + restyled_phantoms)),
                       frames, errors, size=cfg.size, seed=seed, scanner="restyled")
        train_set = {k: torch.cat([train_set[k], extra[k]]) for k in train_set}
    calib_set = cached(cache_dir, calib_seeds, frames, errors, size=cfg.size, seed=seed)
    torch.set_num_threads(threads)
    data_s = time.monotonic() - t0
    print(f"data: {len(train_set['tre_mm'])} train / {len(calib_set['tre_mm'])} calibration "
          f"samples in {data_s:.0f} s", flush=True)
    model = QualityNet(cfg)
    budget = 60.0 * minutes - data_s - 30.0
    t_train = time.monotonic()
    step, losses = fit(model, train_set, seed=seed, budget_s=budget, steps=steps,
                       appearance=appearance)
    estimate = predict(model, calib_set)
    tre = calib_set["tre_mm"].numpy()
    calibration = calibrate(estimate, tre)
    log_err = np.abs(np.log1p(estimate) - np.log1p(tre))
    summary = {
        "command": command,
        "seed": seed, "steps": step, "threads": threads, "batch": BATCH,
        "normalise": normalise, "randomised_phantoms": randomised_phantoms,
        "restyled_phantoms": restyled_phantoms,
        "augment": "appearance" if appearance else "gain",
        "train_s": round(time.monotonic() - t_train, 1), "data_s": round(data_s, 1),
        "train_samples": len(train_set["tre_mm"]), "train_phantom_seeds": train_seeds,
        "calibration_samples": len(tre), "calibration_phantom_seeds": calib_seeds,
        "frames_per_phantom": frames, "errors_per_frame": errors,
        "calibration": calibration,
        "calibration_metrics": {
            **detection(estimate, tre, calibration["threshold_mm"]),
            "median_abs_error_mm": round(float(np.median(np.abs(estimate - tre))), 3),
            "median_abs_log_error": round(float(np.median(log_err)), 4),
            "spearman": round(float(np.corrcoef(np.argsort(np.argsort(estimate)),
                                                np.argsort(np.argsort(tre)))[0, 1]), 4),
            "bad_frames": int((tre > BAD_MM).sum()), "good_frames": int((tre <= GOOD_MM).sum()),
        },
        "final_loss": round(float(np.mean(losses[-200:])), 5) if losses else None,
    }
    save_qualitynet(out_dir / "qualitynet.pt", model, calibration)
    (out_dir / "qualitynet.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["calibration_metrics"], indent=2))
    print(f"calibration {calibration}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regseg.train.quality", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--minutes", type=float, default=12.0, help="wall-time budget, all in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-phantoms", type=int, default=30)
    parser.add_argument("--calib-phantoms", type=int, default=8)
    parser.add_argument("--frames", type=int, default=40, help="frames per phantom")
    parser.add_argument("--errors", type=int, default=4, help="random errors per frame")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--normalise", action="store_true",
                        help="standardise the TRUS and MRI channels per frame (QualityNetConfig)")
    parser.add_argument("--randomised-phantoms", type=int, default=0,
                        help="also train on pairs of this many randomised family-A phantoms "
                        f"(regseg.sim.randomise, seeds {RAND_SEED0}..)")
    parser.add_argument("--restyled-phantoms", type=int, default=0,
                        help="also train on pairs of this many randomised family-A scenes in "
                        f"another appearance (regseg.sim.restyle, seeds {RAND_SEED0}..)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps (reproducible) instead of --minutes")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="sample cache folder ('none' disables)")
    add_augment_argument(parser, "TRUS-channel")
    args = parser.parse_args(argv)
    cache = None if str(args.cache) == "none" else args.cache
    command = shlex.join(["python", "-m", "regseg.train.quality", *(argv or sys.argv[1:])])
    train(args.out, minutes=args.minutes, seed=args.seed, train_phantoms=args.train_phantoms,
          calib_phantoms=args.calib_phantoms, frames=args.frames, errors=args.errors,
          threads=args.threads, cache_dir=cache, command=command, normalise=args.normalise,
          randomised_phantoms=args.randomised_phantoms, steps=args.steps,
          restyled_phantoms=args.restyled_phantoms,
          appearance=args.augment == "appearance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
