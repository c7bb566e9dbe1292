"""Records the incoming session (and the outputs, if asked) as PLUS sequence files, off hot path.

Frames are taken where the source hands them over (:class:`RecordingSlot`), so frames the pipeline
skips are recorded too; Results come through the Sink protocol (``submit``). Both only append to a
bounded queue; a writer thread packs and compresses. When the disk cannot keep up, new items are
dropped and counted rather than slowing the stream.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from pathlib import Path

import numpy as np

from regseg.errors import InputError
from regseg.sequence_file import DEFAULT_DEVICE, SEQUENCE_EXTENSIONS, SPACING_FIELD, format_matrix
from regseg.sequence_writer import (
    SequenceWriter,
    has_partial,
    header_text,
    recover_recording,
)
from regseg.stream.igtl.wire import RateLimitedLog
from regseg.stream.slot import LatestSlot
from regseg.types import Frame, Result

log = logging.getLogger(__name__)

_IDENTITY = format_matrix(np.eye(4))


def frame_fields(frame: Frame, *, transform_name: str = "ImageToReference",
                 element_spacing_mm: tuple[float, float] | None = None,
                 status_field: str = "ImageStatus") -> dict[str, str]:
    """The PLUS per-frame fields for ``frame`` (numbers in round-trip ``repr``).

    An untracked frame gets an identity transform with status INVALID, as PLUS writes a pose
    it does not have. ``SpacingMm`` (row col) is added when the frame's pixel size is not what a
    reader would derive (the transform's column norms, or ElementSpacing ``element_spacing_mm``
    (x, y) when untracked), so the replayed Frame is the recorded one, bit for bit.
    ``FriendlyDeviceName`` is written only for a device other than Image_Reference, escaped to
    printable ASCII (:func:`~regseg.sequence_writer.header_text`): the scanner chose it.
    """
    fields = {"FrameNumber": str(frame.seq), "Timestamp": repr(float(frame.source_ts)),
              "UnfilteredTimestamp": repr(float(frame.source_ts))}
    row, col = (float(v) for v in frame.spacing_mm)
    if frame.image_to_reference is not None:
        matrix = np.asarray(frame.image_to_reference, dtype=np.float64)
        fields[f"{transform_name}Transform"] = format_matrix(matrix)
        fields[f"{transform_name}TransformStatus"] = "OK"
        derived = (float(np.linalg.norm(matrix[:3, 1])), float(np.linalg.norm(matrix[:3, 0])))
    else:
        fields[f"{transform_name}Transform"] = _IDENTITY
        fields[f"{transform_name}TransformStatus"] = "INVALID"
        x, y = element_spacing_mm if element_spacing_mm is not None else (None, None)
        derived = (y, x)
    if (row, col) != derived:
        fields[SPACING_FIELD] = f"{row!r} {col!r}"
    if frame.device_name != DEFAULT_DEVICE:
        fields["FriendlyDeviceName"] = header_text(frame.device_name)
    fields[status_field] = "OK"
    return fields


def output_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(labels, overlay) sequence files beside ``path``: session.igs.mha -> session_Labels.igs.mha,
    session_Overlay.igs.mha."""
    path = Path(path)
    name = path.name
    ext = next((e for e in SEQUENCE_EXTENSIONS if name.lower().endswith(e)), "")
    stem = name[: len(name) - len(ext)]
    return path.with_name(f"{stem}_Labels{ext}"), path.with_name(f"{stem}_Overlay{ext}")


def recovered_path(path: str | os.PathLike) -> Path:
    """The first free ``NAME_recoveredN.EXT`` beside ``path``: where the recorder completes an
    unfinished recording it finds at start, before it records over the name again."""
    path = Path(path)
    ext = next((e for e in SEQUENCE_EXTENSIONS if path.name.lower().endswith(e)), "")
    stem = path.name[: len(path.name) - len(ext)]
    n = 1
    while path.with_name(f"{stem}_recovered{n}{ext}").exists():
        n += 1
    return path.with_name(f"{stem}_recovered{n}{ext}")


class Recorder:
    """Writes Frames (``add_frame``) and, with ``outputs``, Results (``submit``) to sequence files.

    The session goes to ``path``; outputs to ``*_Labels`` (uint8 labels, with per-frame
    ``MRIToImageTransform``, ``Quality`` and ``Flagged``) and ``*_Overlay`` (RGB) beside it.
    Every file is complete after ``close()``, which drains the queue first and closes every file
    even when one fails; a file that could not be completed is logged as an error and listed in
    ``stats()["failed"]`` (its frames stay on disk for ``regseg-igt recover``). Each frame reaches
    the OS as it is written, so a process killed mid-session leaves a recording that
    ``regseg-igt recover PATH`` completes; a Recorder started on a name with such leftovers first
    completes them into ``NAME_recoveredN.EXT`` (logged).

    Args:
        path: the session file, ``.igs.mha`` / ``.seq.mha`` / ``.igs.nrrd`` / ``.seq.nrrd``.
        outputs: also record Results.
        queue_size: items waiting for the writer; more are dropped (counted in ``dropped``).
        compress: zlib/gzip the pixels (level 1: fast enough for live rates on one core).
    """

    def __init__(self, path: str | os.PathLike, *, outputs: bool = False, queue_size: int = 128,
                 compress: bool = True, transform_name: str = "ImageToReference") -> None:
        self.path = Path(path)
        self.outputs = outputs
        self.queue_size = queue_size
        self.transform_name = transform_name
        self._compress = compress
        self._status_field = "Status" if self.path.name.lower().endswith(
            (".nrrd", ".nhdr")) else "ImageStatus"  # what IGSIO's NRRD / MetaIO writers use
        for path in (self.path, *output_paths(self.path)):
            if has_partial(path):  # a session that died before closing: keep it, complete
                recover_recording(path, out=recovered_path(path))
        SequenceWriter(self.path, compress=False).close()  # fail early: bad name or folder
        self._frames: SequenceWriter | None = None
        self._labels: SequenceWriter | None = None
        self._overlay: SequenceWriter | None = None
        self._queue: deque[Frame | Result] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.frames = 0
        self.results = 0
        self.dropped = 0
        self.errors = 0  # items the writer refused (e.g. a frame of another size)
        self.failed: list[str] = []  # "PATH: why" for each file that could not be completed
        self._log = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def add_frame(self, frame: Frame) -> None:
        """Queue an incoming frame; never blocks. Its arrays must not change after this call."""
        self._enqueue(frame)

    def submit(self, result: Result) -> None:
        """Sink protocol: queue a Result when recording outputs; never blocks."""
        if self.outputs:
            self._enqueue(result)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, finish the files (within ``timeout`` s)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def stats(self) -> dict:
        return {"kind": "recorder", "path": str(self.path), "frames": self.frames,
                "results": self.results, "dropped": self.dropped, "errors": self.errors,
                "failed": list(self.failed)}

    def _enqueue(self, item: Frame | Result) -> None:
        with self._cond:
            if self._closed or len(self._queue) >= self.queue_size:
                self.dropped += 1
                return
            self._queue.append(item)
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._queue or self._closed)
                    if not self._queue:
                        return
                    item = self._queue.popleft()
                try:
                    self._write(item)
                except InputError as exc:
                    self.errors += 1
                    self._log.warning("write", f"recorder: {exc}")
                except Exception as exc:  # noqa: BLE001 - a disk error: stop, say so, close
                    self._fail(self.path, "writing", exc)
                    with self._cond:
                        self._closed = True
                        self.dropped += len(self._queue)
                        self._queue.clear()
                    return
        finally:
            self._close_files()

    def _close_files(self) -> None:
        """Complete every file; one that fails does not keep the others from closing."""
        closes = [(w.path, w.close) for w in (self._frames, self._labels, self._overlay)
                  if w is not None]
        if self._frames is None:  # nothing arrived: still leave a valid, empty file
            closes.insert(0, (self.path,
                              lambda: SequenceWriter(self.path, compress=self._compress).close()))
        for path, close in closes:
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - the other files must still be closed
                self._fail(path, "closing", exc)

    def _fail(self, path: Path, doing: str, exc: Exception) -> None:
        """Count a file the recorder could not write or complete, and say so (an error)."""
        why = f"{path}: {doing} failed: {type(exc).__name__}: {exc}"
        self.failed.append(why)
        if doing == "writing":
            log.error("recorder: %s; recording stopped, the frames before it are kept", why)
        else:
            log.error("recorder: %s; the file is not complete (the frames written so far stay "
                      "on disk: `regseg-igt recover %s` completes them)", why, path)

    def _writer(self, path: Path, spacing: tuple[float, float]) -> SequenceWriter:
        return SequenceWriter(path, compress=self._compress, level=1, spacing_mm=spacing,
                              fields={"UltrasoundImageOrientation": "MF",
                                      "UltrasoundImageType": "BRIGHTNESS"})

    def _write(self, item: Frame | Result) -> None:
        if isinstance(item, Frame):
            if self._frames is None:
                self._frames = self._writer(self.path, item.spacing_mm[::-1])
            fields = frame_fields(item, transform_name=self.transform_name,
                                  element_spacing_mm=self._frames.spacing_mm,
                                  status_field=self._status_field)
            self._frames.add(item.pixels, fields)
            self.frames += 1
            return
        frame = item.frame
        if self._labels is None:
            labels_path, overlay_path = output_paths(self.path)
            self._labels = self._writer(labels_path, frame.spacing_mm[::-1])
            self._overlay = self._writer(overlay_path, frame.spacing_mm[::-1])
        fields = frame_fields(frame, transform_name=self.transform_name,
                              element_spacing_mm=self._labels.spacing_mm,
                              status_field=self._status_field)
        fields |= {"MRIToImageTransform": format_matrix(item.mri_to_image),
                   "MRIToImageTransformStatus": "INVALID" if item.flagged else "OK",
                   "Quality": repr(float(item.quality)),
                   "Flagged": "true" if item.flagged else "false"}
        self._labels.add(item.labels, fields)
        self._overlay.add(item.overlay, fields)
        self.results += 1


class RecordingSlot(LatestSlot[Frame]):
    """A LatestSlot that also hands every Frame put into it to a :class:`Recorder`.

    Give it to a source instead of a plain LatestSlot: the recorder then sees every incoming frame,
    including those the pipeline skips.
    """

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def put(self, item: Frame) -> None:
        self.recorder.add_frame(item)
        super().put(item)
