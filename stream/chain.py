"""The tensor stages of one frame: :class:`FrameChain`, and the plane matrices it is fed.

The same functions run in order on the CPU (:class:`regseg.stream.pipeline.Pipeline`) and overlapped
in a :class:`~regseg.stream.device_ring.DeviceRing` (optionally one CUDA graph) on the GPU: a uint8
frame and two 3x3 plane matrices in, device tensors out, no host sync.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import planes, spatial
from regseg.engines.fusion import FusionEngine
from regseg.engines.segmentation import argmax_labels
from regseg.kernels.labels_up import available as labels_up_on
from regseg.kernels.labels_up import labels_up
from regseg.kernels.labels_up import warm_up as labels_up_warm
from regseg.kernels.plane_labels import warm_up as plane_labels_warm
from regseg.stream.capture import MultiStart, Refinement
from regseg.stream.context import MriContext

#: ``--resegment``: segment again with the MRI context at the published plane (after the
#: image-based refinement and the temporal filter), not the network's last pass's; decided by
#: addendum 7 of bench/results/lc2_predeclared.md.
RESEGMENT_DEFAULT = "on"


def plane_matrices(context: MriContext, image_to_mri: np.ndarray, frame_hw: tuple[int, int],
                   size: tuple[int, int]) -> np.ndarray:
    """(2, 3, 3) float32: frame pixel (i, j, 1), then model pixel (u, v, 1), to volume grid coords.

    A plane pixel has k = 0, so of the 4x4 map only the columns of i, j and the translation count:
    ``grid = [i, j, 1] @ m.T`` gives grid_sample's (x, y, z) in the MRI volume.
    """
    frame_to_norm = context.world_to_normalised @ image_to_mri
    model_to_norm = frame_to_norm @ planes.model_to_frame(frame_hw, size)
    cols = [0, 1, 3]
    return np.stack([frame_to_norm[:3, cols], model_to_norm[:3, cols]]).astype(np.float32)


def segment_torch(logits: Tensor, hw: tuple[int, int]) -> Tensor:
    """(H, W) uint8 labels of (1, K, h, w) logits at ``hw``: bilinear up-sampling, then argmax
    (any device, no host sync; the compiled :func:`regseg.kernels.labels_up.labels_up`'s twin)."""
    up = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
    return argmax_labels(up)[0]


class FrameChain:
    """The tensor stages of one frame for one frame size; buffers and grids made once.

    Inputs: ``pixels`` (H, W) uint8 and ``mats`` (2, 3, 3) float32 from :func:`plane_matrices`,
    both on the context's device. Every method is device-side only (no host sync), so the whole
    chain can be captured as one CUDA graph.
    """

    def __init__(self, context: MriContext, engine: FusionEngine,
                 frame_hw: tuple[int, int], *, refine_iterations: int = 1,
                 multi_start: MultiStart | None = None, theta_engine: Any = None,
                 segmenter: Any = None, seg_engine: Any = None) -> None:
        self.context, self.engine = context, engine
        # --scanner-adapt segmentation: another AlignSegNet engine (the scanner-adapted one) for
        # the segmentation at the published plane (resegment) only; None: ``engine``
        self.seg_engine = seg_engine
        # Optional segmentation stage replacing the U-Net head's logits (--segmenter,
        # regseg.stream.segmenter.Segmenter): (trus, mri, mri_labels, theta) -> logits.
        self.segmenter = segmenter
        self.frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        self.size = tuple(engine.size)
        device = context.mri.device
        self.device = device
        self.frame_axes = spatial.pixel_axes(*self.frame_hw, device=device)
        self.model_axes = spatial.pixel_axes(*self.size, device=device)
        # theta (normalised) -> frame pixels: inv(N) @ T @ N (spatial.theta_to_pixel), on device.
        n = spatial.index_to_normalised((self.frame_hw[1], self.frame_hw[0]))
        self.norm = torch.as_tensor(n, dtype=torch.float32, device=device)
        self.norm_inv = torch.as_tensor(np.linalg.inv(n), dtype=torch.float32, device=device)
        self.bottom = torch.tensor([[[0.0, 0.0, 1.0]]], device=device)
        # Iterative refinement (regseg.stream.capture): K engine calls per frame, each on the MRI
        # resliced at the estimate so far; theta stays normalised, the same on either grid.
        self.refine = Refinement(self, refine_iterations, multi_start, theta_engine)
        if device.type == "cpu":  # compiled (or loaded from numba's cache) now, not on a frame
            labels_up_warm()
            plane_labels_warm()

    def _sample(self, volume: Tensor, m: Tensor, axes: tuple[Tensor, Tensor],
                mode: str) -> Tensor:
        """Sample ``volume`` (1, C, D, H, W) on the plane grid ``[i, j, 1] @ m.T``: (1, C, h, w)."""
        grid = spatial.axes_grid(m, *axes)  # (h, w, 3): grid_sample's (x, y, z)
        return F.grid_sample(volume, grid[None, None], mode=mode, padding_mode="zeros",
                             align_corners=False)[:, :, 0]

    def prepare(self, pixels: Tensor, mats: Tensor,
                trus: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Model inputs: trus (1, 1, h, w), MRI plane (1, 1, h, w), label planes (1, 2, h, w).

        Equal to :func:`regseg.planes.trus_input` and :func:`regseg.planes.mri_inputs` (tested).
        ``trus`` given (e.g. made by CuPy) is used as is.
        """
        if trus is None:
            trus = planes.trus_input(pixels, self.size)
        mri = self._sample(self.context.mri, mats[1], self.model_axes, "bilinear")
        lab = self._sample(self.context.labels_float, mats[1], self.model_axes, "nearest")
        return trus, mri, planes.labels_onehot(lab)

    def model(self, trus: Tensor, mri: Tensor, mri_labels: Tensor,
              mats: Tensor | None = None, need_logits: bool = True) -> tuple[Tensor, Tensor]:
        """theta (1, 2, 3) and logits (1, 3, h, w) (may be the engine's reused buffers).

        With ``mats``, the chain's refinement runs (multi-start, then re-slice and register
        again, :class:`regseg.stream.capture.Refinement`); theta is then the composed
        correction of the tracked plane; ``need_logits`` False: the logits may be None (every
        pass may skip the segmentation U-Net). Without ``mats``, one engine call.
        """
        if mats is not None:
            return self.refine(trus, mri, mri_labels, mats, need_logits)
        out = self.engine(trus, mri, mri_labels)
        return out["theta"], out["logits"]

    def warp_labels(self, theta: Tensor, mats: Tensor) -> Tensor:
        """MRI labels through the refined plane, (H, W) uint8, nearest (labels stay exact)."""
        t = torch.cat([theta.reshape(1, 2, 3).float(), self.bottom], dim=1)[0]
        theta_px = self.norm_inv @ t @ self.norm  # output pixel -> tracked-plane pixel
        warped = self._sample(self.context.labels_float, mats[0] @ theta_px, self.frame_axes,
                              "nearest")
        return warped[0, 0].to(torch.uint8)

    def seg_logits(self, inputs: tuple[Tensor, Tensor, Tensor], theta: Tensor,
                   logits: Tensor) -> Tensor:
        """The logits to segment: the segmenter's on ``inputs`` and ``theta`` when there is one,
        else the fusion model's ``logits``."""
        return logits if self.segmenter is None else self.segmenter(*inputs, theta)

    def resegment(self, pixels: Tensor, mats: Tensor) -> Tensor:
        """The segmentation's logits with the MRI and its labels resliced at the plane of
        ``mats`` (the published one, :data:`RESEGMENT_DEFAULT`): the U-Net head's from one more
        engine call (its theta unused), or the segmenter's with the identity correction."""
        inputs = self.prepare(pixels, mats)
        if self.segmenter is None:
            return (self.engine if self.seg_engine is None else self.seg_engine)(*inputs)["logits"]
        identity = torch.eye(2, 3, device=self.device)[None]
        return self.segmenter(*inputs, identity)

    def segment(self, logits: Tensor) -> Tensor:
        """Labels at frame size, (H, W) uint8: bilinear logits, then argmax. On the CPU (float32,
        numba importable) :func:`regseg.kernels.labels_up.labels_up`: the same labels without
        up-sampling the cells one class owns (6-13x faster at 640 x 480, bench/frame_size.py);
        a CUDA graph keeps the torch path (no host sync)."""
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and labels_up_on():
            return torch.from_numpy(labels_up(logits[0].detach().numpy(), self.frame_hw))
        return segment_torch(logits, self.frame_hw)

    def run(self, pixels: Tensor, mats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All tensor stages: (theta (1, 2, 3), labels (H, W) uint8, warped labels (H, W) uint8)."""
        inputs = self.prepare(pixels, mats)
        theta, logits = self.model(*inputs, mats)
        logits = self.seg_logits(inputs, theta, logits)
        return theta, self.segment(logits), self.warp_labels(theta, mats)
