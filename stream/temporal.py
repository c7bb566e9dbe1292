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
    needs no tuning of rates. Per frame, ``jump_mm`` is the mean distance (mm, over a 5 x 5 grid
    of points spanning the frame) between the frame's own ``C`` and the filtered one before it.

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
                 spacing_mm: tuple[float, float]) -> float:
        p = self._points(hw)
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
               spacing_mm: tuple[float, float], t_s: float) -> tuple[np.ndarray, float]:
        """Add this frame's correction; returns (filtered correction (3, 3), jump_mm).

        Call :meth:`prior` for the same frame first (it applies the reset rule).
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
        jump = self._jump_mm(c, s.filtered, hw, spacing_mm)
        s.recent.append(c.copy())
        s.filtered = np.median(np.stack(s.recent), axis=0)
        s.tracked, s.t_s = np.array(tracked, np.float64), t_s
        return s.filtered.copy(), jump
