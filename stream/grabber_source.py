"""A frame-grabber (or video file) source through cv2.VideoCapture: the ultrasound screen, cropped.

Scanners without a research interface are often captured from their video output (DVI/HDMI/SDI
into a USB grabber such as an Epiphan, PLUS's ``Epiphan`` / ``MmfVideo`` devices). The frame then
holds the whole screen: ``crop`` cuts out the B-mode image, whose pixel size comes from the
configuration (the grabber does not know it). Frames are untracked unless a pose source (e.g. an
:class:`~regseg.stream.igtl.source.IgtlSource` receiving a tracker's ``ImageToReference``) is
given; its latest valid pose is then used, if recent enough: pairing by arrival, because a
grabber has no timestamp of its own to match (temporal calibration is not applied here).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Protocol

import cv2
import numpy as np

from regseg.clock import now_ns, wall_s
from regseg.errors import InputError
from regseg.stream.igtl.pairing import Pose
from regseg.stream.slot import LatestSlot
from regseg.types import Frame

log = logging.getLogger(__name__)

#: Slowest frame rate a video file's header may declare: the source waits 1/fps between frames, so
#: a header saying 1e-5 fps held the stream after its first frame for 28 hours. Ultrasound cine
#: loops are 10-60 fps. Zero ("unknown" to OpenCV) replays flat out, as before.
MIN_FILE_FPS = 1.0
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm")


class PoseSource(Protocol):
    """Something that receives poses on its own thread: ``pose()`` is the latest one."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pose(self) -> Pose | None: ...

    def stats(self) -> dict: ...


def parse_crop(text: str) -> tuple[int, int, int, int]:
    """``X,Y,W,H`` (pixels, top-left corner and size) -> a tuple; InputError if malformed."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError as exc:
        raise InputError(f"crop {text!r}: X,Y,W,H in pixels expected, e.g. 120,80,640,480") from exc
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise InputError(f"crop {text!r}: X, Y >= 0 and W, H > 0 expected")
    return x, y, w, h


def crop_grey(image: np.ndarray, crop: tuple[int, int, int, int] | None) -> np.ndarray:
    """The (H, W) uint8 grey B-mode inside ``crop`` of a captured BGR, BGRA or grey image."""
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        raise InputError(f"captured image of type {image.dtype}; 8-bit video expected")
    if crop is None:
        return np.ascontiguousarray(image)
    x, y, w, h = crop
    if y + h > image.shape[0] or x + w > image.shape[1]:
        raise InputError(f"crop x={x} y={y} w={w} h={h} does not fit in the captured "
                         f"{image.shape[1]}x{image.shape[0]} image; set --grabber-crop within it")
    return np.ascontiguousarray(image[y:y + h, x:x + w])


class GrabberSource:
    """Frames from ``cv2.VideoCapture(device)``, cropped, grey, placed by ``spacing_mm``.

    The capture is opened and one frame read at construction, so a missing device, an unreadable
    file or a crop outside the image fails before the pipeline starts. A device paces itself; a
    video file is paced at ``fps`` (default: the file's own rate; 0 = flat out) and the source
    finishes at its end.

    Args:
        device: a device index (``grabber://0``) or a video file path.
        slot: where Frames go; a new LatestSlot by default.
        crop: (x, y, w, h) of the ultrasound image in the captured frame; None keeps it whole.
        spacing_mm: (row, col) pixel size of the cropped image, mm.
        pose_source: gives ``image_to_reference`` (cropped-image pixel -> Reference mm).
        max_pose_age_s: an older pose (by receipt) leaves the frame untracked.
        fps: pacing of a video file; None: its own rate.
    """

    knows_truth = False

    def __init__(self, device: int | str, slot: LatestSlot[Frame] | None = None, *,
                 crop: tuple[int, int, int, int] | None = None,
                 spacing_mm: tuple[float, float] = (0.2, 0.2),
                 pose_source: PoseSource | None = None, max_pose_age_s: float = 0.2,
                 fps: float | None = None) -> None:
        if not (spacing_mm[0] > 0 and spacing_mm[1] > 0):
            raise InputError(f"grabber spacing {spacing_mm} mm; positive (row, col) expected")
        self.device = device
        self.is_file = isinstance(device, str)
        if self.is_file and not os.path.isfile(device):
            raise InputError(f"video file {device!r} does not exist")
        self._capture = cv2.VideoCapture(device)
        if not self._capture.isOpened():
            raise InputError(f"cannot open video {'file' if self.is_file else 'device'} "
                             f"{device!r} with OpenCV; check the path, or the device index "
                             "(grabber://0 is the first capture device)")
        ok, first = self._capture.read()
        if not ok or first is None:
            self._capture.release()
            raise InputError(f"video {device!r} opened but gave no frame")
        self.crop = crop
        self._first = crop_grey(first, crop)  # also checks the crop
        self.spacing_mm = (float(spacing_mm[0]), float(spacing_mm[1]))
        self.pose_source = pose_source
        self.max_pose_age_ns = int(max_pose_age_s * 1e9)
        file_fps = self._capture.get(cv2.CAP_PROP_FPS) if self.is_file else 0.0
        if fps is None and not (file_fps <= 0.0 or MIN_FILE_FPS <= file_fps < float("inf")):
            self._capture.release()
            raise InputError(f"video file {device!r} declares {file_fps:g} frames per second; "
                             f"at least {MIN_FILE_FPS:g} (or 0, unknown) expected: the header is "
                             "damaged. Replay it flat out with --replay-rate max.")
        self.fps = float(file_fps if fps is None else fps) if self.is_file else 0.0
        self.slot: LatestSlot[Frame] = slot if slot is not None else LatestSlot()
        self.frames = 0
        self.read_failures = 0
        self.stale_poses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grabber-source", daemon=True)

    def start(self) -> None:
        if self.pose_source is not None:
            self.pose_source.start()
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.pose_source is not None:
            self.pose_source.stop()
        self.slot.close()

    @property
    def finished(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    def stats(self) -> dict:
        out = {"kind": "grabber", "device": self.device, "frames": self.frames,
               "read_failures": self.read_failures, "stale_poses": self.stale_poses}
        if self.pose_source is not None:
            out["pose_source"] = self.pose_source.stats()
        return out

    def _image_to_reference(self, now: int) -> np.ndarray | None:
        if self.pose_source is None:
            return None
        pose = self.pose_source.pose()
        if pose is None or not pose.valid:
            return None
        if now - pose.received_ns > self.max_pose_age_ns:
            self.stale_poses += 1
            return None
        return pose.matrix

    def _put(self, pixels: np.ndarray) -> None:
        now = now_ns()
        self.slot.put(Frame(seq=self.frames, acquired_ns=now, pixels=pixels,
                            spacing_mm=self.spacing_mm,
                            image_to_reference=self._image_to_reference(now),
                            source_ts=wall_s(), device_name="Grabber"))
        self.frames += 1

    def _run(self) -> None:
        try:
            t0 = now_ns()
            period_ns = int(1e9 / self.fps) if self.fps > 0 else 0
            image: np.ndarray | None = self._first
            n = 0
            while not self._stop.is_set():
                if image is None:
                    ok, captured = self._capture.read()
                    if not ok or captured is None:
                        if self.is_file:
                            break  # end of the video
                        self.read_failures += 1
                        if self._stop.wait(0.05):  # a device hiccup: back off, do not spin
                            break
                        continue
                    try:
                        image = crop_grey(captured, self.crop)
                    except InputError as exc:  # e.g. the grabber changed resolution
                        self.read_failures += 1
                        log.warning("grabber %r: %s", self.device, exc)
                        continue
                if period_ns:
                    wait_ns = t0 + n * period_ns - now_ns()
                    if wait_ns > 0 and self._stop.wait(wait_ns / 1e9):
                        break
                self._put(image)
                image = None
                n += 1
        finally:
            self._capture.release()
            self.slot.close()
