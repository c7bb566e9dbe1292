"""Per frame: reslice the MRI at the frame's plane, register, warp labels, segment, overlay."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from regseg import planes, spatial
from regseg.clock import now_ns
from regseg.engines.fusion import FusionEngine
from regseg.stream.context import MriContext
from regseg.stream.overlay import compose_overlay
from regseg.types import Frame, Result


def untracked_plane(context: MriContext, frame_hw: tuple[int, int],
                    spacing_mm: tuple[float, float]) -> np.ndarray:
    """Plane used when a frame has no pose: transverse through the prostate centroid.

    Columns run along +x (R), rows along +y (A: away from a transrectal probe), the frame centre on
    the centroid of the MRI prostate label. Registration then only refines in-plane.
    """
    plane = np.eye(4)
    plane[0, 0], plane[1, 1] = spacing_mm[1], spacing_mm[0]
    centre_px = np.array([(frame_hw[1] - 1) / 2.0, (frame_hw[0] - 1) / 2.0, 0.0])
    plane[:3, 3] = context.prostate_centre_mm() - plane[:3, :3] @ centre_px
    return plane


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two gland masks; NaN when both are empty (nothing to judge)."""
    total = int(a.sum()) + int(b.sum())
    return math.nan if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


class Pipeline:
    """Turns a Frame into a Result. One instance per stream; holds no per-frame state.

    The registration's quality is the agreement (Dice) between the gland of the registered MRI
    labels and the gland the segmentation finds on the frame: the two come from different
    evidence (MRI context vs TRUS appearance), so a registration that went wrong disagrees with the
    segmentation. Below ``quality_threshold`` the result is flagged, not published as truth.
    """

    def __init__(self, context: MriContext, engine: FusionEngine, *,
                 reference_to_mri: np.ndarray | None = None,
                 quality_threshold: float = 0.5) -> None:
        self.context = context
        self.engine = engine
        self.device = engine.device
        self.reference_to_mri = np.eye(4) if reference_to_mri is None else reference_to_mri
        self.quality_threshold = quality_threshold

    def plane(self, frame: Frame) -> np.ndarray:
        """The frame's tracked plane in MRI world (pixel (i, j, 0) -> mm)."""
        if frame.image_to_reference is None:
            return untracked_plane(self.context, frame.pixels.shape, frame.spacing_mm)
        return self.reference_to_mri @ frame.image_to_reference

    def __call__(self, frame: Frame) -> Result:
        ctx, size = self.context, self.engine.size
        hw = frame.pixels.shape
        t = [now_ns()]
        pixels = torch.from_numpy(frame.pixels).to(self.device, non_blocking=True)
        trus = planes.trus_input(pixels, size)
        tracked = self.plane(frame)
        mri, mri_labels = planes.mri_inputs(ctx.mri, ctx.labels, ctx.world_to_voxel, tracked, hw,
                                            size)
        t.append(now_ns())
        out = self.engine(trus, mri, mri_labels)
        t.append(now_ns())
        theta = out["theta"][0].double().cpu().numpy()
        image_to_mri = tracked @ spatial.lift_2d(spatial.theta_to_pixel(theta, hw))
        warped = spatial.reslice(ctx.labels, ctx.world_to_voxel, image_to_mri, hw, mode="nearest")
        warped_labels = warped[0, 0].cpu().numpy()
        t.append(now_ns())
        logits = F.interpolate(out["logits"], size=hw, mode="bilinear", align_corners=False)
        labels = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
        t.append(now_ns())
        overlay = compose_overlay(frame.pixels, labels, warped_labels)
        t.append(now_ns())
        quality = agreement(warped_labels > 0, labels > 0)
        names = ("prepare", "model", "warp_labels", "segment", "overlay")
        timings = {n: (t[i + 1] - t[i]) / 1e6 for i, n in enumerate(names)}
        timings["total"] = (t[-1] - t[0]) / 1e6
        return Result(
            frame=frame,
            mri_to_image=spatial.invert(image_to_mri),
            warped_labels=warped_labels,
            labels=labels,
            overlay=overlay,
            quality=quality,
            # NaN (no gland in view) compares False: not flagged
            flagged=bool(quality < self.quality_threshold),
            timings_ms=timings,
        )
