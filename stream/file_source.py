"""Replays a PLUS sequence file (.igs.mha, .seq.nrrd ...) as a live source, poses and times kept."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

from regseg.clock import SenderClock, now_ns
from regseg.errors import InputError
from regseg.sequence_file import Sequence, frame_from_sequence, read_sequence
from regseg.stream.slot import LatestSlot
from regseg.stream.source import SourceThread
from regseg.types import Frame

log = logging.getLogger(__name__)

REPLAY_RATES = ("recorded", "max")
DEFAULT_FPS = 30.0  # pacing when the file has no usable timestamps
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
