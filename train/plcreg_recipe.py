"""What the PLCReg training recipes share: loss weights, one optimiser step, saving a run."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
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


def take_step(optimiser: torch.optim.Optimizer, loss: torch.Tensor,
              parts: dict[str, torch.Tensor], history: list[dict[str, float]], *,
              report_every: int = 0, dist: Dist | None = None) -> int:
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
    if report_every and step % report_every == 0:
        recent = recent_losses(history, report_every)
        print(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in recent.items()), flush=True)
    return step


def save_run(out_dir: Path, name: str, model: PLCReg, cfg: PLCRegConfig, summary: dict[str, Any],
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
