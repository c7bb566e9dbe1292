"""Fine-tune and calibrate QualityNet on the live pipeline's own registered pairs (family A).

``python -m regseg.train.quality_live --out models/weights`` (after :mod:`regseg.train.quality`).

The synthetic stage pairs each frame with an MRI resliced at the true plane plus a known rigid
error. Live, QualityNet sees something else: what AlignSegNet and the deformable stage made of a
frame tracked with an error. The registration corrects the in-plane part, but not the
out-of-plane part, and it can make a wrong plane look consistent. So this stage runs the real
Pipeline (eager AlignSegNet + PLCReg deformable) on family-A frames. Each frame gets a KNOWN
random ``reference_to_mri`` error (rigid about the gland: a third each up to 1, 6 and 20 mm and
degrees). The stage records QualityNet's input and the published registration's true TRE.
It fine-tunes on these live samples mixed half and half with the synthetic ones, then calibrates
the threshold and the margin on live samples from the calibration phantoms.
Phantoms: training 3000.., calibration 3100.. (the same disjoint family-A ranges as the synthetic
stage; never 1000-1003, never family B).
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

from regseg import metrics, spatial
from regseg.errors import InputError
from regseg.lc2 import LC2_REVISION
from regseg.models.qualitynet import WEIGHTS, load_qualitynet, save_qualitynet
from regseg.train.appearance import add_augment_argument
from regseg.train.data import CACHEABLE_SCANNERS
from regseg.train.quality import (
    DEFAULT_CACHE,
    RAND_SEED0,
    TRAIN_SEED0,
    augment,
    cached,
    calibrate,
    detection,
    draw_error,
    model_input,
    random_rigid,
    regression_step,
)
from regseg.train.quality_chain import DEFAULT_CHAIN, chain_features, chain_lc2, parse_chain
from regseg.train.quality_sets import (
    CALIB_SEEDS_DEFAULT,
    RAND_CALIB_SEED0,
    blocks,
    calib_seeds,
    calibration_sets,
    parse_seeds,
)

LIVE_VERSION = 3  # 2: the chain refines as the CLI's default (K iterations); 3: + features


def live_samples(seeds: list[int], frames: int, *, seed: int, weights: Path,
                 scanner: str = "plain", chain: str = DEFAULT_CHAIN) -> dict:
    """x (N, 4, s, s) float16 (QualityNet inputs as the live path makes them), tre_mm (N,),
    features (N, len(FEATURES)) float32 (:func:`chain_features`).

    ``scanner``: "plain" (the demo scanner) or "randomised" (regseg.sim.randomise: a random
    probe, frame, speckle, gain, anatomy and MRI per phantom). ``chain``: the live chain
    (:func:`regseg.models.qualitynet.chain_key`; default the CLI's: K, deformable, multi-start
    as ``regseg-stream`` without flags). No temporal filter: the frames are unrelated poses.
    """
    from regseg.engines.fusion import FusionEngine
    from regseg.stream.capture import build_capture
    from regseg.stream.context import build_context
    from regseg.stream.deformable import DeformableStage
    from regseg.stream.lc2_stage import Lc2Stage
    from regseg.stream.pipeline import Pipeline
    from regseg.stream.quality import QualityCheck, QualityConfig

    refine_iterations, deformable, multi_start = parse_chain(chain)
    lc2 = chain_lc2(chain)
    torch.set_num_threads(1)
    engine = FusionEngine("alignsegnet", backend="eager")
    capture = build_capture(refine_iterations, multi_start, "off", backend="eager")
    open_scanner = CACHEABLE_SCANNERS[scanner]
    xs, tres, feats = [], [], []
    for n, ps in enumerate(seeds):
        phantom, scanner_ = open_scanner(ps, seed * 100_003 + ps + 7)
        context = build_context(phantom.mri, phantom.labels)
        stage = DeformableStage(context, backend="eager") if deformable else None
        pipeline = Pipeline(context, engine, deformable=stage, capture=capture,
                            lc2=Lc2Stage(context) if lc2 else None,
                            quality=QualityCheck(context, QualityConfig(  # threshold unused
                                weights=weights, error_threshold_mm=math.inf), chain=chain))
        estimator = pipeline.quality.estimator
        rng = np.random.default_rng([seed, ps, 29])
        made = 0
        while made < frames:
            frame = scanner_.random_frame(rng)
            ji = np.argwhere(frame.truth.labels > 0)
            if len(ji) < 200:
                continue
            made += 1
            ji = ji[np.linspace(0, len(ji) - 1, min(400, len(ji))).astype(int)]
            centre = spatial.apply(frame.truth.image_to_mri,
                                   np.column_stack([ji[:, ::-1], np.zeros(len(ji))])).mean(0)
            pipeline.set_reference_to_mri(random_rigid(rng, centre, *draw_error(rng)))
            result = pipeline(frame)
            image_to_mri = spatial.invert(result.mri_to_image)
            tres.append(metrics.tre_mm(image_to_mri, frame.truth.image_to_mri, ji[:, ::-1]))
            xs.append(estimator.inputs(frame.pixels, image_to_mri, result.warped_labels).half())
            feats.append(chain_features(context, result))
        print(f"  live phantom {ps}: {n + 1}/{len(seeds)}", flush=True)
    return {"x": torch.cat(xs), "tre_mm": torch.tensor(tres, dtype=torch.float32),
            "features": torch.tensor(np.array(feats), dtype=torch.float32)}


def _alignsegnet_id() -> str:
    """The shipped AlignSegNet's file hash: live pairs change when it is retrained."""
    from regseg.models.registry import default_weights_path

    return hashlib.sha256(default_weights_path("alignsegnet").read_bytes()).hexdigest()[:12]


def _plcreg2d_id() -> str:
    """The shipped PLCReg 2-D's file hash: live pairs change when it is retrained."""
    return hashlib.sha256((WEIGHTS.parent / "plcreg2d.pt").read_bytes()).hexdigest()[:12]


TRE_BINS_MM = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0)  # inner edges of the --balance-tre bins


def tre_balancing_weights(tre: torch.Tensor, group: torch.Tensor,
                          edges: tuple[float, ...] = TRE_BINS_MM) -> torch.Tensor:
    """Sampling weights under which every group (scanner kind) has the pooled TRE distribution.

    Per group and TRE bin: pooled share of the bin / the group's share of it, so that the
    appearance of a pair no longer predicts its error; each group keeps its share of the samples.
    A bin a group has no pairs in stays empty for it.
    """
    bins = torch.bucketize(tre, torch.tensor(edges, dtype=tre.dtype))
    n_bins = len(edges) + 1
    pooled = torch.bincount(bins, minlength=n_bins).double() / len(tre)
    weights = torch.zeros(len(tre), dtype=torch.float64)
    for g in group.unique():
        mine = group == g
        share = torch.bincount(bins[mine], minlength=n_bins).double() / mine.sum()
        w = pooled[bins[mine]] / share[bins[mine]]
        weights[mine] = w * mine.sum() / w.sum()
    return weights


#: The chain whose cached live pairs carry no chain in their file name (the CLI's default
#: chain until session 16).
UNNAMED_CACHE_CHAIN = "K2/deformable-on/multi-start-off"


def cached_live(cache: Path | None, seeds: list[int], frames: int, *, seed: int,
                weights: Path, scanner: str = "plain", chain: str = DEFAULT_CHAIN) -> dict:
    kind = "" if scanner == "plain" else f"-{scanner}"
    # named by the chain, except the one that was the default when the cache was named after
    # the default (its files carry no chain): the default may change (it did: --lc2 on)
    kind += "" if chain == UNNAMED_CACHE_CHAIN else "-" + chain.replace("/", "-")
    # the refinement's answers change with its implementation (revision 1 carried no suffix)
    kind += f"-r{LC2_REVISION}" if chain_lc2(chain) and LC2_REVISION > 1 else ""
    # the pairs change with the networks that make them: AlignSegNet, and PLCReg 2-D when on
    deformable = f"-{_plcreg2d_id()}" if parse_chain(chain)[1] else ""
    name = (f"quality-live-v{LIVE_VERSION}{kind}-{seeds[0]}-{len(seeds)}-{frames}-{seed}"
            f"-{_alignsegnet_id()}{deformable}.pt")
    path = cache / name if cache is not None else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    data = live_samples(seeds, frames, seed=seed, weights=weights, scanner=scanner, chain=chain)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
    return data


def randomised_calibration_estimates(phantoms: int, frames: int, *, scanner: str = "randomised",
                                     weights: Path = WEIGHTS) -> dict:
    """QualityNet ``weights`` on live pairs of the default chain from the randomised family-A
    calibration phantoms 3300.. (cached): ``seeds``, ``tre`` and ``estimate`` (mm, per pair, phantom
    by phantom) and the default chain's calibrated ``threshold``. For the diagnoses in bench/."""
    seeds = list(range(RAND_CALIB_SEED0, RAND_CALIB_SEED0 + phantoms))
    data = cached_live(DEFAULT_CACHE, seeds, frames, seed=0, weights=weights, scanner=scanner,
                       chain=DEFAULT_CHAIN)
    torch.set_num_threads(1)
    model, calibration = load_qualitynet(weights, fold=False)
    return {"seeds": seeds, "tre": data["tre_mm"].numpy(), "estimate": predict_x(model, data["x"]),
            "threshold": calibration["by_chain"][DEFAULT_CHAIN]["threshold_mm"]}


@torch.inference_mode()
def predict_x(model, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([torch.expm1(model(x[s:s + 256].float())).clamp_min(0)
                      for s in range(0, len(x), 256)]).numpy()


def calibration_pairs(args: argparse.Namespace, weights: Path,
                      chain: str = DEFAULT_CHAIN) -> dict:
    """Live calibration pairs of ``chain``: the plain phantoms of ``--calib-seeds``, plus randomised
    phantoms 3300.. with ``--randomised-calib-phantoms`` (``group``: 0 plain, 1 randomised;
    ``phantom``: each pair's phantom seed, for the bootstrap over phantoms)."""
    frames = args.calib_frames or args.frames
    parts = []
    for block in blocks(calib_seeds(args)):  # one cache file per run of consecutive seeds
        part = cached_live(args.cache, block, frames, seed=args.seed, weights=weights,
                           chain=chain)
        parts.append({**part, "group": torch.zeros(len(part["tre_mm"]), dtype=torch.long),
                      "phantom": torch.tensor(np.repeat(block, frames))})
    if args.randomised_calib_phantoms:
        seeds = list(range(RAND_CALIB_SEED0, RAND_CALIB_SEED0 + args.randomised_calib_phantoms))
        n = args.randomised_calib_frames or args.randomised_frames
        rand = cached_live(args.cache, seeds, n, seed=args.seed, weights=weights,
                           scanner="randomised", chain=chain)
        parts.append({**rand, "group": torch.ones(len(rand["tre_mm"]), dtype=torch.long),
                      "phantom": torch.tensor(np.repeat(seeds, n))})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def calibration_report(estimate: np.ndarray, tre: np.ndarray, group: np.ndarray,
                       threshold: float) -> dict:
    """Flag rates at ``threshold`` on all calibration pairs and on each group."""
    out = {}
    for name, mask in (("all", np.ones_like(group, bool)), ("plain", group == 0),
                       ("randomised", group == 1)):
        if mask.any() and (tre[mask] > 5).any() and (tre[mask] <= 2).any():
            out[name] = {**detection(estimate[mask], tre[mask], threshold),
                         "median_abs_error_mm": round(float(np.median(
                             np.abs(estimate[mask] - tre[mask]))), 3),
                         "median_bias_mm": round(float(np.median(
                             estimate[mask] - tre[mask])), 3),
                         "bad_frames": int((tre[mask] > 5).sum()),
                         "good_frames": int((tre[mask] <= 2).sum())}
    return out


def recalibrate(args: argparse.Namespace, weights: Path, command: str) -> int:
    """Recalibrate ``weights`` on live pairs of the calibration phantoms, one threshold per
    chain of :data:`regseg.train.quality_chain.GRID`; weights unchanged
    (:mod:`regseg.train.quality_calibrate`)."""
    from regseg.train.quality_calibrate import calibrate_chains
    from regseg.train.quality_chain import GRID

    calibrate_chains(args, weights, list(GRID), command)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regseg.train.quality_live",
                                     description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=None,
                        help="synthetic-stage weights (default OUT/qualitynet.pt)")
    parser.add_argument("--minutes", type=float, default=6.0, help="fine-tuning time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-phantoms", type=int, default=30)
    parser.add_argument("--calib-seeds", default=CALIB_SEEDS_DEFAULT,
                        help=f"plain calibration phantoms (default {CALIB_SEEDS_DEFAULT})")
    parser.add_argument("--frames", type=int, default=40, help="live frames per phantom")
    parser.add_argument("--calib-frames", type=int, default=None,
                        help="live frames per calibration phantom (default --frames)")
    parser.add_argument("--synthetic-phantoms", type=int, default=None, help="phantoms of the "
                        "synthetic stage's cached pairs mixed in (default --train-phantoms)")
    parser.add_argument("--synthetic-frames", type=int, default=50,
                        help="--frames of the synthetic stage (its cached samples are mixed in)")
    parser.add_argument("--randomised-phantoms", type=int, default=0,
                        help="also mix in synthetic pairs from this many phantoms of the "
                        "randomised family-A scanner (regseg.sim.randomise), seeds 3200..")
    parser.add_argument("--restyled-phantoms", type=int, default=0, help="and from this many "
                        "in another appearance (regseg.sim.restyle), seeds 3200..")
    parser.add_argument("--randomised-live-phantoms", type=int, default=0, help="also fine-tune"
                        " on live pairs of this many randomised family-A phantoms (seeds 3200..)")
    parser.add_argument("--randomised-calib-phantoms", type=int, default=0,
                        help="calibrate also on live pairs of this many randomised family-A "
                        "phantoms (seeds 3300..: the B-like validation inside family A)")
    parser.add_argument("--randomised-frames", type=int, default=25, help="frames per phantom")
    parser.add_argument("--randomised-calib-frames", type=int, default=None, help="live frames "
                        "per randomised calibration phantom (default --randomised-frames)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps (reproducible) instead of --minutes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--calibrate-only", action="store_true",
                        help="no fine-tuning: recalibrate --weights on live calibration pairs, "
                        "one threshold per live chain (regseg.train.quality_calibrate; e.g. "
                        "after AlignSegNet was retrained) and save to --out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    add_augment_argument(parser, "TRUS-channel")
    parser.add_argument("--balance-tre", action="store_true",
                        help="with --randomised-live-phantoms: sample the live pairs so that plain "
                        "and randomised ones have the same TRE distribution (appearance must not "
                        "predict the error)")
    args = parser.parse_args(argv)
    if args.balance_tre and not args.randomised_live_phantoms:  # before any pair is rendered
        parser.error("--balance-tre balances plain against randomised live pairs, and there are "
                     "none: add --randomised-live-phantoms N (N >= 1)")
    try:  # before any pair is rendered
        parse_seeds(args.calib_seeds)
    except InputError as exc:
        parser.error(str(exc))
    command = shlex.join(["python", "-m", "regseg.train.quality_live", *(argv or sys.argv[1:])])
    t0 = time.monotonic()
    weights = (args.weights or args.out / WEIGHTS.name).resolve()
    if args.calibrate_only:
        return recalibrate(args, weights, command)
    train_seeds = list(range(TRAIN_SEED0, TRAIN_SEED0 + args.train_phantoms))
    live = cached_live(args.cache, train_seeds, args.frames, seed=args.seed, weights=weights)
    live_cal = calibration_pairs(args, weights)
    if args.randomised_live_phantoms:
        extra = cached_live(args.cache, list(range(RAND_SEED0,
                                                   RAND_SEED0 + args.randomised_live_phantoms)),
                            args.randomised_frames, seed=args.seed, weights=weights,
                            scanner="randomised")
        extra["group"] = torch.ones(len(extra["tre_mm"]), dtype=torch.long)
        live["group"] = torch.zeros(len(live["tre_mm"]), dtype=torch.long)
        live = {k: torch.cat([live[k], extra[k]]) for k in live}
    sampling = None
    if args.balance_tre:
        sampling = tre_balancing_weights(live["tre_mm"], live["group"])
    synthetic_seeds = list(range(TRAIN_SEED0, TRAIN_SEED0 + (args.synthetic_phantoms
                                                             or args.train_phantoms)))
    synthetic = cached(args.cache, synthetic_seeds, args.synthetic_frames, 4, size=64,
                       seed=args.seed)
    for scanner, count in (("randomised", args.randomised_phantoms),
                           ("restyled", args.restyled_phantoms)):
        if count:
            extra = cached(args.cache, list(range(RAND_SEED0, RAND_SEED0 + count)),
                           args.synthetic_frames, 4, size=64, seed=args.seed, scanner=scanner)
            synthetic = {k: torch.cat([synthetic[k], extra[k]]) for k in synthetic}
    data_s = time.monotonic() - t0
    print(f"live: {len(live['tre_mm'])} train / {len(live_cal['tre_mm'])} calibration samples "
          f"({data_s:.0f} s)", flush=True)
    torch.set_num_threads(args.threads)
    model, base_calibration = load_qualitynet(weights, fold=False)
    before = predict_x(model, live_cal["x"])
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    n_live, n_syn, half = len(live["tre_mm"]), len(synthetic["tre_mm"]), 32
    budget, t_train, step, losses = 60.0 * args.minutes, time.monotonic(), 0, []
    while True:
        elapsed = time.monotonic() - t_train
        if (elapsed >= budget) if args.steps is None else (step >= args.steps):
            break
        progress = elapsed / budget if args.steps is None else step / args.steps
        for group in optimiser.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        model.train()
        i = (torch.randint(0, n_live, (half,), generator=generator) if sampling is None else
             torch.multinomial(sampling, half, replacement=True, generator=generator))
        j = torch.randint(0, n_syn, (half,), generator=generator)
        x = torch.cat([live["x"][i].float(),
                       model_input(synthetic["trus"][j].float(), synthetic["mri"][j].float(),
                                   synthetic["mri_labels"][j])])
        target = torch.cat([live["tre_mm"][i], synthetic["tre_mm"][j]])
        losses.append(regression_step(model, optimiser, *augment(
            x, target, generator, appearance=args.augment == "appearance")))
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss {np.mean(losses[-200:]):.4f} {elapsed:.0f} s", flush=True)
    tre = live_cal["tre_mm"].numpy()
    after = predict_x(model, live_cal["x"])
    calibration = calibrate(after, tre)
    group = live_cal["group"].numpy()
    summary_path = args.out / "qualitynet.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.pop("recalibration", None)  # of the weights before this stage
    # a stage on top of an earlier live stage is recorded beside it (the chain of commands)
    key = "live_randomised" if args.randomised_live_phantoms else "live"
    summary[key] = {
        "command": command, "steps": step, "threads": args.threads, "lr": args.lr,
        "augment": args.augment, "balance_tre": args.balance_tre,
        "train_samples": n_live, "train_phantom_seeds": [train_seeds[0], train_seeds[-1]],
        "randomised_live_phantom_seeds": ([RAND_SEED0, RAND_SEED0
                                           + args.randomised_live_phantoms - 1]
                                          if args.randomised_live_phantoms else None),
        "calibration_samples": len(tre), "calibration_sets": calibration_sets(args),
        "calibration": calibration, "previous_calibration": base_calibration,
        "calibration_metrics_before_at_previous_threshold": calibration_report(
            before, tre, group, base_calibration.get("threshold_mm", 5.0)),
        "calibration_metrics_before_recalibrated": calibration_report(
            before, tre, group, calibrate(before, tre)["threshold_mm"]),
        "live_calibration_metrics": calibration_report(after, tre, group,
                                                       calibration["threshold_mm"]),
        "data_s": round(data_s, 1), "train_s": round(time.monotonic() - t_train, 1),
    }
    # weights changed: the calibrations of other chains are void (regseg.train.quality_calibrate)
    save_qualitynet(args.out / "qualitynet.pt", model, {
        **calibration, "chain": DEFAULT_CHAIN, "by_chain": {DEFAULT_CHAIN: calibration}})
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary[key], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
