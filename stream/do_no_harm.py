"""Do no harm: publish the registration only where it is estimated to beat tracking alone.

A fusion system must never make the alignment worse than the tracker's and present it as a
correction. On a simulator the registration was not trained on (family B) it does: from a 0 mm
tracking error the registered TRE is ~2.6 mm (README "Trust"). So, per frame, QualityNet
(:class:`regseg.stream.quality.ErrorEstimator`'s network) estimates the error of two
alignments of the frame, in ONE batched pass:

- ``tracked``: the MRI resliced at the tracked plane (``reference_to_mri @ image_to_reference``,
  the plane the chain's first registration starts from), its labels on that plane;
- ``registered``: the MRI resliced at the registered (affine, temporally filtered) plane, its
  labels on that plane.

Both pairs are built the same way (MRI bilinear and labels nearest, sampled on the net's 64 x 64
grid covering the frame), so neither is favoured by the deformable stage's tighter labels. The
registration is published (``correction = "registered"``) when the tracked estimate exceeds the
registered one by more than ``margin_mm``; otherwise the tracked plane is (``"tracked"``: the
identity correction), refined by the deformable stage as the registered plane would have been
(``deformable_on_tracked``; False skips the stage on such frames, which saves its time but
lowered the published labels' Dice on family A, 0.981 -> 0.962 at 0 mm tracking error). With
``window`` > 1 the decision is taken on the median of the last ``window`` frames' differences (a
single noisy estimate does not flip the published plane); the history is dropped whenever the
temporal filter's is (its ``jump_mm`` is NaN: first frame, a reset, no pose, or no filter).

The temporal filter itself is fed the registration's own correction whatever is published, so
the gate changes neither the filter's state nor ``jump_mm``; the flags then judge what is
published (its own error estimate against the chain's threshold; ``jump`` kept: a registration
that jumps is evidence that something is off even when tracking is published).

Margin, window and the default were chosen on family-A calibration phantoms 3100-3107 only
(``bench/do_no_harm.py``; README "Do no harm").
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from regseg import planes, spatial
from regseg.errors import InputError
from regseg.types import LESION, PROSTATE

CORRECTIONS = ("registered", "tracked")
#: ``regseg-stream --do-no-harm`` default and its settings (bench/do_no_harm.py on family-A
#: calibration phantoms 3100-3107; see the module docstring).
DO_NO_HARM_DEFAULT = "off"
MARGIN_MM = 1.0
WINDOW = 5
MODES = ("off", "on", "on-skip-deformable")


@dataclass(frozen=True)
class Decision:
    """What :class:`CorrectionGate` chose for a frame (NaN estimates: not assessed)."""

    correction: str  # "registered" or "tracked"
    error_tracked_mm: float  # QualityNet's estimate of the tracked alignment's error
    error_registered_mm: float  # ... of the registered (affine) alignment's error
    gain_mm: float  # the (windowed median) estimate difference tracked - registered


def plane_pairs(estimator, pixels: np.ndarray, image_to_mri: list[np.ndarray]) -> torch.Tensor:
    """QualityNet input (B, 4, s, s) for one frame aligned by each of B ``image_to_mri``
    ((4, 4) frame pixel (i, j, 0) -> MRI mm): the frame area-resampled, the MRI (bilinear) and
    its gland and lesion maps (nearest) sampled on the net's grid covering the frame."""
    ctx = estimator.context
    s = estimator.size
    hw = (int(pixels.shape[0]), int(pixels.shape[1]))
    trus = cv2.resize(np.ascontiguousarray(pixels, np.uint8), s[::-1],
                      interpolation=cv2.INTER_AREA).astype(np.float32) * (1.0 / 255.0)
    to_model = planes.model_to_frame(hw, s)
    x = torch.empty((len(image_to_mri), 4, *s), dtype=torch.float32)
    x[:, 0] = torch.from_numpy(trus)
    for b, plane in enumerate(image_to_mri):
        m = torch.as_tensor((ctx.world_to_normalised @ plane @ to_model)[:3, [0, 1, 3]],
                            dtype=torch.float32, device=ctx.mri.device)
        grid = spatial.axes_grid(m, *estimator._axes)[None, None]
        mri = F.grid_sample(ctx.mri, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)[0, 0, 0]
        lab = F.grid_sample(ctx.labels_float, grid, mode="nearest", padding_mode="zeros",
                            align_corners=False)[0, 0, 0].round()
        x[b, 1] = mri.float().cpu()
        x[b, 2] = ((lab == PROSTATE) | (lab == LESION)).float().cpu()
        x[b, 3] = (lab == LESION).float().cpu()
    return x


class CorrectionGate:
    """Chooses per frame between the tracked and the registered alignment (module docstring).

    It holds only the decision's history; the network is the Pipeline's own QualityNet
    (:class:`regseg.stream.quality.ErrorEstimator`, passed per call: loaded once, and the one a
    bench may swap in with ``--quality-weights``).

    Args:
        margin_mm: the registration must be estimated better by more than this (mm).
        window: frames whose estimate differences are medianed (1: each frame alone).
        deformable_on_tracked: run the deformable stage on the tracked plane when tracked is
            chosen (False: skip it, publish the plane's labels).
    """

    def __init__(self, margin_mm: float = MARGIN_MM, window: int = WINDOW, *,
                 deformable_on_tracked: bool = True) -> None:
        if not math.isfinite(margin_mm):
            raise InputError(f"do-no-harm margin {margin_mm!r} mm: a finite number expected")
        if int(window) != window or window < 1:
            raise InputError(f"do-no-harm window {window!r}: a whole number >= 1 expected")
        self.margin_mm = float(margin_mm)
        self.window = int(window)
        self.deformable_on_tracked = bool(deformable_on_tracked)
        self._gains: deque[float] = deque(maxlen=self.window)
        self.counts = {c: 0 for c in CORRECTIONS}

    def reset(self) -> None:
        self._gains.clear()

    @staticmethod
    def estimates(estimator, pixels: np.ndarray, tracked: np.ndarray,
                  registered: np.ndarray) -> tuple[float, float]:
        """(tracked, registered) estimated errors in mm, one batched pass of ``estimator``'s
        QualityNet."""
        with torch.inference_mode():
            x = plane_pairs(estimator, pixels, [tracked, registered])
            est = torch.expm1(estimator.model(x)).clamp_min(0.0)
        return float(est[0]), float(est[1])

    def __call__(self, estimator, pixels: np.ndarray, tracked: np.ndarray,
                 registered: np.ndarray, *, continues: bool = True) -> Decision:
        """The Decision for one frame. ``estimator``: the Pipeline's ErrorEstimator;
        ``tracked`` / ``registered``: (4, 4) image_to_mri of the two alignments; ``continues``:
        False drops the history first (the temporal filter had none for this frame)."""
        if not continues:
            self.reset()
        est_t, est_r = self.estimates(estimator, pixels, tracked, registered)
        self._gains.append(est_t - est_r)
        gain = float(np.median(np.asarray(self._gains)))
        correction = "registered" if gain > self.margin_mm else "tracked"
        self.counts[correction] += 1
        return Decision(correction, est_t, est_r, gain)

    def info(self) -> dict:
        """Settings and how often each alignment was published (for the stats JSON)."""
        return {"margin_mm": self.margin_mm, "window": self.window,
                "deformable_on_tracked": self.deformable_on_tracked,
                "published": dict(self.counts)}


def build_gate(mode: str = DO_NO_HARM_DEFAULT, margin_mm: float = MARGIN_MM,
               window: int = WINDOW) -> CorrectionGate | None:
    """``regseg-stream --do-no-harm MODE``: None for ``off``; else a gate (``on``: the
    deformable stage refines whichever plane is published; ``on-skip-deformable``: not the
    tracked plane). One per Pipeline: it keeps per-stream history."""
    if mode not in MODES:
        raise InputError(f"--do-no-harm {mode!r}: expected {', '.join(MODES)}")
    if mode == "off":
        return None
    return CorrectionGate(margin_mm, window, deformable_on_tracked=mode == "on")
