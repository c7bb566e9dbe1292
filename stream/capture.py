"""Capture range of the live registration: iterative refinement, multi-start, temporal coherence.

AlignSegNet predicts a residual 2x3 affine ``theta`` (normalised grid_sample coordinates) from the
MRI resliced at a plane to the TRUS frame. It was trained on bounded tracking errors, so from a
large error one call corrects only part of it. Three things widen what it captures:

- :class:`Refinement` (inside :class:`~regseg.stream.pipeline.FrameChain`, device-side, no host
  sync): re-slice the MRI at the current estimate and register again, K calls per frame. Thetas
  compose as 3x3 matrices right-multiplied: output pixel p of call 2 shows call 1's plane at
  ``T2 p``, which shows the tracked plane at ``T1 T2 p``; so the correction is ``T1 @ T2 @ ...``.
- :class:`MultiStart`: B start hypotheses (in-plane shifts and rotations of the tracked plane,
  the first the identity) registered in ONE batched engine call; kept is the one whose registered
  MRI gland best matches the gland the network segments on the frame.
- :class:`TemporalFilter` (:mod:`regseg.stream.temporal`; host side, in the Pipeline): the
  patient does not jump between frames, so the correction relative to the tracked pose is
  filtered over time (a running median), each frame reports ``jump_mm``, how far its own
  correction lies from the filtered one, and optionally (``warm_start``) the filtered
  correction starts the next frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from regseg import planes, spatial
from regseg.errors import InputError
from regseg.kernels.plane_labels import available as plane_labels_on
from regseg.kernels.plane_labels import labels_on_plane
from regseg.stream.temporal import TemporalFilter  # noqa: F401  (re-exported)

#: Default K (README "Capture range", bench/capture.py): on held-out family-A phantoms K = 2
#: brings a 10 mm / 10 deg start to 1.0 mm median TRE (K = 1: 2.4 mm) for ~2.2 ms more per frame
#: on the 2-core CPU; K = 3 reaches 15 mm (1.0 mm) for ~4.4 ms, which puts the default chain at
#: its 25 ms budget.
REFINE_ITERATIONS = 2


def _homogeneous(theta: Tensor) -> Tensor:
    """(..., 2, 3) theta -> (..., 3, 3) with a bottom row [0, 0, 1] (float32, a new tensor)."""
    theta = theta.float()
    bottom = torch.zeros((*theta.shape[:-2], 1, 3), dtype=theta.dtype, device=theta.device)
    bottom[..., 0, 2] = 1.0
    return torch.cat([theta, bottom], dim=-2)


def compose_thetas(*thetas: np.ndarray) -> np.ndarray:
    """The (2, 3) theta of registering with ``thetas[0]``, then at that plane ``thetas[1]``, ...

    Host-side twin of what :class:`Refinement` does on the device (``T1 @ T2 @ ...``).
    """
    out = np.eye(3)
    for t in thetas:
        m = np.eye(3)
        m[:2] = np.asarray(t, np.float64).reshape(2, 3)
        out = out @ m
    return out[:2]


def start_thetas(shift: float = 0.25, rotation_deg: float = 8.0) -> np.ndarray:
    """Default multi-start hypotheses, (B, 2, 3): identity, 4 shifts and 2 rotations.

    ``shift`` is in normalised units (1.0 = half the field of view; 0.25 on the default 51 mm
    frame is 6.4 mm); rotations turn about the frame centre, as a tracking error does.
    """
    out = [np.eye(3)[:2]]
    for dx, dy in ((shift, 0.0), (-shift, 0.0), (0.0, shift), (0.0, -shift)):
        out.append(np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]]))
    for deg in (rotation_deg, -rotation_deg):
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        out.append(np.array([[c, -s, 0.0], [s, c, 0.0]]))
    return np.stack(out)


class MultiStart:
    """Start hypotheses registered in one batched engine call; the best-scoring one is kept.

    Args:
        engine: a FusionEngine built for batch B (``FusionEngine(..., batch=B)``).
        starts: (B, 2, 3) normalised start thetas applied to the tracked plane; the first must be
            the identity (the plain start; ties go to it).

    Score of hypothesis h: soft Dice between the gland the network segments on the frame
    (probability of not-background, averaged over all hypotheses so that no single MRI context
    decides it) and the MRI gland resliced through that hypothesis's registered plane.
    """

    def __init__(self, engine: Any, starts: np.ndarray | None = None) -> None:
        starts = start_thetas() if starts is None else np.asarray(starts, np.float64)
        if starts.ndim != 3 or starts.shape[1:] != (2, 3):
            raise InputError(f"multi-start: starts shape {starts.shape}, expected (B, 2, 3)")
        if not np.allclose(starts[0], np.eye(3)[:2]):
            raise InputError("multi-start: the first start must be the identity (the plain start)")
        batch = int(getattr(engine, "batch", starts.shape[0]))
        if batch != starts.shape[0]:
            raise InputError(f"multi-start: engine batch {batch} != {starts.shape[0]} starts")
        self.engine = engine
        self.starts_np = starts
        self._starts: dict[str, Tensor] = {}

    @property
    def size(self) -> int:
        return int(self.starts_np.shape[0])

    def starts(self, device: torch.device) -> Tensor:
        """(B, 3, 3) start matrices on ``device`` (made once per device)."""
        key = str(device)
        if key not in self._starts:
            s = torch.as_tensor(self.starts_np, dtype=torch.float32, device=device)
            self._starts[key] = _homogeneous(s)
        return self._starts[key]

    def pick(self, refine: Refinement, trus: Tensor, mri: Tensor, mri_labels: Tensor,
             mats: Tensor) -> tuple[Tensor, Tensor]:
        """(3, 3) composed correction of the best hypothesis and its logits (1, 3, h, w)."""
        starts = self.starts(trus.device)
        b = starts.shape[0]
        mri_b, lab_b = refine.sample_planes(refine.planes(mats, starts[1:]))
        out = self.engine(trus.expand(b, -1, -1, -1).contiguous(),
                          torch.cat([mri, mri_b]), torch.cat([mri_labels, lab_b]))
        totals = starts @ _homogeneous(out["theta"].reshape(b, 2, 3))
        logits = out["logits"]
        _, lab = refine.sample_planes(refine.planes(mats, totals), image=False)
        gland = lab[:, 0]  # (B, h, w) MRI gland through each registered plane
        prob = (1.0 - torch.softmax(logits.float(), dim=1)[:, 0]).mean(0, keepdim=True)
        score = 2 * (prob * gland).sum((1, 2)) / (prob.sum((1, 2)) + gland.sum((1, 2)) + 1.0)
        best = torch.argmax(score).reshape(1)  # first maximum: ties go to the identity
        return totals.index_select(0, best)[0], logits.index_select(0, best)


class Refinement:
    """K registrations per frame, each on the MRI resliced at the estimate so far; device-side.

    ``refine(trus, mri, mri_labels, mats)`` returns theta (1, 2, 3), the composed correction of
    the plane that ``mats`` describes, and the logits of the last call (``need_logits`` False,
    ``--resegment``: every call may use the theta engine, the logits may be None). With a
    :class:`MultiStart` the first call is the batched one over its hypotheses.
    """

    def __init__(self, chain: Any, iterations: int = 1,
                 multi_start: MultiStart | None = None, theta_engine: Any = None) -> None:
        if int(iterations) != iterations or iterations < 1:
            raise InputError(f"refine_iterations {iterations!r}: a whole number >= 1 expected")
        self.chain = chain
        self.iterations = int(iterations)
        self.multi_start = multi_start
        # Calls before the last need only theta: an engine built with outputs=("theta",) skips
        # the segmentation U-Net (theta does not depend on it), several times cheaper.
        self.theta_engine = theta_engine
        size = chain.size
        n = spatial.index_to_normalised((size[1], size[0]))
        device = chain.device
        self.norm = torch.as_tensor(n, dtype=torch.float32, device=device)
        self.norm_inv = torch.as_tensor(np.linalg.inv(n), dtype=torch.float32, device=device)

    def planes(self, mats: Tensor, totals: Tensor) -> Tensor:
        """Model pixel -> volume matrices, (..., 3, 3), of the tracked plane moved by ``totals``
        ((..., 3, 3) normalised corrections)."""
        return mats[1] @ (self.norm_inv @ totals @ self.norm)

    def sample_planes(self, m: Tensor, image: bool = True) -> tuple[Tensor | None, Tensor]:
        """MRI (B, 1, h, w) (None unless ``image``) and one-hot labels (B, 2, h, w) on B planes.

        One grid_sample per volume: the B planes are the depth axis of a single 3-D grid.
        """
        chain, ctx = self.chain, self.chain.context
        i, j = chain.model_axes  # (1, w, 1), (h, 1, 1)
        m = m.reshape(-1, 3, 3)
        cols = m.transpose(1, 2)[:, :, None, None, :]  # (B, 3, 1, 1, 3): column c of each m
        grid = i * cols[:, 0] + (j * cols[:, 1] + cols[:, 2])  # (B, h, w, 3)

        def sample(volume: Tensor, mode: str) -> Tensor:
            out = F.grid_sample(volume, grid[None], mode=mode, padding_mode="zeros",
                                align_corners=False)  # (1, C, B, h, w)
            return out[0].transpose(0, 1)

        mri = sample(ctx.mri, "bilinear") if image else None
        return mri, planes.labels_onehot(sample(ctx.labels_float, "nearest"))

    def __call__(self, trus: Tensor, mri: Tensor, mri_labels: Tensor,
                 mats: Tensor, need_logits: bool = True) -> tuple[Tensor, Tensor | None]:
        fast = self.theta_engine if self.theta_engine is not None else self.chain.engine
        full = self.chain.engine if need_logits else fast
        if self.multi_start is not None:
            total, logits = self.multi_start.pick(self, trus, mri, mri_labels, mats)
        elif self.iterations == 1:
            out = full(trus, mri, mri_labels)
            return out["theta"], out.get("logits")
        else:
            total = _homogeneous(fast(trus, mri, mri_labels)["theta"].reshape(2, 3))
        calls = self.iterations - 1
        for n in range(calls):
            engine = full if n == calls - 1 else fast
            mri_k, lab_k = self.sample_planes(self.planes(mats, total))
            out = engine(trus, mri_k, lab_k)
            total = total @ _homogeneous(out["theta"].reshape(2, 3))
        return total[:2][None], out.get("logits") if calls else logits


@dataclass
class Capture:
    """What the Pipeline needs for capture: chain options and the (optional) temporal filter."""

    refine_iterations: int = 1
    multi_start: MultiStart | None = None
    temporal: TemporalFilter | None = None
    theta_engine: Any = None  # FusionEngine(outputs=("theta",)) for the calls before the last
    # Start each frame from the filtered correction: widens the capture of a network right on
    # average, compounds the bias of one that is not (README "Capture range"); opt-in (warm).
    warm_start: bool = False
    # ``--jump-at gland``: a GlandPoints, where each frame's jump is measured (None: the frame)
    jump_points: Any = None

    def chain_options(self) -> dict[str, Any]:
        return {"refine_iterations": self.refine_iterations, "multi_start": self.multi_start,
                "theta_engine": self.theta_engine}

    def start(self, frame: Any, tracked: np.ndarray) -> np.ndarray:
        """(3, 3) frame-pixel start correction: the filtered one with ``warm_start``, else I."""
        prior = self.predicted(frame, tracked)
        return prior if prior is not None and self.warm_start else np.eye(3)

    def predicted(self, frame: Any, tracked: np.ndarray) -> np.ndarray | None:
        """(3, 3) the filtered correction of the frames before ``frame`` (the reset rule applied
        here); None without a filter or a history."""
        if self.temporal is None:
            return None
        pose = frame.image_to_reference
        prior = self.temporal.prior(None if pose is None else tracked, frame.pixels.shape,
                                    _time_s(frame))
        return prior if self.temporal.has_history else None

    def finish(self, frame: Any, tracked: np.ndarray, registered: np.ndarray
               ) -> tuple[np.ndarray, float]:
        """(registered image_to_mri to publish (4, 4), jump_mm) from this frame's own result."""
        if self.temporal is None:
            return registered, math.nan
        correction = spatial.invert(tracked) @ registered
        c3 = np.eye(3)
        c3[:2, :2], c3[:2, 2] = correction[:2, :2], correction[:2, 3]
        pose = None if frame.image_to_reference is None else tracked
        points = (None if self.jump_points is None or pose is None else
                  self.jump_points(registered, frame.pixels.shape, frame.spacing_mm))
        filtered, jump = self.temporal.update(pose, c3, frame.pixels.shape, frame.spacing_mm,
                                              _time_s(frame), points_ij=points)
        return tracked @ spatial.lift_2d(filtered), jump


def _time_s(frame: Any) -> float:
    """The frame's receipt time in seconds (our clock; a sender's timestamp may be absent)."""
    return frame.acquired_ns / 1e9


def warp_labels(context: Any, image_to_mri: np.ndarray, hw: tuple[int, int],
                ddf: torch.Tensor | None = None) -> np.ndarray:
    """(H, W) uint8 MRI labels on the frame through ``image_to_mri`` (nearest), at each pixel
    moved by ``ddf`` (None, or (1, 2, H, W) frame-pixel (dy, dx) on the context's device): on
    the CPU :func:`regseg.kernels.plane_labels.labels_on_plane` (the same labels, 2-4x faster
    at frame size), else :func:`warp_labels_torch`."""
    m = (context.world_to_normalised @ image_to_mri)[:3, [0, 1, 3]].astype(np.float32)
    if context.labels.device.type == "cpu" and plane_labels_on():
        field = None if ddf is None else ddf[0].detach().numpy()
        return labels_on_plane(context.labels[0, 0].numpy(), m, hw, field)
    return warp_labels_torch(context, m, hw, ddf)


def warp_labels_torch(context: Any, m: np.ndarray, hw: tuple[int, int],
                      ddf: torch.Tensor | None = None) -> np.ndarray:
    """:func:`warp_labels` in torch (any device; the compiled kernel's twin): one nearest
    ``grid_sample`` on the plane's points, ``m`` (3, 3) float32 the plane-pixel -> normalised
    map's columns 0, 1 and 3."""
    with torch.inference_mode():
        m = torch.as_tensor(m, device=context.mri.device)
        i, j = spatial.pixel_axes(*hw, device=context.mri.device)
        if ddf is not None:  # the plane's grid with the pixel axes shifted by the field
            i, j = i + ddf[0, 1, :, :, None], j + ddf[0, 0, :, :, None]
        grid = spatial.axes_grid(m, i, j)
        out = F.grid_sample(context.labels_float, grid[None, None], mode="nearest",
                            padding_mode="zeros", align_corners=False)[0, 0, 0]
        return out.to(torch.uint8).cpu().numpy()


#: Defaults of ``regseg-stream --multi-start`` and ``--temporal-filter`` (README "Capture range",
#: bench/capture.py). Multi-start: off, K = 3 captures as far for a fifth of its cost. Temporal
#: filter: on, for ``jump_mm`` (TRE within +-0.1 mm of unfiltered, ~0.1 ms); its warm start is
#: not the default: it compounds a biased network's error frame after frame (family B with
#: the family-A-only weights: 13 -> 20 mm at a 10 mm start).
MULTI_START_DEFAULT = "off"
TEMPORAL_FILTER_DEFAULT = "on"


def build_capture(refine_iterations: int = REFINE_ITERATIONS, multi_start: bool = False,
                  temporal_filter: bool | str = False, **engine_options: Any) -> Capture:
    """The Capture of ``regseg-stream``'s flags; ``engine_options`` build the extra engines
    (``FusionEngine`` arguments: weights, backend, device, precision, threads).

    ``temporal_filter``: False/"off", True/"on" (filter and jump score), or "warm" (also start
    each frame from the filtered correction).

    Raises:
        InputError: ``refine_iterations`` < 1.
    """
    if int(refine_iterations) != refine_iterations or refine_iterations < 1:
        raise InputError(f"--refine-iterations {refine_iterations!r}: expected a whole number "
                         ">= 1 (1 = one registration per frame)")
    from regseg.engines.fusion import FusionEngine

    ms = None
    if multi_start:
        starts = start_thetas()
        ms = MultiStart(FusionEngine(batch=len(starts), **engine_options), starts)
    theta_engine = None
    if refine_iterations > 1:
        theta_engine = FusionEngine(outputs=("theta",), **engine_options)
    if temporal_filter not in (False, True, "off", "on", "warm"):
        raise InputError(f"--temporal-filter {temporal_filter!r}: expected on, off or warm")
    temporal = temporal_filter not in (False, "off")
    return Capture(int(refine_iterations), ms, TemporalFilter() if temporal else None,
                   theta_engine, warm_start=temporal_filter == "warm")
