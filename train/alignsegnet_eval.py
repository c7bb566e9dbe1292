"""AlignSegNet's held-out evaluation, the validation print-out and the training-curve plot
(train/alignsegnet.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from regseg import metrics, planes
from regseg.models.alignsegnet import AlignSegNet
from regseg.train.data import SampleSet
from regseg.types import LESION, PROSTATE


@torch.inference_mode()
def evaluate(model: AlignSegNet, samples: SampleSet, *, batch_size: int = 64) -> dict[str, float]:
    """Validation metrics, means over frames (frames where a structure is absent are skipped).

    Returns:
        ``prostate_dice``, ``lesion_dice`` (segmentation); ``reg_dice_before`` / ``reg_dice_after``
        (MRI prostate at the tracked plane / through the predicted affine vs the true gland);
        ``tre_mm_before`` / ``tre_mm_after`` / ``tre_mm_oracle`` (mean over the true prostate
        pixels, tracked / registered / through the true in-plane theta: the oracle is the floor
        an in-plane affine can reach, what is left being out-of-plane error and deformation).
    """
    model.eval()
    device = next(model.parameters()).device
    size = (samples.labels.shape[1], samples.labels.shape[2])
    rows: dict[str, list[float]] = {k: [] for k in (
        "prostate_dice", "lesion_dice", "reg_dice_before", "reg_dice_after",
        "tre_mm_before", "tre_mm_after", "tre_mm_oracle")}
    for start in range(0, len(samples), batch_size):
        index = torch.arange(start, min(start + batch_size, len(samples)))
        batch = samples.batch(index)
        out = model(*(batch[k].to(device) for k in ("trus", "mri", "mri_labels")))
        out = {k: v.cpu() for k, v in out.items()}
        pred = out["logits"].argmax(1).numpy()
        warped = (out["warped_labels"] > 0.5).numpy()
        warped_labels = warped[:, 0] * PROSTATE + warped[:, 1] * (LESION - PROSTATE)
        before_labels = (batch["mri_labels"][:, 0] + batch["mri_labels"][:, 1]).numpy()
        truth = batch["labels"].numpy()
        theta = out["theta"].numpy()
        for n, i in enumerate(index.tolist()):
            frame_hw = samples.sample_hw(i)
            to_frame = planes.model_to_frame(frame_hw, size)
            rows["prostate_dice"].append(metrics.dice(pred[n], truth[n], PROSTATE))
            rows["lesion_dice"].append(metrics.dice(pred[n], truth[n], LESION))
            rows["reg_dice_before"].append(metrics.dice(before_labels[n], truth[n], PROSTATE))
            rows["reg_dice_after"].append(metrics.dice(warped_labels[n], truth[n], PROSTATE))
            v, u = np.nonzero(truth[n] >= PROSTATE)
            points = np.stack([u, v, np.zeros_like(u)], 1).astype(np.float64)
            points_ij = (points @ to_frame[:3, :3].T + to_frame[:3, 3])[:, :2]
            tracked = samples.tracked_image_to_mri[i].numpy()
            true = samples.true_image_to_mri[i].numpy()
            registered = metrics.registered_image_to_mri(theta[n], tracked, frame_hw)
            oracle = metrics.registered_image_to_mri(samples.theta[i].numpy(), tracked, frame_hw)
            rows["tre_mm_before"].append(metrics.tre_mm(tracked, true, points_ij))
            rows["tre_mm_after"].append(metrics.tre_mm(registered, true, points_ij))
            rows["tre_mm_oracle"].append(metrics.tre_mm(oracle, true, points_ij))
    out_metrics = {}
    for key, values in rows.items():
        arr = np.asarray(values, dtype=np.float64)
        out_metrics[key] = float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
    for key in ("tre_mm_before", "tre_mm_after"):
        arr = np.asarray(rows[key], dtype=np.float64)
        out_metrics[key + "_median"] = (float(np.nanmedian(arr)) if np.isfinite(arr).any()
                                        else float("nan"))
    after = np.asarray(rows["tre_mm_after"], dtype=np.float64)
    out_metrics["tre_mm_after_p90"] = (float(np.nanpercentile(after, 90))
                                       if np.isfinite(after).any() else float("nan"))
    out_metrics["frames"] = len(samples)
    return out_metrics


def _validate(model: AlignSegNet, val_set: SampleSet, step: int,
              history: list[dict[str, float]]) -> dict[str, float]:
    """:func:`evaluate` at ``step``, printed with the mean training losses since the last call."""
    v = {"step": step, **evaluate(model, val_set)}
    recent = history[-50:]
    parts = " ".join(f"{k} {np.mean([h[k] for h in recent]):.4f}" for k in recent[0]) \
        if recent else "-"
    print(f"step {step}: loss [{parts}] | prostate {v['prostate_dice']:.3f} lesion "
          f"{v['lesion_dice']:.3f} reg-dice {v['reg_dice_before']:.3f}->{v['reg_dice_after']:.3f}"
          f" TRE {v['tre_mm_before']:.2f}->{v['tre_mm_after']:.2f} mm "
          f"(oracle {v['tre_mm_oracle']:.2f})", flush=True)
    return v


def save_plot(path: Path, history: list[dict[str, float]], val: list[dict[str, float]]) -> None:
    """Loss curves (smoothed) and validation Dice / TRE against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = np.arange(len(history))
    window = max(1, len(history) // 50)
    kernel = np.ones(window) / window
    for key in ("total", "seg", "reg", "transform", "kl"):
        values = np.array([h[key] for h in history])
        if len(values) >= window:
            axes[0].plot(steps[window - 1:], np.convolve(values, kernel, "valid"), label=key)
    axes[0].set(yscale="log", xlabel="step", title="training loss (moving mean)")
    axes[0].legend()
    vsteps = [v["step"] for v in val]
    for key in ("prostate_dice", "lesion_dice", "reg_dice_before", "reg_dice_after"):
        axes[1].plot(vsteps, [v[key] for v in val], marker="o", label=key)
    axes[1].set(ylim=(0, 1), xlabel="step", title="held-out validation Dice")
    axes[1].legend()
    for key in ("tre_mm_before", "tre_mm_after", "tre_mm_oracle"):
        axes[2].plot(vsteps, [v[key] for v in val], marker="o", label=key)
    axes[2].set(xlabel="step", ylabel="mm", title="held-out TRE over the prostate")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
