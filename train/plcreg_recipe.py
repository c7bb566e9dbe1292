"""What the PLCReg training recipes share: loss weights, one optimiser step, saving a run."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regseg.distributed import Dist
from regseg.models.checkpoint import save_checkpoint
from regseg.models.plcreg import PLCReg, PLCRegConfig, count_parameters


@dataclasses.dataclass(frozen=True)
class Weights:
    """Loss weights. 2-D: Dice + epe * EPE + smooth * Grad; 3-D: MIND + dice * Dice + smooth
    (+ epe * EPE to the true field when asked)."""

    dice: float = 1.0
    epe: float = 0.05  # per voxel of end-point error (the simulator knows the true field)
    mind: float = 1.0
    smooth: float = 0.1


def recent_losses(history: list[dict[str, float]], n: int) -> dict[str, float]:
    """Mean of each loss part over the last ``n`` steps ({} before the first step)."""
    if not history:
        return {}
    return {k: float(np.mean([h[k] for h in history[-n:]])) for k in history[-1]}


class StepProgress:
    """A progress bar over a run's time budget (these recipes stop on time, not on a step count):
    seconds used of the budget, steps, and the recent mean of each loss part. Off (``enabled``
    False) it prints nothing."""

    def __init__(self, name: str, budget_s: float, enabled: bool) -> None:
        from tqdm import tqdm

        self.t0 = time.monotonic()
        self.bar = tqdm(total=max(1, round(budget_s)), desc=name, unit="s", disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s {postfix}")

    def update(self, step: int, history: list[dict[str, float]]) -> None:
        if self.bar.disable or step % 10:
            return
        self.bar.n = min(self.bar.total, round(time.monotonic() - self.t0))
        self.bar.set_postfix({"step": step, **{k: f"{v:.4f}" for k, v in
                                               recent_losses(history, 10).items()}})

    def close(self) -> None:
        self.bar.close()


def save_curves(path: Path, history: list[dict[str, float]]) -> None:
    """The training curves (each loss part, moving mean over 25 steps) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, min(25, len(history) // 4))
    kernel = np.ones(window) / window
    for key in history[0]:
        values = np.array([h[key] for h in history])
        ax.plot(np.arange(window, len(values) + 1), np.convolve(values, kernel, "valid"),
                label=key)
    ax.set(xlabel="step", ylabel=f"loss part (mean of {window} steps)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def take_step(optimiser: torch.optim.Optimizer, loss: torch.Tensor,
              parts: dict[str, torch.Tensor], history: list[dict[str, float]], *,
              report_every: int = 0, dist: Dist | None = None,
              progress: StepProgress | None = None) -> int:
    """Backpropagate ``loss``, step, record ``parts``; print the recent means every
    ``report_every`` steps (0: never). Returns the number of steps taken so far.

    Under torchrun (``dist``) the recorded parts are the means over the ranks, and only rank 0
    prints."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    recorded = {k: float(v.detach()) for k, v in parts.items()}
    if dist is not None:
        recorded = dist.mean(recorded)
        report_every = report_every if dist.main else 0
    history.append(recorded)
    step = len(history)
    if progress is not None and (dist is None or dist.main):
        progress.update(step, history)
    if report_every and step % report_every == 0:
        recent = recent_losses(history, report_every)
        print(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in recent.items()), flush=True)
    return step


def save_run(out_dir: Path, name: str, model: PLCReg, cfg: PLCRegConfig, summary: dict[str, Any],
          weights: Weights, seed: int, lr: float,
          history: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Write ``<name>.pt`` and ``<name>.json`` (the summary and the command) and, with
    ``history``, the training curves ``<name>_training.png``."""
    command = shlex.join(["python", "-m", "regseg.train.plcreg", *sys.argv[1:]])
    summary = {"model": name, "command": command, "config": dataclasses.asdict(cfg),
               "loss_weights": dataclasses.asdict(weights), "seed": seed, "lr": lr,
               "parameters": count_parameters(model), "threads": torch.get_num_threads(),
               "device": "cpu", "torch": torch.__version__, **summary}
    meta = {k: v for k, v in summary.items() if k in ("command", "seed", "steps")}
    save_checkpoint(out_dir / f"{name}.pt", "plcreg", model, cfg, meta=meta)
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if history:
        save_curves(out_dir / f"{name}_training.png", history)
    return summary
