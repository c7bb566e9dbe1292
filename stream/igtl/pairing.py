"""Pairs each tracked image with the pose of the same instant, whichever of the two arrives first.

PLUS stamps an IMAGE and the TRANSFORMs of one tracked frame with the same timestamp, but sends
them in the order of its client-info message types (``vtkPlusIgtlMessageFactory::PackMessages``):
the pose may come before or after its image. Pairing by arrival ("the latest TRANSFORM") is then
one frame off whenever the pose comes second. Here an image is paired with the pose whose
timestamp matches within a tolerance; when poses have been seen to follow their images, an image
waits (bounded) for its own. No threads and no sockets: the caller feeds messages and a clock.

With a probe calibration (``image_to_probe``) the poses are the probe's (``ProbeToTracker`` or
``ProbeToReference``, as PLUS sends them), and the pairer returns each image's pose as PLUS's
chain makes it: ``image_to_reference = probe_to_reference @ image_to_probe``. With a time offset
(a measured lag: ``regseg calibrate temporal``), an image stamped t is paired with the pose
stamped t + offset.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")

#: PLUS metadata values that mean a pose can be used (vtkPlusIgtlMessageCommon: TransformStatus
#: "OK"/"INVALID", TransformValid "true"/"false").
_VALID_WORDS = frozenset({"ok", "true", "1", "valid"})
MAX_MISSES_BEFORE_NOT_WAITING = 3


@dataclass(frozen=True, slots=True)
class Pose:
    """One received TRANSFORM."""

    matrix: np.ndarray  # (4, 4) float64
    timestamp_s: float  # the sender's timestamp, s (since 1970 on OpenIGTLink)
    valid: bool  # False when the sender flagged it (TransformStatus INVALID, TransformValid false)
    received_ns: int  # clock.now_ns() at receipt


@dataclass(frozen=True, slots=True)
class Paired(Generic[T]):
    """An image released by the pairer, with its pose (None: no pose of its instant arrived)."""

    item: T
    timestamp_s: float
    received_ns: int
    pose: Pose | None


def pose_is_valid(metadata: dict[str, str] | None) -> bool:
    """False when PLUS-style metadata flags a TRANSFORM as invalid; True when it says nothing.

    PLUS (``vtkPlusIgtlMessageCommon::PackTransformMessage``) sends ``TransformStatus`` (OK,
    INVALID, ...) and ``TransformValid`` (true/false) with header v2; header v1 carries neither.
    """
    if not metadata:
        return True
    for key in ("TransformStatus", "TransformValid"):
        value = metadata.get(key)
        if value is not None and value.strip().lower() not in _VALID_WORDS:
            return False
    return True


class TimestampPairer(Generic[T]):
    """Matches images to poses by timestamp; releases every image exactly once, in order.

    An image is released at once when a pose within ``tolerance_s`` of its timestamp is already
    here, or when poses have so far come before their images (or never came at all): then no
    later pose is expected. Once a pose has been seen to arrive after its image, later images are
    held until their pose arrives, the next image arrives, or ``max_wait_s`` passes
    (:meth:`expire`), whichever is first. At most one image is held.

    Args:
        tolerance_s: largest |image - pose| timestamp difference that still pairs; keep it below
            half a tracker period (PLUS uses the very same timestamp: any small value works).
        max_wait_s: longest an image is held for a pose that follows it.
        history: poses kept for images still to come (a few frames' worth is plenty).
        image_to_probe: (4, 4) probe calibration (pixels -> probe mm): poses are the probe's,
            and released poses are ``pose @ image_to_probe``. An image released without a pose
            then gets an invalid one (its own IMAGE matrix is not in the reference frame).
        time_offset_s: added to an image's timestamp before matching (image clock -> tracker
            clock); with an offset larger than the tolerance, poses follow their images by about
            the offset, so ``max_wait_s`` must cover it.
    """

    def __init__(self, tolerance_s: float = 0.005, max_wait_s: float = 0.05,
                 history: int = 16, *, image_to_probe: np.ndarray | None = None,
                 time_offset_s: float = 0.0) -> None:
        if tolerance_s < 0 or max_wait_s < 0 or history < 1:
            raise ValueError(f"tolerance_s {tolerance_s}, max_wait_s {max_wait_s}, history "
                             f"{history}: non-negative times and history >= 1 expected")
        self.image_to_probe = None if image_to_probe is None else \
            np.array(image_to_probe, dtype=np.float64)
        self.time_offset_s = float(time_offset_s)
        self.tolerance_s = tolerance_s
        self.max_wait_ns = int(max_wait_s * 1e9)
        self._poses: deque[Pose] = deque(maxlen=history)
        self._held: Paired[T] | None = None
        self._released_ts: deque[float] = deque(maxlen=history)  # timestamps of unpaired images
        self.poses_follow = False  # learnt: this sender sends the pose after its image
        self._missed_in_a_row = 0  # held images released without a pose, consecutively
        self.paired = 0  # images released with the pose of their instant
        self.unpaired = 0  # images released without one (their own matrix is used)
        self.waited = 0  # images held for a pose that followed them
        self.late_poses = 0  # poses that arrived after their image had been released

    @property
    def latest_pose(self) -> Pose | None:
        """The most recent pose received (for sources that pair by arrival, e.g. a grabber)."""
        return self._poses[-1] if self._poses else None

    @property
    def deadline_ns(self) -> int | None:
        """When the held image must be released by :meth:`expire` (None: nothing held)."""
        return None if self._held is None else self._held.received_ns + self.max_wait_ns

    def add_pose(self, pose: Pose) -> list[Paired[T]]:
        """Take a pose; returns the held image if this is its pose."""
        if self.image_to_probe is not None:
            pose = Pose(pose.matrix @ self.image_to_probe, pose.timestamp_s, pose.valid,
                        pose.received_ns)
        self._poses.append(pose)
        held = self._held
        if held is not None and abs(held.timestamp_s + self.time_offset_s
                                    - pose.timestamp_s) <= self.tolerance_s:
            self._held = None
            self.poses_follow = True
            self._missed_in_a_row = 0
            self.paired += 1
            return [Paired(held.item, held.timestamp_s, held.received_ns, pose)]
        if any(abs(ts + self.time_offset_s - pose.timestamp_s) <= self.tolerance_s
               for ts in self._released_ts):
            # Its image went out without it: from now on, images wait for their pose.
            self.late_poses += 1
            self.poses_follow = True
        return []

    def add_image(self, item: T, timestamp_s: float, received_ns: int) -> list[Paired[T]]:
        """Take an image; returns what can be released now (a held older image first)."""
        out = self._release_held()
        pose = self._match(timestamp_s + self.time_offset_s)
        if pose is not None:
            self.paired += 1
            self.poses_follow = False if pose.received_ns <= received_ns else self.poses_follow
            out.append(Paired(item, timestamp_s, received_ns, pose))
        elif self.poses_follow and self._poses:
            self._held = Paired(item, timestamp_s, received_ns, None)
            self.waited += 1
        else:
            out.append(self._unpaired(Paired(item, timestamp_s, received_ns, None)))
        return out

    def expire(self, now_ns: int) -> list[Paired[T]]:
        """Release the held image if its wait is over."""
        deadline = self.deadline_ns
        if deadline is None or now_ns < deadline:
            return []
        return self._release_held()

    def flush(self) -> list[Paired[T]]:
        """Release the held image now (end of stream, lost connection)."""
        return self._release_held()

    def stats(self) -> dict:
        return {"paired": self.paired, "unpaired": self.unpaired, "waited": self.waited,
                "late_poses": self.late_poses, "poses_follow_images": self.poses_follow,
                "probe_calibration": self.image_to_probe is not None,
                "time_offset_ms": self.time_offset_s * 1e3}

    def _match(self, timestamp_s: float) -> Pose | None:
        best = None
        for pose in self._poses:
            error = abs(pose.timestamp_s - timestamp_s)
            if error <= self.tolerance_s and (best is None or error < best[0]):
                best = (error, pose)
        return None if best is None else best[1]

    def _release_held(self) -> list[Paired[T]]:
        held, self._held = self._held, None
        if held is None:
            return []
        # A tracker that stopped (or a pose the sender withholds: PLUS SendValidTransformsOnly)
        # must not delay every image: after a few misses, stop waiting until a pose is late again.
        self._missed_in_a_row += 1
        if self._missed_in_a_row >= MAX_MISSES_BEFORE_NOT_WAITING:
            self.poses_follow = False
            self._missed_in_a_row = 0
        return [self._unpaired(held)]

    def _unpaired(self, paired: Paired[T]) -> Paired[T]:
        self.unpaired += 1
        self._released_ts.append(paired.timestamp_s)
        if self.image_to_probe is not None:  # no probe pose: the frame is untracked
            paired = Paired(paired.item, paired.timestamp_s, paired.received_ns,
                            Pose(np.eye(4), paired.timestamp_s, False, paired.received_ns))
        return paired
