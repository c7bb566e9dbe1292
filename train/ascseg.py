"""Train ASC-Seg (fused, or TRUS-only with ``--trus-only``) on simulated TRUS frames.

``regseg train ascseg --out DIR [--trus-only]`` writes ``DIR/ascseg.pt`` (or ``ascseg_trus.pt``),
its ``.json`` (held-out metrics, the exact command) and ``_training.png`` (loss and Dice curves).

The frames are AlignSegNet's training set (train/alignsegnet.py with ``--randomise``: domain-
randomised family-A phantoms 1..48 plus 20 % plain-scanner frames of phantoms 1..16; the cached
set is reused when present); validation is the held-out plain family-A phantoms 1000..1003.
The fused variant's context is what the live chain gives the segmenter: the MRI plane and its
label maps registered by the shipped AlignSegNet (one forward pass, precomputed once per set).
Everything is area-resampled from AlignSegNet's 128 x 128 grid to ASC-Seg's working size
(default 48 x 48: what trains in about an hour on one thread of this shared 2-core CPU);
Dice is scored on the 128 x 128 grid, logits up-sampled bilinearly, as the U-Net head is.

Recipe (ARCHITECTURES §3.3, adapted): AdamW (lr 1e-3, betas 0.9/0.999, weight decay 1e-2),
deep supervision (every head's loss, equal weights), the loss per head being regseg's
Dice + cross-entropy with the lesion up-weighted 3x (``models.losses.segmentation_loss``, the
3-class form of the seed's BCE + Dice); warm-up then cosine decay over the wall-time budget
(the seed's 100-epoch cosine wave does not fit a 30-minute run); AlignSegNet's gain/gamma
augmentation of the TRUS channel.
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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from regseg import distributed
from regseg.errors import InputError
from regseg.models.ascseg import ASCSeg, ASCSegConfig
from regseg.models.checkpoint import save_checkpoint
from regseg.train import resume as resume_state
from regseg.train.alignsegnet import DEFAULT_CACHE, VAL_SEED0
from regseg.train.data import (
    SampleSet,
    cached_samples,
    open_randomised_scanner,
    open_simulated_scanner,
)
from regseg.train.distributed import main_first
from regseg.train.recipe_args import add_run_options
from regseg.train.seg_loop import (  # noqa: F401 - the loop's names, as before the split
    SegData,
    deep_loss,
    dice_scores,
    fit,
    logits_of,
    predict_labels,
    save_plot,
    validate,
)

FUSED_NAME, TRUS_NAME = "ascseg", "ascseg_trus"  # output file stems; registry model "ascseg"
#: Networks this recipe trains: ASC-Seg, and MONAI's baselines for bench/segmentation.py.
ARCHS = ("ascseg", "monai_unet", "monai_unetr")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """What rebuilds a MONAI baseline trained here (its checkpoint's ``config``)."""

    arch: str
    in_channels: int
    size: int


def build_net(arch: str, in_channels: int, size: int) -> tuple[nn.Module, Any]:
    """(network, config) of ``arch`` for ``in_channels`` inputs at ``size`` x ``size``.

    The MONAI baselines, 2-D, 3 classes: ``UNet`` (widths 16-128, 3 down-samplings, 2 residual
    units per level: MONAI's tutorial setting) and ``UNETR`` (ViT on 16 x 16 patches, width 192,
    4 heads, 12 layers, feature size 16; SwinUNETR was not used: it needs sizes divisible by 32).
    """
    if arch == "ascseg":
        config = ASCSegConfig(in_channels=in_channels, size=size)
        return ASCSeg(config), config
    config = BaselineConfig(arch, in_channels, size)
    if arch == "monai_unet":
        from monai.networks.nets import UNet

        return UNet(spatial_dims=2, in_channels=in_channels, out_channels=3,
                    channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2), config
    if arch == "monai_unetr":
        from monai.networks.nets import UNETR

        return UNETR(in_channels, 3, img_size=(size, size), feature_size=16, hidden_size=192,
                     mlp_dim=768, num_heads=4, spatial_dims=2), config
    raise InputError(f"--arch {arch!r}: choose one of {list(ARCHS)}")


def load_net(path: str | Path) -> nn.Module:
    """A network trained here (ASC-Seg or a MONAI baseline) from its checkpoint, in eval mode."""
    from regseg.models.checkpoint import load_state, read_checkpoint

    checkpoint = read_checkpoint(path)
    cfg = checkpoint["config"]
    arch = checkpoint["model"]
    if arch == "ascseg":
        net: nn.Module = ASCSeg(ASCSegConfig(**cfg))
    else:
        net, _ = build_net(arch, int(cfg["in_channels"]), int(cfg["size"]))
    load_state(net, checkpoint["state_dict"], path)
    return net.eval()


def training_sets(cache_dir: Path | None, *, progress: bool = True) -> tuple[SampleSet, SampleSet]:
    """(train, validation) frames on the 128 grid, as train/alignsegnet.py --randomise makes
    them (the shipped AlignSegNet's data; the same cache keys, so a cached set is reused)."""
    args = dict(size=(128, 128), seed=0, progress=progress)
    seeds = list(range(1, 49))
    train = SampleSet.concat([
        cached_samples(cache_dir, seeds, 50, desc="randomised train frames",
                       open_scanner=open_randomised_scanner, **args),
        cached_samples(cache_dir, seeds[:16], 38, desc="plain train frames",
                       open_scanner=open_simulated_scanner, **args)])
    val = cached_samples(cache_dir, list(range(VAL_SEED0, VAL_SEED0 + 4)), 50, desc="val frames",
                         open_scanner=open_simulated_scanner, **args)
    return train, val


@torch.inference_mode()
def registered_context(samples: SampleSet, weights: str | Path = "alignsegnet", *,
                       cache_dir: Path | None = None, batch_size: int = 32) -> Tensor:
    """(N, 3, h, w) float16: the MRI plane and its 2 label maps through AlignSegNet's theta
    (its ``warped_mri`` and bilinear ``warped_labels``), cached by frames and weights."""
    from regseg.models.registry import default_weights_path, load_model

    path = Path(weights) if Path(str(weights)).suffix == ".pt" else default_weights_path(
        str(weights))
    key = hashlib.sha256(path.read_bytes() + samples.trus.numpy().tobytes()).hexdigest()[:16]
    cached = None if cache_dir is None else Path(cache_dir) / f"ascseg-context-{key}.pt"
    if cached is not None and cached.is_file():
        return torch.load(cached, weights_only=True)
    model = load_model(path)
    out = []
    for start in range(0, len(samples), batch_size):
        b = samples.batch(torch.arange(start, min(start + batch_size, len(samples))))
        o = model(b["trus"], b["mri"], b["mri_labels"])
        out.append(torch.cat([o["warped_mri"], o["warped_labels"]], dim=1).half())
    context = torch.cat(out)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(context, cached)
    return context


def segmenter_inputs(trus: Tensor, context: Tensor | None, size: int) -> Tensor:
    """(B, 1 or 4, size, size): TRUS (B, 1, h, w) [+ context (B, 3, h, w)], area-resampled."""
    x = trus.float() if context is None else torch.cat([trus.float(), context.float()], dim=1)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def make_data(samples: SampleSet, context: Tensor | None, size: int) -> SegData:
    """:class:`SegData` of a sample set (``context`` None: TRUS only)."""
    labels = samples.labels
    small = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest-exact")
    return SegData(segmenter_inputs(samples.trus, context, size), small[:, 0].long(), labels)


def train_ascseg(out_dir: str | Path, *, trus_only: bool = False, minutes: float = 30.0,
                 arch: str = "ascseg",
                 size: int = 48, batch_size: int = 8, lr: float = 1e-3, seed: int = 0,
                 threads: int = 1, validate_every_s: float = 300.0,
                 cache_dir: Path | None = DEFAULT_CACHE, progress: bool = True,
                 command: str | None = None, steps: int | None = None, resume: bool = False,
                 checkpoint_every: int = 50, dist: distributed.Dist | None = None
                 ) -> dict[str, Any] | None:
    """Load (or render) the frames, train within ``minutes`` (data included) or ``steps``, save.
    Returns the summary written to the JSON (rank 0; ``None`` on the other ranks under torchrun).
    """
    t_start = time.monotonic()
    dist = dist or distributed.init(threads=threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = (TRUS_NAME if trus_only else FUSED_NAME) if arch == "ascseg" else \
        arch + ("_trus" if trus_only else "")
    model, config = build_net(arch, 1 if trus_only else 4, size)
    with main_first(dist):  # local rank 0 renders and caches; the others read the cache
        train_set, val_set = training_sets(cache_dir, progress=progress and dist.main)
        contexts = (None, None) if trus_only else (
            registered_context(train_set, cache_dir=cache_dir),
            registered_context(val_set, cache_dir=cache_dir))
    train, val = make_data(train_set, contexts[0], size), make_data(val_set, contexts[1], size)
    data_s = time.monotonic() - t_start
    if dist.main:
        print(f"data: {len(train)} train / {len(val)} val frames in {data_s:.0f} s", flush=True)
    seconds = 60.0 * minutes - data_s - 60.0  # keep a minute for the last validation and saving
    if seconds <= 0:
        raise InputError(f"--minutes {minutes}: loading the data took {data_s:.0f} s and leaves "
                         "no time to train; raise --minutes.")
    run_key = {"arch": arch, "trus_only": trus_only, "size": size, "batch_size": batch_size,
               "lr": lr, "seed": seed, "steps": steps}
    history, val_rows, steps_done = fit(
        model, train, val, seconds=seconds, batch_size=batch_size, lr=lr, seed=seed,
        validate_every_s=validate_every_s, progress=progress, max_steps=steps, dist=dist,
        state=resume_state.state_path(out_dir, name), resume=resume,
        checkpoint_every=checkpoint_every, run_key=run_key)
    if not dist.main:
        return None
    final = {k: v for k, v in val_rows[-1].items() if k not in ("step", "seconds")}
    summary = {
        "model": arch, "variant": "trus_only" if trus_only else "fused",
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": dataclasses.asdict(config), "seed": seed, "batch_size": batch_size, "lr": lr,
        "steps": steps_done, "threads": torch.get_num_threads(), "ranks": dist.world,
        "train_frames": len(train),
        "train_phantom_seeds": "1-48 randomised (50 frames each) + 1-16 plain (38 each)",
        "val_phantom_seeds": list(range(VAL_SEED0, VAL_SEED0 + 4)),
        "data_s": round(data_s, 1), "parameters": sum(p.numel() for p in model.parameters()),
        "validation": final, "validation_curve": val_rows, "torch": torch.__version__,
    }
    save_checkpoint(out_dir / f"{name}.pt", arch, model, config,
                    meta={"validation": final, "command": summary["command"],
                          "steps": steps_done, "seed": seed, "variant": summary["variant"]})
    save_plot(out_dir / f"{name}_training.png", history, val_rows, name)
    summary["wall_s"] = round(time.monotonic() - t_start, 1)
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``regseg train ascseg``."""
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--trus-only", action="store_true",
                        help="TRUS-only variant (1 channel) instead of TRUS + registered MRI")
    parser.add_argument("--arch", choices=ARCHS, default="ascseg",
                        help="network (default ascseg; the MONAI baselines for the bench)")
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="wall-time budget including data loading (default 30)")
    parser.add_argument("--size", type=int, default=48, help="working size (default 48)")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the batch draw and the initial weights (default 0)")
    parser.add_argument("--validate-every", type=float, default=300.0,
                        help="seconds between validations (default 300)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"simulated-frame cache (default {DEFAULT_CACHE})")
    add_run_options(parser, threads=1, checkpoint_every=50)


def run(args: argparse.Namespace, *, command: str | None = None) -> int:
    """Run ``regseg train ascseg`` from parsed arguments."""
    for flag, value, low in (("--minutes", args.minutes, 0.0), ("--batch-size", args.batch_size, 2),
                             ("--lr", args.lr, 0.0), ("--threads", args.threads, 1)):
        if not value >= low or (low == 0.0 and value == 0.0):
            raise InputError(f"{flag} {value}: expected {'> 0' if low == 0.0 else f'>= {low}'}"
                             + (" (BatchNorm on 1x1 maps needs 2 frames)"
                                if flag == "--batch-size" else ""))
    ASCSegConfig(size=args.size)  # validates the size before any work
    summary = train_ascseg(args.out, trus_only=args.trus_only, minutes=args.minutes,
                           arch=args.arch,
                           size=args.size, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed, threads=args.threads,
                           validate_every_s=args.validate_every, cache_dir=args.cache_dir,
                           progress=not args.no_progress, command=command, steps=args.steps,
                           resume=args.resume, checkpoint_every=args.checkpoint_every)
    if summary is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    print("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["validation"].items()))
    stem = (TRUS_NAME if args.trus_only else FUSED_NAME) if args.arch == "ascseg" else \
        args.arch + ("_trus" if args.trus_only else "")
    print(f"wrote {args.out / (stem + '.pt')} ({summary['wall_s']:.0f} s, {summary['steps']} "
          "steps)")
    return 0


def add_cli(parser: argparse.ArgumentParser) -> None:
    """``regseg train ascseg``: the options and the runner (regseg/cli.py TRAIN_MODELS)."""
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regseg.train.ascseg",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(argv),
               command=shlex.join(["python", "-m", "regseg.train.ascseg", *argv]))


if __name__ == "__main__":
    sys.exit(main())
