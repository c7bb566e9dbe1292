"""The temporal filter of the live registration (regseg.stream.capture's third part).

The patient does not jump between frames: the correction of the tracked pose that the registration
finds is filtered over time (a running median of the last frames), each frame reports ``jump_mm``,
how far its own correction lies from the filtered one (the ``jump`` flag of
regseg.stream.quality), and optionally (``Capture.warm_start``) the filtered correction starts the
next frame.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regseg import spatial
from regseg.errors import InputError


@dataclass
class _State:
    recent: deque  # the last ``window`` frames' own corrections, (3, 3) each
    filtered: np.ndarray  # (3, 3): their element-wise median
    tracked: np.ndarray  # (4, 4) the last frame's tracked plane
    t_s: float
    hw: tuple[int, int]


class TemporalFilter:
    """Filters the in-plane correction over frames; scores each frame's jump from it in mm.

    The correction ``C`` is the (3, 3) frame-pixel affine with ``registered = tracked @
    lift_2d(C)``. The filtered correction is the element-wise median of the last ``window``
    frames' own corrections: a robust filter (up to ``(window - 1) // 2`` wrong frames in the
    window change it little), that follows a real change within ``window // 2 + 1`` frames and
    needs no tuning of rates. Per frame, ``jump_mm`` is the mean distance (mm) between the
    frame's own ``C`` and the filtered one before it, over the points :meth:`update` is given
    (``Capture`` gives the MRI gland's, :class:`GlandPoints`, with ``--jump-at gland``) or a
    5 x 5 grid of points spanning the frame.

    Reset rule (state dropped; the next frame's own correction is taken as is, ``jump_mm`` NaN):
    the frame has no pose; or the tracked plane itself moved more than ``reset_mm`` (mean over the
    same points, in 3-D) since the last frame, or more than ``reset_s`` seconds passed (the probe
    was moved fast or tracking was lost, so the old correction no longer describes this view); or
    the frame size changed. Smooth probe motion (a sweep: ~0.5 mm per frame at 30 fps) keeps it.
    """

    def __init__(self, window: int = 5, reset_mm: float = 5.0, reset_s: float = 1.0) -> None:
        if window < 1:
            raise InputError(f"temporal filter window {window}: expected >= 1 frames")
        if reset_mm <= 0 or reset_s <= 0:
            raise InputError(f"temporal filter reset_mm {reset_mm}, reset_s {reset_s}: both "
                             "must be > 0")
        self.window = int(window)
        self.reset_mm, self.reset_s = reset_mm, reset_s
        self._state: _State | None = None
        self.resets = 0

    def reset(self) -> None:
        self._state = None

    @property
    def has_history(self) -> bool:  # earlier frames left a filtered correction
        return self._state is not None

    @staticmethod
    def _points(hw: tuple[int, int]) -> np.ndarray:
        """(25, 3) homogeneous frame pixels (i, j, 1) on a 5 x 5 grid spanning the frame."""
        jj, ii = np.meshgrid(np.linspace(0, hw[0] - 1, 5), np.linspace(0, hw[1] - 1, 5),
                             indexing="ij")
        return np.stack([ii.ravel(), jj.ravel(), np.ones(ii.size)], 1)

    def _moved_mm(self, a: np.ndarray, b: np.ndarray, hw: tuple[int, int]) -> float:
        """Mean distance (mm) between the frame points mapped through two (4, 4) planes."""
        p = self._points(hw)
        p4 = np.stack([p[:, 0], p[:, 1], np.zeros(len(p))], 1)
        return float(np.linalg.norm(spatial.apply(a, p4) - spatial.apply(b, p4), axis=1).mean())

    def _jump_mm(self, c: np.ndarray, f: np.ndarray, hw: tuple[int, int],
                 spacing_mm: tuple[float, float], points_ij: np.ndarray | None = None) -> float:
        p = (self._points(hw) if points_ij is None else
             np.concatenate([np.asarray(points_ij, np.float64).reshape(-1, 2),
                             np.ones((len(points_ij), 1))], 1))
        d = (p @ (c - f).T)[:, :2] * np.array([spacing_mm[1], spacing_mm[0]])
        return float(np.linalg.norm(d, axis=1).mean())

    def prior(self, tracked: np.ndarray | None, hw: tuple[int, int], t_s: float) -> np.ndarray:
        """(3, 3) correction to start this frame from: the filtered one, or the identity (no
        state, or the reset rule applies; the state is then dropped)."""
        s = self._state
        if s is None:
            return np.eye(3)
        if (tracked is None or s.hw != tuple(hw) or abs(t_s - s.t_s) > self.reset_s
                or self._moved_mm(tracked, s.tracked, hw) > self.reset_mm):
            self._state = None
            self.resets += 1
            return np.eye(3)
        return s.filtered.copy()

    def update(self, tracked: np.ndarray | None, correction: np.ndarray, hw: tuple[int, int],
               spacing_mm: tuple[float, float], t_s: float, *,
               points_ij: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Add this frame's correction; returns (filtered correction (3, 3), jump_mm).

        ``points_ij``: (N, 2) frame pixels (i, j) where the jump is measured (None or empty: a
        5 x 5 grid spanning the frame). Call :meth:`prior` for the same frame first (it applies
        the reset rule).
        """
        c = np.asarray(correction, np.float64)
        if tracked is None:  # no pose: nothing to be coherent with
            self._state = None
            return c, math.nan
        s = self._state
        if s is None:
            self._state = _State(deque([c.copy()], maxlen=self.window), c.copy(),
                                 np.array(tracked, np.float64), t_s, tuple(hw))
            return c, math.nan
        if points_ij is not None and len(points_ij) == 0:
            points_ij = None
        jump = self._jump_mm(c, s.filtered, hw, spacing_mm, points_ij)
        s.recent.append(c.copy())
        s.filtered = np.median(np.stack(s.recent), axis=0)
        s.tracked, s.t_s = np.array(tracked, np.float64), t_s
        return s.filtered.copy(), jump


#: ``--jump-at``: where a frame's jump from the filtered correction is measured. ``frame``: a 5 x 5
#: grid spanning the frame (a 10-15 deg error about the gland moves the corners 3-6 mm while the
#: gland moves ~1 mm); ``gland``: the MRI gland's pixels (:class:`GlandPoints`), where the
#: registration's error is measured and matters (bench/results/lc2_predeclared.md, addendum 13)
JUMP_AT = ("frame", "gland")
JUMP_AT_DEFAULT = "gland"  # by its rule (lc2_predeclared.md, addendum 13): it passed


class GlandPoints:
    """The frame pixels (i, j) the MRI gland (prostate and lesion labels) covers through a
    registered plane, on a lattice of about ``step_mm``: where ``--jump-at gland`` measures
    ``jump_mm``. None when fewer than ``min_points`` fall on the gland (no gland in view): the
    filter then measures over the whole frame."""

    def __init__(self, context, step_mm: float = 2.0, min_points: int = 8) -> None:
        if not (math.isfinite(step_mm) and step_mm > 0) or min_points < 1:
            raise InputError(f"gland points: step {step_mm!r} mm, min_points {min_points!r}: "
                             "expected > 0 and >= 1")
        self.context, self.step_mm, self.min_points = context, float(step_mm), int(min_points)

    def __call__(self, image_to_mri: np.ndarray, hw: tuple[int, int],
                 spacing_mm: tuple[float, float]) -> np.ndarray | None:
        si = max(1, int(round(self.step_mm / spacing_mm[1])))  # along columns (i)
        sj = max(1, int(round(self.step_mm / spacing_mm[0])))  # along rows (j)
        dev = self.context.mri.device
        i = torch.arange(0, hw[1], si, dtype=torch.float32, device=dev).reshape(1, -1, 1)
        j = torch.arange(0, hw[0], sj, dtype=torch.float32, device=dev).reshape(-1, 1, 1)
        with torch.inference_mode():
            m = torch.as_tensor((self.context.world_to_normalised @ image_to_mri)[:3, [0, 1, 3]],
                                dtype=torch.float32, device=dev)
            grid = spatial.axes_grid(m, i, j)
            lab = F.grid_sample(self.context.labels_float, grid[None, None], mode="nearest",
                                padding_mode="zeros", align_corners=False)[0, 0, 0]
            jj, ii = np.nonzero(lab.cpu().numpy() > 0)
        if len(ii) < self.min_points:
            return None
        return np.stack([ii * si, jj * sj], 1).astype(np.float64)
