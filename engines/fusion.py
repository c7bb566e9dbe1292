"""FusionEngine: the live registration + segmentation model (AlignSegNet) behind the Engine seam."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from regseg.engines.base import Engine, make_engine
from regseg.models.registry import load_model

INPUTS = ("trus", "mri", "mri_labels")


class FusionEngine:
    """Registers the MRI plane to a TRUS frame (residual affine) and segments prostate and lesion.

    ``__call__`` takes the three model inputs at the model's working size and returns ``theta``
    (1, 2, 3), ``logits`` (1, 3, h, w) and ``warped_labels`` (1, 2, h, w).
    """

    def __init__(self, weights: str | Path | None = None, *, backend: str = "eager",
                 device: torch.device | str = "cpu") -> None:
        model = load_model(weights or "alignsegnet")
        size = int(model.config.size)
        self.size = (size, size)
        self.weights = str(weights or "alignsegnet (shipped)")
        shapes = {"trus": (1, 1, size, size), "mri": (1, 1, size, size),
                  "mri_labels": (1, 2, size, size)}
        self.engine: Engine = make_engine(model, shapes, backend=backend, device=device)
        self.backend = self.engine.backend
        self.device = self.engine.device

    def __call__(self, trus: Tensor, mri: Tensor, mri_labels: Tensor) -> dict[str, Tensor]:
        return self.engine({"trus": trus, "mri": mri, "mri_labels": mri_labels})
