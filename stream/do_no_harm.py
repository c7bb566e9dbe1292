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

Margin (1.0 mm), window (3 frames) and the deformable stage on a tracked plane were chosen on
family-A calibration phantoms 3100-3107 only (``bench/do_no_harm.py``, README "Do no harm"; with
the AlignSegNet retrained in session 7: every margin 0.25-2 mm tied, window 3 and 5 tied):
there the gate publishes tracking at 0 mm tracking error (TRE 0.67 -> 0.35 mm) and the
registration at every level from 3 mm (capture unchanged). Measured with that choice on family B
(cases 5000-5011, never chosen on): at 0 mm it keeps good tracking (TRE 2.44 / 4.75 / 3.23 ->
0.32 / 0.31 / 0.44 mm), but from 6 mm on QualityNet, which does not transfer to family B, often
rates a 10-16 mm tracked plane better than a 2-6 mm registration (10 mm: 3.65 / 5.82 / 1.96 ->
4.10 / 8.91 / 4.47 mm; the frames are mostly flagged). So it is NOT on by default
(``DO_NO_HARM_DEFAULT``): ``regseg-stream --do-no-harm on``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regseg import planes
from regseg.errors import InputError
from regseg.types import LESION, PROSTATE

CORRECTIONS = ("registered", "tracked")
#: ``regseg-stream --do-no-harm`` default and its settings (bench/do_no_harm.py on family-A
#: calibration phantoms 3100-3107; see the module docstring: off by default because on family B
#: it gave up capture at 6-15 mm tracking errors). Two variants, both equal to it on family A
#: and both failing on family B the criteria written before measuring them (README "Do no
#: harm"): ``TRACKED_MUST_PASS`` (tracking only where its own estimate passes the flag) and
#: ``MAX_CORRECTION_MM`` 3 mm (only small corrections withheld) each undid most of the 0 mm gain.
DO_NO_HARM_DEFAULT = "off"
MARGIN_MM = 1.0
WINDOW = 3
MODES = ("off", "on", "on-skip-deformable")
TRACKED_MUST_PASS = False
#: Only a registration that moves the frame by at most this much (mm, :func:`correction_mm`) may
#: be withheld: publishing a correction of d mm makes the alignment worse than tracking by at
#: most d mm, and a larger one that QualityNet cannot verify keeps the registration's capture.
#: inf: no bound.
MAX_CORRECTION_MM = math.inf


@dataclass(frozen=True)
class Decision:
    """What :class:`CorrectionGate` chose for a frame (NaN estimates: not assessed)."""

    correction: str  # "registered" or "tracked"
    error_tracked_mm: float  # QualityNet's estimate of the tracked alignment's error
    error_registered_mm: float  # ... of the registered (affine) alignment's error
    gain_mm: float  # the (windowed median) estimate difference tracked - registered
    correction_mm: float = math.nan  # how far the registration moves the frame (correction_mm)


def correction_mm(tracked: np.ndarray, registered: np.ndarray, hw: tuple[int, int]) -> float:
    """Mean 3-D distance (mm) between where two (4, 4) image_to_mri planes put a 5 x 5 grid of
    points spanning the frame: how far the registration moves the tracked plane."""
    jj, ii = np.meshgrid(np.linspace(0, hw[0] - 1, 5), np.linspace(0, hw[1] - 1, 5),
                         indexing="ij")
    p = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)])
    return float(np.linalg.norm(((tracked - registered) @ p)[:3], axis=0).mean())


def plane_pairs(estimator, pixels: np.ndarray, image_to_mri: list[np.ndarray]) -> torch.Tensor:
    """QualityNet input (B, 4, s, s) for one frame aligned by each of B ``image_to_mri``
    ((4, 4) frame pixel (i, j, 0) -> MRI mm): the frame area-resampled, the MRI (bilinear) and
    its gland and lesion maps (nearest) sampled on the net's grid covering the frame."""
    ctx = estimator.context
    s = estimator.size
    hw = (int(pixels.shape[0]), int(pixels.shape[1]))
    trus = estimator.trus(pixels)
    to_model = planes.model_to_frame(hw, s)
    dev = ctx.mri.device
    m = torch.as_tensor(np.stack([(ctx.world_to_normalised @ p @ to_model)[:3, [0, 1, 3]]
                                  for p in image_to_mri]), dtype=torch.float32, device=dev)
    i, j = estimator._axes  # (1, s, 1), (s, 1, 1)
    cols = m.transpose(1, 2)[:, :, None, None, :]  # (B, 3, 1, 1, 3): column c of each matrix
    grid = (i * cols[:, 0] + (j * cols[:, 1] + cols[:, 2]))[None]  # (1, B, s, s, 3)
    # one grid_sample per volume: the B planes are the depth axis of a single 3-D grid
    mri = F.grid_sample(ctx.mri, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0, 0]  # (B, s, s)
    lab = F.grid_sample(ctx.labels_float, grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[0, 0].round()
    x = torch.empty((len(image_to_mri), 4, *s), dtype=torch.float32)
    x[:, 0] = torch.from_numpy(trus)
    x[:, 1] = mri.float().cpu()
    x[:, 2] = ((lab == PROSTATE) | (lab == LESION)).float().cpu()
    x[:, 3] = (lab == LESION).float().cpu()
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
        max_correction_mm: withhold only registrations that move the frame by at most this
            (:data:`MAX_CORRECTION_MM`).
        tracked_must_pass: publish the tracked plane only when its own estimate is at most the
            ``tracked_max_mm`` the caller gives (the flag threshold it would be judged by): a
            tracked plane that would be flagged anyway protects nothing (a flagged frame sends
            no alignment as truth), so the registration's capture is kept there.
    """

    def __init__(self, margin_mm: float = MARGIN_MM, window: int = WINDOW, *,
                 deformable_on_tracked: bool = True,
                 tracked_must_pass: bool = TRACKED_MUST_PASS,
                 max_correction_mm: float = MAX_CORRECTION_MM) -> None:
        if not math.isfinite(margin_mm):
            raise InputError(f"do-no-harm margin {margin_mm!r} mm: a finite number expected")
        if int(window) != window or window < 1:
            raise InputError(f"do-no-harm window {window!r}: a whole number >= 1 expected")
        self.margin_mm = float(margin_mm)
        self.window = int(window)
        self.deformable_on_tracked = bool(deformable_on_tracked)
        self.tracked_must_pass = bool(tracked_must_pass)
        if not max_correction_mm > 0:
            raise InputError(f"do-no-harm max correction {max_correction_mm!r} mm: > 0 expected")
        self.max_correction_mm = float(max_correction_mm)
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
            est = estimator.estimate_mm(plane_pairs(estimator, pixels, [tracked, registered]))
        return float(est[0]), float(est[1])

    def __call__(self, estimator, pixels: np.ndarray, tracked: np.ndarray,
                 registered: np.ndarray, *, continues: bool = True,
                 tracked_max_mm: float = math.inf) -> Decision:
        """The Decision for one frame. ``estimator``: the Pipeline's ErrorEstimator;
        ``tracked`` / ``registered``: (4, 4) image_to_mri of the two alignments; ``continues``:
        False drops the history first (the temporal filter had none for this frame);
        ``tracked_max_mm``: with ``tracked_must_pass``, the largest tracked estimate for which
        tracked may be published."""
        if not continues:
            self.reset()
        est_t, est_r = self.estimates(estimator, pixels, tracked, registered)
        self._gains.append(est_t - est_r)
        gain = float(np.median(np.asarray(self._gains)))
        passes = est_t <= tracked_max_mm or not self.tracked_must_pass
        moved = correction_mm(tracked, registered, pixels.shape[:2])
        small = moved <= self.max_correction_mm
        correction = "tracked" if gain <= self.margin_mm and passes and small else "registered"
        self.counts[correction] += 1
        return Decision(correction, est_t, est_r, gain, moved)

    def info(self) -> dict:
        """Settings and how often each alignment was published (for the stats JSON)."""
        return {"margin_mm": self.margin_mm, "window": self.window,
                "deformable_on_tracked": self.deformable_on_tracked,
                "tracked_must_pass": self.tracked_must_pass,
                "max_correction_mm": (self.max_correction_mm
                                      if math.isfinite(self.max_correction_mm) else None),
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
