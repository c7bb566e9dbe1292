"""The training loop of the 2-D segmenters (train/ascseg.py): data, loss, fit, validation, plot.

Written once for ``regseg train ascseg`` (and its MONAI baselines): a wall-time budget (or a step
count) with warm-up then cosine decay, deep supervision, the TRUS augmentation, under torchrun
the global batch sharded over the ranks (:mod:`regseg.train.distributed`), and ``--resume``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from regseg import distributed, metrics
from regseg.models import losses
from regseg.train import resume as resume_state
from regseg.train.alignsegnet import augment_trus, lr_factor
from regseg.train.distributed import unwrap, wrap
from regseg.types import LESION, PROSTATE


@dataclasses.dataclass
class SegData:
    """Segmenter inputs and truth for N frames: ``inputs`` (N, C, s, s) float32 at the working
    size, ``labels`` (N, s, s) int64 at the working size (training), ``labels_eval`` (N, h, w)
    uint8 on AlignSegNet's grid (scoring)."""

    inputs: Tensor
    labels: Tensor
    labels_eval: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]


@torch.inference_mode()
def predict_labels(predict: Callable[[Tensor], Tensor], data: SegData,
                   batch_size: int = 32) -> np.ndarray:
    """Label maps (N, h, w) uint8 on the scoring grid: logits up-sampled bilinearly, argmax."""
    hw = tuple(data.labels_eval.shape[1:])
    out = []
    for start in range(0, len(data), batch_size):
        logits = predict(data.inputs[start:start + batch_size])
        if tuple(logits.shape[-2:]) != hw:
            logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
        out.append(logits.argmax(1).to(torch.uint8))
    return torch.cat(out).numpy()


def dice_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean prostate (incl. lesion) and lesion Dice over frames (frames without either: skipped)."""
    pairs = list(zip(pred, truth, strict=True))
    rows = {"prostate_dice": [metrics.dice(p, t, PROSTATE) for p, t in pairs],
            "lesion_dice": [metrics.dice(p, t, LESION) for p, t in pairs]}
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            for k, v in rows.items()}


def logits_of(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``image -> logits`` for a net returning a tensor or a dict with ``logits``."""
    def predict(x: Tensor) -> Tensor:
        out = model(x)
        return out["logits"] if isinstance(out, dict) else out
    return predict


def deep_loss(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """Deep-supervised loss (every head, equal weights) when the net has ``forward_deep``
    (``model`` may be wrapped in DistributedDataParallel: its ``forward`` takes ``deep``)."""
    if hasattr(unwrap(model), "forward_deep"):
        heads = model(x, deep=True)["deep"]
    else:
        heads = [logits_of(model)(x)]
    return sum(losses.segmentation_loss(h, labels) for h in heads)


def fit(model: nn.Module, train: SegData, val: SegData, *, seconds: float, batch_size: int = 8,
        lr: float = 1e-3, seed: int = 0, validate_every_s: float = 300.0,
        progress: bool = True, max_steps: int | None = None,
        dist: distributed.Dist | None = None, state: Path | None = None, resume: bool = False,
        checkpoint_every: int = 0, run_key: dict[str, Any] | None = None
        ) -> tuple[list[float], list[dict[str, float]], int]:
    """Train ``model`` in place for ``seconds`` of wall time (the recipe in the module docstring),
    or ``max_steps`` steps if that comes first (the schedule then follows the steps).

    Under torchrun (``dist``) every rank draws the same global batch and its augmentation and
    trains on its share (DistributedDataParallel); rank 0's clock sets the schedule and the stop,
    and rank 0 alone validates. ``state``: the resumable state file, written by rank 0 every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from it.

    Returns:
        per-step losses, validation rows (``step``, ``seconds``, Dice), steps taken (the
        losses and rows are rank 0's; the other ranks return theirs, without validation rows).
    """
    dist = dist or distributed.Dist()
    mine = dist.shard(batch_size)  # fails early unless the batch splits evenly over the ranks
    torch.manual_seed(seed)
    net = wrap(model, dist)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    val_rows: list[dict[str, float]] = []
    order, cursor, step = torch.randperm(len(train), generator=generator), 0, 0
    elapsed = 0.0  # training seconds before this process (a resumed run)
    if resume and state is not None:
        step, extra = resume_state.load_state(state, model=model, optimiser=optimiser,
                                              generator=generator, run_key=run_key or {})
        history, val_rows = extra["history"], extra["val_rows"]
        order, cursor, elapsed = extra["order"], extra["cursor"], extra["elapsed_s"]
        if dist.main:
            print(f"resumed from {state} at step {step}", flush=True)
    t0 = time.monotonic() - elapsed
    end = t0 + seconds

    def save() -> None:
        if dist.main and state is not None:
            resume_state.save_state(state, model=model, optimiser=optimiser, step=step,
                                    generator=generator,
                       run_key=run_key or {},
                       extra={"history": history, "val_rows": val_rows, "order": order,
                              "cursor": cursor, "elapsed_s": time.monotonic() - t0})

    t_val = time.monotonic()
    bar = tqdm(desc="train", unit="step", disable=not (progress and dist.main), leave=False)
    while True:
        now = time.monotonic()
        stop = now >= end or (max_steps is not None and step >= max_steps)
        if dist.from_main(float(stop)) >= 1.0:  # rank 0's clock decides for every rank
            break
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        index = order[cursor:cursor + batch_size]
        cursor += batch_size
        x = train.inputs[index].clone()
        x[:, :1] = augment_trus(x[:, :1], generator)  # the global batch's draw, on every rank
        done = dist.from_main((now - t0) / seconds if max_steps is None else step / max_steps)
        for group in optimiser.param_groups:
            group["lr"] = lr * lr_factor(step, done, warmup_steps=20)
        net.train()
        loss = deep_loss(net, x[mine], train.labels[index][mine])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append(dist.mean({"loss": float(loss.detach())})["loss"])
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{np.mean(history[-10:]):.3f}")
        if checkpoint_every and step % checkpoint_every == 0:
            save()
        if dist.from_main(float(time.monotonic() - t_val > validate_every_s)) >= 1.0:
            if dist.main:
                val_rows.append(validate(model, val, step, t0))
            t_val = time.monotonic()
    bar.close()
    if dist.main:
        val_rows.append(validate(model, val, step, t0))
    save()
    return history, val_rows, step


def validate(model: nn.Module, val: SegData, step: int, t0: float) -> dict[str, float]:
    """Held-out Dice at ``step``, printed."""
    model.eval()
    row = {"step": step, "seconds": round(time.monotonic() - t0, 1),
           **dice_scores(predict_labels(logits_of(model), val), val.labels_eval.numpy())}
    print(f"step {step} ({row['seconds']:.0f} s): prostate {row['prostate_dice']:.3f} lesion "
          f"{row['lesion_dice']:.3f}", flush=True)
    return row


def save_plot(path: Path, history: list[float], val_rows: list[dict[str, float]],
              title: str) -> None:
    """Training loss (moving mean) and held-out Dice against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    window = max(1, len(history) // 50)
    if len(history) >= window:
        smooth = np.convolve(history, np.ones(window) / window, "valid")
        axes[0].plot(np.arange(window - 1, len(history)), smooth)
    axes[0].set(yscale="log", xlabel="step", title=f"{title}: training loss (moving mean)")
    for key in ("prostate_dice", "lesion_dice"):
        axes[1].plot([v["step"] for v in val_rows], [v[key] for v in val_rows], marker="o",
                     label=key)
    axes[1].set(ylim=(0, 1), xlabel="step", title="held-out family A (1000-1003) Dice")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
