"""Replays a PLUS sequence file (.igs.mha, .seq.nrrd ...) as a live source, poses and times kept."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

import numpy as np

from regseg.clock import SenderClock, now_ns
from regseg.errors import InputError
from regseg.stream.sequence_file import Sequence, SequenceFrame, read_sequence
from regseg.stream.slot import LatestSlot
from regseg.stream.source import SourceThread
from regseg.types import Frame

log = logging.getLogger(__name__)

REPLAY_RATES = ("recorded", "max")
DEFAULT_FPS = 30.0  # pacing when the file has no usable timestamps
#: ITU-R BT.601 luma weights, for RGB sequences (the same as for RGB IMAGE messages).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Per-frame field regseg adds for untracked frames whose pixel size is not ElementSpacing.
SPACING_FIELD = "SpacingMm"
DEFAULT_DEVICE = "Image_Reference"


def frame_from_sequence(frame: SequenceFrame, index: int, acquired_ns: int, *,
                        transform_name: str = "ImageToReference",
                        element_spacing_mm: tuple[float, float] = (1.0, 1.0)) -> Frame:
    """One sequence frame as a Frame.

    ``seq`` is the file's ``FrameNumber`` (so gaps the recorder saw stay visible) or ``index``;
    ``image_to_reference`` the ``<transform_name>Transform`` when its status is OK, else None
    (untracked); ``spacing_mm`` (row, col) the ``SpacingMm`` field (regseg writes it when the
    pixel size is not derivable), else the column norms of that matrix, else ElementSpacing;
    ``source_ts`` the ``Timestamp`` field (0 when absent); a replay maps it through
    :class:`regseg.clock.SenderClock` (relative timestamps anchored to the wall clock).

    Raises:
        InputError: pixels that are not (H, W) uint8 grey or (H, W, 3|4) uint8 colour.
    """
    pixels = frame.pixels
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (
            pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise InputError(f"sequence frame {index}: {pixels.dtype} pixels of shape {pixels.shape};"
                         " uint8 (H, W) B-mode or (H, W, 3|4) colour expected")
    if pixels.ndim == 3:
        pixels = np.rint(pixels[..., :3].astype(np.float32) @ _LUMA).astype(np.uint8)
    matrix = frame.transform(transform_name)
    if SPACING_FIELD in frame.fields:
        row, col = (float(v) for v in frame.fields[SPACING_FIELD].split())
        spacing = (row, col)
    elif matrix is not None:
        spacing = (float(np.linalg.norm(matrix[:3, 1])), float(np.linalg.norm(matrix[:3, 0])))
    else:
        spacing = (element_spacing_mm[1], element_spacing_mm[0])
    seq = frame.fields.get("FrameNumber", "")
    return Frame(
        seq=int(seq) if seq.strip().lstrip("-").isdigit() else index,
        acquired_ns=acquired_ns,
        pixels=pixels,
        spacing_mm=spacing,
        image_to_reference=matrix,
        source_ts=frame.timestamp_s or 0.0,
        device_name=frame.fields.get("FriendlyDeviceName", DEFAULT_DEVICE),
    )


def replay_offsets_ns(sequence: Sequence, fps: float = DEFAULT_FPS) -> list[int]:
    """When each frame is due, ns after the first, from the recorded timestamps.

    Timestamps that are missing or go backwards fall back to ``fps`` for that step, so one bad
    field cannot stall the replay.
    """
    offsets, last_ts, last_ns = [], None, 0
    step_ns = int(1e9 / fps)
    for frame in sequence.frames:
        ts = frame.timestamp_s
        if last_ts is None:
            due = 0
        elif ts is None or not ts > last_ts:
            due = last_ns + step_ns
        else:
            due = last_ns + int(round((ts - last_ts) * 1e9))
        offsets.append(due)
        last_ns = due
        if ts is not None and (last_ts is None or ts > last_ts):
            last_ts = ts  # a step back is not a new origin: the next step counts from the latest
    return offsets


class FileSource:
    """Puts the frames of a sequence file into ``slot``, at the recorded rate or flat out.

    The file is read and checked at construction (a bad file fails before the pipeline starts).
    ``rate="recorded"`` waits for each frame's recorded time (deadline-based, on an Event: no
    drift, stop() is prompt); ``rate="max"`` puts frames as fast as it can, and the hand-off keeps
    the newest, so the pipeline sees as many as it can take (skips counted by the slot).

    Args:
        path: the sequence file.
        slot: where Frames go; a new LatestSlot by default.
        rate: ``recorded`` or ``max``.
        transform_name: the per-frame transform used as ``image_to_reference``.
        loop: start again at the first frame after the last (until stop()).
        speed: with ``recorded``, a replay speed factor (2 = twice as fast).
    """

    knows_truth = False

    def __init__(self, path: str | os.PathLike, slot: LatestSlot[Frame] | None = None, *,
                 rate: str = "recorded", transform_name: str = "ImageToReference",
                 loop: bool = False, speed: float = 1.0) -> None:
        if rate not in REPLAY_RATES:
            raise InputError(f"replay rate {rate!r}; one of {', '.join(REPLAY_RATES)} expected")
        if not speed > 0:
            raise InputError(f"replay speed {speed}; a positive factor expected")
        self.path = os.fspath(path)
        self.sequence = read_sequence(path)
        if not self.sequence.frames:
            raise InputError(f"{self.path}: the sequence has no frames")
        frame_from_sequence(self.sequence.frames[0], 0, 0, transform_name=transform_name,
                            element_spacing_mm=self.sequence.element_spacing_mm)  # fail early
        self.slot: LatestSlot[Frame] = slot if slot is not None else LatestSlot()
        self.rate, self.transform_name, self.loop, self.speed = rate, transform_name, loop, speed
        self._offsets = replay_offsets_ns(self.sequence)
        self.frames = 0
        self.bad_frames = 0
        self.late = 0  # frames put more than 10 ms after their recorded time
        self.done = threading.Event()
        self._thread = SourceThread(self._run, "file-source")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._thread.stop(timeout)
        self.slot.close()

    @property
    def finished(self) -> bool:
        return self._thread.finished

    def stats(self) -> dict:
        return {"kind": "file", "path": self.path, "rate": self.rate,
                "frames_in_file": len(self.sequence.frames), "frames": self.frames,
                "bad_frames": self.bad_frames, "late": self.late}

    def _run(self) -> None:
        try:
            while not self._thread.stopping.is_set():
                self._replay_once()
                if not self.loop:
                    break
        except Exception:  # a frame we cannot turn into a Frame was counted; anything else:
            log.exception("replay of %s stopped on an error", self.path)
        finally:
            self.done.set()
            self.slot.close()

    def _replay_once(self) -> None:
        t0 = now_ns()
        sender_clock = SenderClock()  # each pass anchored anew: a loop does not step back in time
        for index, (frame, offset) in enumerate(zip(self.sequence.frames, self._offsets,
                                                     strict=True)):
            if self.rate == "recorded":
                late_ns = self._thread.wait_until(t0 + int(offset / self.speed))
                if late_ns is None:
                    return
                if late_ns > 10_000_000:
                    self.late += 1
            elif self._thread.stopping.is_set():
                return
            try:
                out = frame_from_sequence(frame, index, now_ns(),
                                          transform_name=self.transform_name,
                                          element_spacing_mm=self.sequence.element_spacing_mm)
            except (InputError, ValueError) as exc:
                self.bad_frames += 1
                log.warning("%s frame %d skipped: %s", self.path, index, exc)
                continue
            self.slot.put(replace(out, source_ts=sender_clock(frame.timestamp_s)))
            self.frames += 1
