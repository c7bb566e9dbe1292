"""The live deformable stage: a 2-D PLCReg refines the MRI-to-frame registration after the affine.

Per frame, given the affinely registered plane (frame pixel -> MRI mm): reslice the MRI and its
label maps on that plane at the model grid, predict an in-plane displacement against the TRUS
frame, bring it to frame size, and sample the MRI labels once through plane + displacement
(nearest, so the labels stay exact). ``regseg-stream --deformable on|off`` switches it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from regseg import planes
from regseg.engines.registration import RegistrationEngine
from regseg.errors import EngineError
from regseg.models.integrate import resize_ddf
from regseg.stream.capture import warp_labels
from regseg.stream.context import MriContext


class DeformableStage:
    """Refines the affine registration of each frame with a 2-D PLCReg.

    Args:
        context: the case's MRI and labels on the device.
        weights: a 2-D PLCReg checkpoint (default the shipped ``plcreg2d``), trained with the MRI
            plane and its two label maps as the moving image and the TRUS frame as the fixed one.
        backend, precision, threads: engine options (``regseg.engines.base.make_engine``;
            ``auto`` picks the fastest backend that matches eager here, e.g. ONNX Runtime on CPU).

    ``stage(pixels, image_to_mri)`` with ``pixels`` (H, W) uint8 and ``image_to_mri`` (4, 4) the
    affinely registered frame pixel (i, j, 0) -> MRI world mm returns ``(warped_labels, ddf)``:
    (H, W) uint8 MRI labels through the refined map and (2, H, W) float32 the displacement in
    frame pixels, (dy, dx): frame pixel p shows the MRI at ``image_to_mri (p + ddf(p))``.
    """

    def __init__(self, context: MriContext, weights: str | Path = "plcreg2d", *,
                 backend: str = "eager", precision: str = "fp32",
                 threads: int | None = None) -> None:
        self.context = context
        self.engine = RegistrationEngine(weights, backend=backend, device=context.mri.device,
                                         affine_iterations=0, precision=precision,
                                         threads=threads, outputs=("ddf", "field"))
        cfg = self.engine.config
        if cfg.ndim != 2 or cfg.moving_channels != 3 or cfg.fixed_channels != 1:
            raise EngineError(
                f"{weights}: the live deformable stage needs a 2-D PLCReg with 3 moving channels "
                f"(MRI + prostate + lesion maps) and 1 fixed (TRUS); got ndim={cfg.ndim}, "
                f"moving_channels={cfg.moving_channels}, fixed_channels={cfg.fixed_channels}.")
        self.size = (int(cfg.size[0]), int(cfg.size[1]))
        self.weights = self.engine.weights

    def __call__(self, pixels: np.ndarray, image_to_mri: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        ddf = self.field(pixels, image_to_mri)
        return self.warp(image_to_mri, ddf), ddf[0].float().cpu().numpy()

    def field(self, pixels: np.ndarray, image_to_mri: np.ndarray) -> torch.Tensor:
        """The network's displacement for the frame on ``image_to_mri``: (1, 2, H, W) float32
        frame pixels (dy, dx) on the stage's device."""
        ctx, dev = self.context, self.engine.device
        hw = (int(pixels.shape[0]), int(pixels.shape[1]))
        with torch.inference_mode():
            trus = planes.trus_input(torch.from_numpy(np.ascontiguousarray(pixels)).to(dev),
                                     self.size)
            mri, label_maps = planes.mri_inputs(ctx.mri, ctx.labels, ctx.world_to_voxel,
                                                image_to_mri, hw, self.size)
            ddf = self.engine.predict(torch.cat([mri, label_maps], dim=1), trus)["ddf"]
            return resize_ddf(ddf, hw)  # model pixels -> frame pixels, (1, 2, H, W) as (dy, dx)

    def warp(self, image_to_mri: np.ndarray, ddf: torch.Tensor) -> np.ndarray:
        """The MRI labels through ``image_to_mri`` and the displacement ``ddf`` (:meth:`field`'s,
        of a frame of the same size): (H, W) uint8, one nearest lookup in the volume at
        plane(p + ddf(p)) (:func:`regseg.stream.capture.warp_labels`)."""
        return warp_labels(self.context, image_to_mri, tuple(ddf.shape[-2:]), ddf)
