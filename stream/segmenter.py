"""The live segmentation stage when it is not AlignSegNet's own U-Net head: ASC-Seg, fused or
TRUS-only (``regseg-stream --segmenter ascseg|ascseg-trus``).

Takes the chain's model inputs (TRUS, the MRI plane and label maps at the tracked plane, all on
AlignSegNet's grid) and the chain's registration ``theta``; returns logits on the segmenter's own
grid, which :meth:`regseg.stream.pipeline.FrameChain.segment` up-samples to the frame as it does
the U-Net head's. The fused variant sees the MRI plane and labels warped through ``theta``, as in
training (train/ascseg.py); the TRUS-only variant sees the frame alone, so its segmentation is
evidence about the registration that does not come from the MRI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from regseg.engines.segmentation import SegmentationEngine
from regseg.errors import InputError
from regseg.models.registry import WEIGHTS_DIR, load_model
from regseg.spatial import warp_affine

#: ``--segmenter`` value -> shipped weights (``unet`` is AlignSegNet's head: no extra stage).
SEGMENTERS = {"ascseg": WEIGHTS_DIR / "ascseg.pt", "ascseg-trus": WEIGHTS_DIR / "ascseg_trus.pt"}


class Segmenter:
    """An ASC-Seg checkpoint behind a :class:`SegmentationEngine` with the chain's inputs.

    Args:
        name: a key of :data:`SEGMENTERS`, or a checkpoint path (its ``in_channels`` says which
            variant: 1 TRUS only, 4 fused).
        backend, device, threads: as :func:`regseg.engines.base.make_engine`.
    Raises:
        InputError: unknown name, or a checkpoint whose model is not ASC-Seg-like (1 or 4 input
            channels).
    """

    def __init__(self, name: str | Path = "ascseg", *, backend: str = "auto",
                 device: torch.device | str = "cpu", threads: int | None = None) -> None:
        path = SEGMENTERS.get(str(name), Path(name))
        if str(name) not in SEGMENTERS and Path(path).suffix != ".pt":
            raise InputError(f"--segmenter {name!r}: choose unet, {', '.join(SEGMENTERS)} or an "
                             "ASC-Seg checkpoint (.pt)")
        model = load_model(path)
        channels = int(getattr(model.config, "in_channels", 0))
        if channels not in (1, 4):
            raise InputError(f"{path}: a segmenter with 1 (TRUS) or 4 (TRUS + registered MRI + "
                             f"2 label maps) input channels is expected, got {channels}")
        self.name, self.weights, self.fused = str(name), str(path), channels == 4
        self.size = (int(model.config.size),) * 2
        self.engine = SegmentationEngine(model, (1, channels, *self.size), backend=backend,
                                         device=device, threads=threads)
        self.backend = self.engine.backend

    @property
    def info(self) -> dict[str, Any]:
        return {"segmenter": self.name, "weights": self.weights, **self.engine.info}

    def inputs(self, trus: Tensor, mri: Tensor, mri_labels: Tensor, theta: Tensor) -> Tensor:
        """(1, C, s, s): TRUS [+ MRI and label maps through ``theta``], area-resampled to s.

        ``trus``, ``mri`` (1, 1, h, w), ``mri_labels`` (1, 2, h, w) on the chain's grid;
        ``theta`` (1, 2, 3) normalised, the chain's correction of the tracked plane.
        """
        x = trus if not self.fused else torch.cat(
            [trus, warp_affine(torch.cat([mri, mri_labels], dim=1), theta.reshape(1, 2, 3))], 1)
        return x if tuple(x.shape[-2:]) == self.size else F.interpolate(x, size=self.size,
                                                                         mode="area")

    def __call__(self, trus: Tensor, mri: Tensor, mri_labels: Tensor, theta: Tensor) -> Tensor:
        """Logits (1, 3, s, s) on the segmenter's grid (may be a reused buffer)."""
        return self.engine.logits(self.inputs(trus, mri, mri_labels, theta))
