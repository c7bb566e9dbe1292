"""The one gate every frame passes before the pipeline sees it (regseg.geometry.check_frame).

:func:`regseg.stream.runner.run_stream` calls the gate on each frame it takes from the source's
slot, whatever the source (OpenIGTLink, file, grabber, simulated): no source can hand the
pipeline a frame that skipped it.

What happens to a refused frame depends on why:

- ``bad_pose`` (a singular, degenerate or implausible ImageToReference): the frame goes on
  *untracked* (``image_to_reference`` None), exactly as a pose PLUS marks INVALID does. The B-mode
  image is still good, and the operator keeps seeing a live image (with the result flagged as
  untracked) instead of a frozen one; the registration is never computed from a matrix that
  would make it wrong. Counted in ``poses_refused``.
- ``too_large``, ``bad_pixels``, ``bad_spacing``: the frame is dropped (nothing in it can be
  used). Counted in ``refused_frames[reason]``.

Each refusal is logged with its reason, at most once every 5 s per reason.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from regseg.geometry import FrameLimits, FrameRefused, check_frame
from regseg.stream.igtl.wire import RateLimitedLog
from regseg.types import Frame

log = logging.getLogger(__name__)

REASONS = ("too_large", "bad_pixels", "bad_spacing", "bad_pose")


class FrameGate:
    """``gate(frame)`` -> the frame to process (perhaps made untracked), or None to drop it."""

    def __init__(self, limits: FrameLimits | None = None) -> None:
        self.limits = limits if limits is not None else FrameLimits()
        self.passed = 0
        self.poses_refused = 0
        self.refused = dict.fromkeys(REASONS[:-1], 0)
        self.last_refusal: str | None = None
        self._lock = threading.Lock()
        self._log = RateLimitedLog(log)

    def __call__(self, frame: Frame) -> Frame | None:
        try:
            check_frame(frame, self.limits)
        except FrameRefused as exc:
            if exc.reason != "bad_pose":
                self._count(exc.reason, str(exc))
                return None
            untracked = replace(frame, image_to_reference=None)
            try:  # the spacing must stand on its own once the pose is gone
                check_frame(untracked, self.limits)
            except FrameRefused as again:
                self._count(again.reason, str(again))
                return None
            self._count("bad_pose", f"{exc}; frame processed as untracked")
            return untracked
        with self._lock:
            self.passed += 1
        return frame

    def _count(self, reason: str, message: str) -> None:
        with self._lock:
            if reason == "bad_pose":
                self.poses_refused += 1
            else:
                self.refused[reason] += 1
            self.last_refusal = message
        self._log.warning(reason, message)

    def stats(self) -> dict:
        """Counters: frames passed, frames dropped by reason, poses refused (frames kept)."""
        with self._lock:
            return {"passed": self.passed, "refused_frames": dict(self.refused),
                    "poses_refused": self.poses_refused,
                    "max_frame_pixels": self.limits.max_pixels,
                    "last_refusal": self.last_refusal}
