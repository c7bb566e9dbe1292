"""FusionEngine: the live registration + segmentation model (AlignSegNet) behind the Engine seam."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from regseg.engines.base import Engine, make_engine
from regseg.models.registry import load_model

INPUTS = ("trus", "mri", "mri_labels")
#: What the live path reads. A graph backend (onnxrt, tensorrt) then drops the KL-latent heads
#: and the other training-only outputs.
LIVE_OUTPUTS = ("theta", "logits")


class FusionEngine:
    """Registers the MRI plane to a TRUS frame (residual affine) and segments prostate and lesion.

    ``__call__`` takes the three model inputs at the model's working size (h, w) = ``size`` and
    returns ``outputs`` (default ``theta`` (1, 2, 3) normalised affine and ``logits``
    (1, 3, h, w)); any other AlignSegNet output (``warped_labels`` (1, 2, h, w), ...) can be asked
    for. Outputs may be the engine's reused buffers: copy what you keep past the next call.

    Args:
        weights: a checkpoint path or registered name (default: the shipped AlignSegNet weights).
        model: an already built model instead of ``weights`` (tests, benchmarks).
        backend, device, precision, cache_dir, threads, fallback: as
            :func:`regseg.engines.base.make_engine` (``backend="auto"`` picks and reports).
        outputs: output names to compute.
        batch: frames (planes) per call; inputs and outputs then have this leading size.
    """

    def __init__(self, weights: str | Path | None = None, *, backend: str = "eager",
                 device: torch.device | str = "cpu", precision: str = "fp32",
                 cache_dir: str | Path | None = None, threads: int | None = None,
                 fallback: str | None = None, model: nn.Module | None = None,
                 outputs: Sequence[str] = LIVE_OUTPUTS, batch: int = 1) -> None:
        if model is None:
            model = load_model(weights or "alignsegnet")
            self.weights = str(weights or "alignsegnet (shipped)")
        else:
            self.weights = f"{type(model).__name__} (in memory)"
        self.model = model  # the module the engine was built from (--scanner-adapt copies it)
        size = int(model.config.size)
        self.size = (size, size)
        self.batch = int(batch)  # > 1: several planes per call (multi-start, stream/capture.py)
        shapes = {"trus": (batch, 1, size, size), "mri": (batch, 1, size, size),
                  "mri_labels": (batch, 2, size, size)}
        self.engine: Engine = make_engine(model, shapes, backend=backend, device=device,
                                          precision=precision, outputs=outputs,
                                          cache_dir=cache_dir, threads=threads,
                                          fallback=fallback)
        self.backend = self.engine.backend
        self.precision = self.engine.precision
        self.device = self.engine.device

    @property
    def info(self) -> dict[str, Any]:
        """The engine's build facts (backend, precision, cache hit, auto's selection ...)."""
        return {"model": "alignsegnet", "weights": self.weights, **self.engine.info}

    def __call__(self, trus: Tensor, mri: Tensor, mri_labels: Tensor) -> dict[str, Tensor]:
        return self.engine({"trus": trus, "mri": mri, "mri_labels": mri_labels})
