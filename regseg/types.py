"""The plain data that flows through the live path: Frame in, Result out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Label values everywhere in regseg (MRI labels, predictions, ground truth).
BACKGROUND, PROSTATE, LESION = 0, 1, 2
LABEL_NAMES = {PROSTATE: "prostate", LESION: "lesion"}


@dataclass(frozen=True, slots=True)
class GroundTruth:
    """What a simulated source knows about a frame and a real scanner never tells."""

    image_to_mri: np.ndarray  # (4, 4) true map from image pixels (i, j, 0) to MRI world mm (RAS)
    labels: np.ndarray  # (H, W) uint8, true labels on the frame (0 bg, 1 prostate, 2 lesion)
    # (H, W, 2) float32 (di, dj) pixels: the tissue motion (probe pressure, bulges) the simulator
    # rendered, so pixel p shows the tissue at image_to_mri (p + d(p)); None when not known
    displacement_px: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    """One ultrasound image and what places it in space and time.

    ``image_to_reference`` maps pixel index coordinates (i = column, j = row, k = 0, 1) to the
    tracker's reference frame in mm (PLUS "ImageToReference": the Image frame is in pixels).
    """

    seq: int  # per-source counter; a gap is a dropped frame
    acquired_ns: int  # clock.now_ns() at receipt
    pixels: np.ndarray  # (H, W) uint8 B-mode, as received
    spacing_mm: tuple[float, float]  # (row, col)
    image_to_reference: np.ndarray | None  # (4, 4); None when the probe is not tracked
    source_ts: float = 0.0  # the sender's timestamp, seconds since 1970, kept apart from ours
    device_name: str = "Image_Reference"
    truth: GroundTruth | None = None  # only simulated sources know it


@dataclass(slots=True)
class Result:
    """What the pipeline made of one frame.

    ``mri_to_image`` maps MRI world mm (RAS) to the frame's pixel index coordinates (i, j, k):
    the refined registration. Label maps use the values of :data:`LABEL_NAMES`.
    """

    frame: Frame
    mri_to_image: np.ndarray  # (4, 4)
    warped_labels: np.ndarray  # (H, W) uint8: MRI labels through the registration
    labels: np.ndarray  # (H, W) uint8: predicted labels on the frame
    overlay: np.ndarray  # (H, W, 3) uint8 RGB
    quality: float  # 0..1 Dice of registered MRI gland vs segmented gland (a consistency cue)
    flagged: bool  # True when the registration looks wrong: not to be published as truth
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, plus "total"
    ddf: np.ndarray | None = None  # (2, H, W) displacement in pixels, when a deformable stage ran
    # Trust (regseg.stream.quality): NaN / empty when no quality check ran.
    error_mm: float = math.nan  # estimated registration error (mean over the gland), mm
    seg_confidence: float = math.nan  # 0..1, 1 - mean softmax entropy where the gland may be
    flags: tuple[str, ...] = ()  # why the frame is flagged (regseg.stream.quality.FLAG_REASONS)
    # The MRI lesion (the biopsy target) through the registration: its centroid as frame pixel
    # (i, j), None when not in view; and its margin, a calibrated 90 % bound of the error, mm.
    target_ij: tuple[float, float] | None = None
    target_margin_mm: float = math.nan
    # mm between this frame's registration and the temporally filtered one (stream/capture.py);
    # NaN without the filter or with no history (first frame, after a reset)
    jump_mm: float = float("nan")
    # Do no harm (regseg.stream.do_no_harm): "registered" when the registration is published,
    # "tracked" when the tracked plane is (the identity correction: the registration was not
    # estimated better than tracking alone); QualityNet's estimates of both alignments, mm (NaN
    # when the gate is off or the frame has no pose).
    correction: str = "registered"
    error_tracked_mm: float = float("nan")
    error_registered_mm: float = float("nan")
    # Image-based refinement (regseg.stream.lc2_stage, --lc2 on): how far it moved the
    # network's plane at the gland, mm; NaN when it is off or applied nothing.
    lc2_move_mm: float = float("nan")
    # its LC2 over the chance level (the MRI displaced 12 mm); a move is applied only at >= 1.5
    # (regseg.lc2.Lc2Config.min_significance); NaN when it is off or not computed
    lc2_significance: float = float("nan")
    # The 3-D consensus of the recent frames' corrections (regseg.stream.consensus, --consensus):
    # how far it puts this frame's published plane along its normal, mm; NaN while it does not
    # hold (too few distinct planes, or corrections that are not one 3-D shift) or it is off.
    out_of_plane_mm: float = float("nan")
    # and the registration it suggests, T(t) @ reference_to_mri (4, 4, Reference mm -> MRI mm),
    # for the operator to accept or not; None while it does not hold. Never applied by regseg.
    suggested_reference_to_mri: np.ndarray | None = None
    # the sweep behind that consensus: distinct planes since the registration (-1: --consensus
    # off), and whether the sweep is still to be made (< 6 planes, or corrections no model fits:
    # nothing has checked the frame's error along its normal); None when off
    sweep_planes: int = -1
    sweep_pending: bool | None = None
    # --estimate-check (regseg.stream.estimate_check): "pending k/N" until the error estimate has
    # been checked on the stream's first frames, then "passed" or "failed"; None when off
    estimate_check: str | None = None
    # What ``labels`` are (regseg.stream.seg_prior): "network" (the segmentation's own),
    # "network+mri" (pooled with the MRI labels through the registration as a prior,
    # --seg-prior) or "withheld" (none published: no image, no gland or no pose).
    labels_source: str = "network"
