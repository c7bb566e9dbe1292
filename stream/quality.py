"""Per-frame trust: an estimate of the registration error in mm, a segmentation confidence, flags.

A frame is published as truth only when nothing here doubts it. Flag reasons (``Result.flags``):

- ``untracked``: no pose, or the sender marked it INVALID (the source then gives none). The
  registration ran on an invented plane; it is never published as tracked.
- ``no_content``: no ultrasound image (blank, or noise without structure), detected in ~0.2 ms
  from the spread of 8 x 8-pixel block means (:func:`content_score`). No labels are published.
- ``no_gland``: the segmentation finds less than ``min_gland_mm2`` of gland. No labels.
- ``error_estimate``: :class:`ErrorEstimator` (QualityNet on the registered pair) estimates a
  registration error above the threshold (calibrated on family-A phantoms for each live chain,
  shipped with the weights: :meth:`QualityCheck.bind_chain` picks the one of the chain that runs).
- ``jump``: the temporal filter (regseg.stream.capture) reports that the frame's correction
  jumped more than ``jump_threshold_mm`` from the filtered one.
- ``disagreement`` (set by the Pipeline): the registered MRI gland and the segmented gland
  disagree (Dice below its ``quality_threshold``).
- ``out_of_plane`` (set by the Pipeline, with ``--consensus``): the 3-D consensus of the recent
  frames' corrections puts this frame's plane more than 3 mm off along its normal
  (regseg.stream.consensus).
- ``sweep_pending`` (set by the Pipeline, with ``--consensus strict`` only): the probe has not
  swept since the registration (too few distinct planes yet, or corrections no model fits), so
  nothing has verified the frame's error along its normal.
- ``estimate_unverified`` (set by the Pipeline, with ``--estimate-check on``; the default
  ``inform`` reports the verdict without flagging): on this stream's first frames the error
  estimate did not tell the published plane from the same plane displaced by a known 4 mm, so it
  cannot vouch for any frame (regseg.stream.estimate_check); every frame after that verdict is
  flagged.
- ``lc2_unsupported`` (set by the Pipeline, with ``--lc2``): the image-based refinement found no
  alignment the ultrasound supports clearly better than the MRI displaced 12 mm (significance
  below 1.5; regseg.stream.lc2_stage). Not learnt, so it does not share QualityNet's blind spots.

Why not the Dice of the registered MRI gland vs the segmented gland (the old check): the
segmentation network sees the registered MRI labels, so both share one wrong input and agree when
both are wrong. QualityNet sees the TRUS image itself next to the MRI plane and labels, and was
trained on known misregistrations, in and out of plane.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import planes, spatial
from regseg.models.qualitynet import WEIGHTS, chain_key, load_qualitynet
from regseg.stream.context import MriContext
from regseg.stream.estimate_check import DOUBTS, EstimateCheck
from regseg.types import LESION

log = logging.getLogger(__name__)

FLAG_REASONS = ("untracked", "no_content", "no_gland", "error_estimate", "jump", "disagreement",
                "lc2_unsupported", "out_of_plane", "sweep_pending", "estimate_unverified")
CONTENT_SIZE = 256  # content_score measures blocks of CONTENT_BLOCK pixels at this frame size
CONTENT_BLOCK = 8


def content_score(pixels: np.ndarray) -> float:
    """Coefficient of variation of the block means (a 32 x 32 grid, 8 x 8 pixels of a 256 x 256
    frame) inside the imaged area; 0 when there is none.

    B-mode of tissue has structure at the scale of millimetres (gland, capsule, zones): on the
    simulator 0.29-0.41. Noise of any grain finer than a block averages out: iid uniform or
    Gaussian, blurred speckle, speckle in a fan all gave <= 0.075, blank 0. Blocks with zeros
    (outside the fan) or near-black are left out, so the fan's own edge is not taken for content.
    """
    p = np.ascontiguousarray(pixels, dtype=np.uint8)
    n = CONTENT_SIZE // CONTENT_BLOCK
    # block means and the share of zero pixels per block, both by area resampling (fast in C)
    means = cv2.resize(p, (n, n), interpolation=cv2.INTER_AREA).astype(np.float32)
    zeros = cv2.resize((p == 0).astype(np.float32), (n, n), interpolation=cv2.INTER_AREA)
    valid = means[(zeros < 0.05) & (means > 2.0)]
    if valid.size < 16:
        return 0.0
    return float(valid.std() / valid.mean())


def seg_confidence(logits: Tensor) -> float:
    """1 - mean normalised softmax entropy over the pixels the segmentation is not sure are
    background (p(background) < 0.99), on 4 x 4-pooled logits: 1 sure everywhere, 0 uniform;
    1.0 when there are none."""
    p = torch.softmax(F.avg_pool2d(logits.float(), 4), dim=1)[0]  # 4 x 4 blocks: cheap
    entropy = -(p * torch.log(p.clamp_min(1e-8))).sum(0) / math.log(p.shape[0])
    region = p[0] < 0.99
    if not bool(region.any()):
        return 1.0
    return float(1.0 - entropy[region].mean())


def lesion_target(warped_labels: np.ndarray) -> tuple[float, float] | None:
    """(i, j) pixel centroid of the MRI lesion through the registration; None when not in view."""
    j, i = np.nonzero(warped_labels == LESION)
    if len(i) == 0:
        return None
    return float(i.mean()), float(j.mean())


class ErrorEstimator:
    """Registration error in mm from the registered pair (QualityNet, ~0.3 ms on one CPU core).

    Input: the TRUS frame, the MRI resliced at the registered (affine) plane and the registered
    labels (the deformable stage's when it ran), all at the net's 64 x 64 grid.
    """

    def __init__(self, context: MriContext, weights: str | Path = WEIGHTS) -> None:
        self.context = context
        self.model, self.calibration = load_qualitynet(weights)
        self.weights = str(weights)
        s = self.model.config.size
        self.size = (s, s)
        self._axes = spatial.pixel_axes(s, s, device=context.mri.device)

    def trus(self, pixels: np.ndarray) -> np.ndarray:
        """The frame as the net sees it: area-resampled to its grid, in [0, 1], (s, s) float32."""
        return cv2.resize(np.ascontiguousarray(pixels, np.uint8), self.size[::-1],
                          interpolation=cv2.INTER_AREA).astype(np.float32) * (1.0 / 255.0)

    def estimate_mm(self, x: Tensor) -> Tensor:
        """Estimated errors in mm, (B,), of a batch of inputs (B, 4, s, s)."""
        with torch.inference_mode():
            return torch.expm1(self.model(x)).clamp_min(0.0).reshape(-1)

    def inputs(self, pixels: np.ndarray, image_to_mri: np.ndarray,
               warped_labels: np.ndarray) -> Tensor:
        """The net's input (1, 4, s, s): TRUS, MRI at ``image_to_mri``, gland and lesion maps.

        The same as training builds them (regseg.planes: area-resampled TRUS, MRI resliced on the
        model grid covering the frame, labels nearest), with OpenCV for the 2-D resamples.
        """
        ctx = self.context
        hw = (int(pixels.shape[0]), int(pixels.shape[1]))
        s = self.size
        with torch.inference_mode():
            trus = self.trus(pixels)
            plane = ctx.world_to_normalised @ image_to_mri @ planes.model_to_frame(hw, s)
            m = torch.as_tensor(plane[:3, [0, 1, 3]], dtype=torch.float32,
                                device=ctx.mri.device)
            grid = spatial.axes_grid(m, *self._axes)
            mri = F.grid_sample(ctx.mri, grid[None, None], mode="bilinear",
                                padding_mode="zeros", align_corners=False)[0, 0, 0]
            lab = planes.model_grid_labels(warped_labels, s)
            x = np.empty((1, 4, *s), np.float32)
            x[0, 0] = trus
            x[0, 1] = mri.float().cpu().numpy()
            x[0, 2] = lab > 0
            x[0, 3] = lab == LESION
            return torch.from_numpy(x)

    def __call__(self, pixels: np.ndarray, image_to_mri: np.ndarray,
                 warped_labels: np.ndarray) -> float:
        return float(self.estimate_mm(self.inputs(pixels, image_to_mri, warped_labels))[0])


@dataclass(frozen=True)
class QualityConfig:
    """Flagging settings. ``error_threshold_mm`` None: the calibrated one shipped with the
    weights (``calibration.threshold_mm`` in qualitynet.json)."""

    error_threshold_mm: float | None = None
    min_gland_mm2: float = 50.0
    min_content: float = 0.15  # content_score below this: no ultrasound content
    jump_threshold_mm: float = 3.0
    weights: str | Path = WEIGHTS


@dataclass(frozen=True)
class Assessment:
    error_mm: float  # estimated registration error (NaN when not estimated)
    margin_mm: float  # target margin: calibrated upper bound (90 %) of the error
    seg_confidence: float
    content: float
    flags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def publish_labels(self) -> bool:
        """Predicted labels go out unless there is no image, no gland, or no pose."""
        return not ({"no_content", "no_gland", "untracked"} & set(self.flags))


def pipeline_chain(pipeline) -> str:
    """:func:`regseg.models.qualitynet.chain_key` of the chain a
    :class:`regseg.stream.pipeline.Pipeline` runs (its capture's K and multi-start, and whether
    it has a deformable stage and the image-based refinement)."""
    capture = pipeline.capture
    return chain_key(capture.refine_iterations, pipeline.deformable is not None,
                     capture.multi_start is not None, getattr(pipeline, "lc2", None) is not None)


class QualityCheck:
    """Assesses each frame (see the module docstring); one per Pipeline, bound to the chain it
    runs after (:meth:`bind_chain`: the Pipeline does it) so that the threshold is the one
    calibrated on that chain."""

    def __init__(self, context: MriContext, config: QualityConfig = QualityConfig(),
                 chain: str | None = None) -> None:
        self.config = config
        self.estimator = ErrorEstimator(context, config.weights)
        self.chain: str | None = None
        self.calibration_info: dict = {}
        #: --estimate-check (regseg.stream.estimate_check.EstimateCheck), None when off
        self.self_check: EstimateCheck | None = None
        self._use(self.estimator.calibration, chain=None, matched=None)
        if chain is not None:
            self.bind_chain(chain)

    def _use(self, cal: dict, *, chain: str | None, matched: bool | None) -> None:
        cfg = self.config
        self.threshold_mm = float(cfg.error_threshold_mm if cfg.error_threshold_mm is not None
                                  else cal.get("threshold_mm", 5.0))
        self.margin_factor = float(cal.get("margin_factor", 2.0))
        self.calibration_info = {
            "chain": chain, "calibrated_for": cal.get("chain"), "matched": matched,
            "threshold_mm": self.threshold_mm, "margin_factor": self.margin_factor,
            "threshold_from": ("QualityConfig.error_threshold_mm"
                               if cfg.error_threshold_mm is not None else "calibration")}

    def bind_chain(self, chain: str) -> None:
        """Use the calibration made on ``chain`` (:func:`regseg.models.qualitynet.chain_key` of
        the chain this check runs after): the error estimate of a frame registered K times, or
        refined by the deformable stage, is not the one of a frame registered once, so each
        chain needs its own threshold. Without one for ``chain`` it warns and takes the lowest
        calibrated threshold (and the largest margin factor) of the checkpoint: more false
        alarms, not fewer detections."""
        cal = self.estimator.calibration
        by_chain = cal.get("by_chain") or {}
        explicit = self.config.error_threshold_mm is not None  # nothing to warn about
        if chain in by_chain:
            self._use({**by_chain[chain], "chain": chain}, chain=chain, matched=True)
        elif by_chain:
            low = min(by_chain.values(), key=lambda c: c["threshold_mm"])
            margin = max(c["margin_factor"] for c in by_chain.values())
            self._use({**low, "margin_factor": margin, "chain": "lowest of " + ", ".join(
                sorted(by_chain))}, chain=chain, matched=False)
            say = log.info if explicit else log.warning
            say("QualityNet %s has no calibration for the chain %s (calibrated: %s): using the "
                "lowest calibrated threshold %.2f mm; calibrate it with `python -m "
                "regseg.train.quality_calibrate --out DIR --chains %s`", self.estimator.weights,
                chain, ", ".join(sorted(by_chain)), self.threshold_mm, chain)
        else:  # a checkpoint from before chains were recorded
            self._use(cal, chain=chain, matched=cal.get("chain") == chain if cal.get("chain")
                      else None)
            if cal.get("chain") is None and not explicit:
                log.warning("QualityNet %s does not say which chain its threshold %.2f mm was "
                            "calibrated on; this chain is %s", self.estimator.weights,
                            self.threshold_mm, chain)
        self.chain = chain

    @property
    def lowest_threshold_mm(self) -> float:
        """The lowest threshold calibrated on any chain (or this one's when there is no other):
        the one for an alignment no chain was calibrated on, e.g. the tracked plane that
        regseg.stream.do_no_harm publishes instead of the registration (more false alarms, not
        fewer detections). An explicit ``error_threshold_mm`` stays as given."""
        by_chain = self.estimator.calibration.get("by_chain") or {}
        if self.config.error_threshold_mm is not None or not by_chain:
            return self.threshold_mm
        return min(self.threshold_mm, *(float(c["threshold_mm"]) for c in by_chain.values()))

    def assess(self, pixels: np.ndarray, spacing_mm: tuple[float, float], tracked: bool,
               labels: np.ndarray, warped_labels: np.ndarray, image_to_mri: np.ndarray,
               seg_conf: float = math.nan, jump_mm: float = math.nan, *,
               threshold_mm: float | None = None,
               content_pixels: np.ndarray | None = None) -> Assessment:
        """The frame's Assessment; ``threshold_mm``: flag at this error threshold instead of
        the chain's (:attr:`lowest_threshold_mm` for a tracked-only alignment);
        ``content_pixels``: the frame as received, for ``no_content`` (default ``pixels``)."""
        cfg = self.config
        flags = []
        if not tracked:
            flags.append("untracked")
        content = content_score(pixels if content_pixels is None else content_pixels)
        if content < cfg.min_content:
            flags.append("no_content")
        gland_mm2 = float(np.count_nonzero(labels)) * spacing_mm[0] * spacing_mm[1]
        if gland_mm2 < cfg.min_gland_mm2:
            flags.append("no_gland")
        error = self.estimator(pixels, image_to_mri, warped_labels)
        if error > (self.threshold_mm if threshold_mm is None else threshold_mm):
            flags.append("error_estimate")
        if jump_mm > cfg.jump_threshold_mm:  # NaN (no filter, or reset) compares False
            flags.append("jump")
        return Assessment(error_mm=error, margin_mm=self.margin_factor * error,
                          seg_confidence=seg_conf, content=content, flags=tuple(flags))

    def self_checked(self, pixels: np.ndarray, image_to_mri: np.ndarray,
                     spacing_mm: tuple[float, float], flags: tuple[str, ...]
                     ) -> tuple[tuple[str, ...], str | None]:
        """``--estimate-check`` (:attr:`self_check`): the frame, with all its other flags, into
        the error estimate's own check; returns (``flags`` plus the check's, its status: None
        when off). Only a frame that no flag but the estimate's own doubts is taken in
        (regseg.stream.estimate_check.DOUBTS)."""
        check = self.self_check
        if check is None:
            return flags, None
        reasons = check.enter(self.estimator, pixels, image_to_mri, spacing_mm,
                              usable=not (DOUBTS & set(flags)))
        return flags + reasons, check.status


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two gland masks; NaN when both are empty (nothing to judge)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return math.nan if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total
