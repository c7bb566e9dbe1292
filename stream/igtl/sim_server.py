"""A simulated scanner behind an OpenIGTLink server, sending as PLUS does: tests, demos, benches."""

from __future__ import annotations

import logging
import threading

import numpy as np

from regseg.clock import now_ns, wall_s
from regseg.stream.igtl.codec import pack_image, pack_transform, wire_timestamp
from regseg.stream.igtl.server import IgtlServer
from regseg.stream.source import SourceThread
from regseg.types import Frame

log = logging.getLogger(__name__)

MAX_RECORDS = 100_000  # timestamps kept in ``sent``: about an hour at 30 fps


class SimIgtlServer:
    """Serves ``scanner.frame(i)`` for i = start_index, start_index + 1, ... over OpenIGTLink.

    Per frame, as a PLUS server configured with ``<Image Name="Image"
    EmbeddedTransformToFrame="Reference"/>`` and ``<Transform Name="ImageToReference"/>``:
    a TRANSFORM ``ImageToReference`` (first, so a receiver that pairs an IMAGE with the latest
    pose gets this frame's), then the IMAGE ``Image_Reference`` whose matrix is the same pose (RAS;
    diag(spacing) when the frame is untracked, and no TRANSFORM). Both carry the wall-clock time of
    sending, so a receiver on this machine can measure end-to-end latency; ``sent`` maps that
    timestamp, exactly as receivers decode it, to the frame index. With header v2 the IMAGE also
    carries metadata ``FrameIndex``.

    Args:
        scanner: has ``frame(index) -> Frame`` and ``config.fps``
            (regseg.sim.scanner.SimulatedScanner).
        host, port: where to listen; port 0 picks a free one (``.port``).
        fps: send rate; None for ``scanner.config.fps``; <= 0 sends flat out.
        max_frames: stop after this many frames (None: until stop()).
        send_transform: also send the TRANSFORM ``ImageToReference``.
        t0: ``regseg.clock.now_ns()`` at which the first frame is due, for several servers on one
            schedule; None: when the first client connects (or at start() if not waiting).
        start_index: scanner index of the first frame.
        wait_for_client: hold the first frame until a client is connected (nothing is lost to
            an empty room); stop() ends the wait.
        header_version: OpenIGTLink header version of what we send (2, or 1 for old receivers).
        untracked_as_invalid: send an untracked frame as PLUS does when the tracker loses the
            probe: the TRANSFORM with ``TransformStatus`` INVALID and the IMAGE with
            ``ImageToReferenceTransformStatus`` INVALID (header v2), instead of no TRANSFORM.
    """

    def __init__(
        self,
        scanner,
        host: str = "127.0.0.1",
        port: int = 0,
        fps: float | None = 30.0,
        max_frames: int | None = None,
        send_transform: bool = True,
        t0: int | None = None,
        *,
        start_index: int = 0,
        wait_for_client: bool = True,
        header_version: int = 2,
        image_device: str = "Image_Reference",
        transform_device: str = "ImageToReference",
        untracked_as_invalid: bool = False,
    ) -> None:
        self.scanner = scanner
        self.fps = float(scanner.config.fps if fps is None else fps)
        self.max_frames = max_frames
        self.send_transform = send_transform
        self.t0 = t0
        self.start_index = start_index
        self.wait_for_client = wait_for_client
        self.header_version = header_version
        self.image_device = image_device
        self.transform_device = transform_device
        self.untracked_as_invalid = untracked_as_invalid
        self.server = IgtlServer(host, port)
        self.host, self.port = self.server.host, self.server.port
        self.sent: dict[float, int] = {}  # wire timestamp (s since 1970) -> scanner frame index
        self.frames_sent = 0
        self.late = 0  # frames sent more than one period after they were due
        self.done = threading.Event()  # set when the last frame has been sent or on stop()
        self._thread = SourceThread(self._run, f"sim-igtl-{self.port}")

    def __enter__(self) -> SimIgtlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop sending, disconnect every client, join the thread (within ``timeout`` s)."""
        # Closing the server also wakes a wait for the first client.
        self._thread.stop(timeout, wake=lambda: self.server.close(timeout))
        self.done.set()

    def index_for(self, timestamp: float, tolerance_s: float = 1e-6) -> int | None:
        """The scanner index of the frame sent with ``timestamp`` (None if not ours)."""
        index = self.sent.get(timestamp)
        if index is None:  # a receiver that re-packed the timestamp may differ by a few ns
            near = [(abs(ts - timestamp), i) for ts, i in list(self.sent.items())
                    if abs(ts - timestamp) <= tolerance_s]
            index = min(near)[1] if near else None
        return index

    def stats(self) -> dict:
        return {"frames_sent": self.frames_sent, "late": self.late, "fps": self.fps,
                "server": self.server.stats()}

    def pack_frame(self, frame: Frame, index: int, timestamp: float) -> list[bytes]:
        """The messages for one frame, TRANSFORM first (see the class docstring)."""
        if frame.image_to_reference is not None:
            matrix = np.asarray(frame.image_to_reference, dtype=np.float64)
        else:
            matrix = np.diag([frame.spacing_mm[1], frame.spacing_mm[0], 1.0, 1.0])
        messages = []
        metadata = {"FrameIndex": str(index)}
        if self.send_transform and frame.image_to_reference is not None:
            messages.append(pack_transform(matrix, self.transform_device, timestamp,
                                           header_version=self.header_version))
        elif self.send_transform and self.untracked_as_invalid:
            messages.append(pack_transform(matrix, self.transform_device, timestamp,
                                           header_version=self.header_version,
                                           metadata={"TransformStatus": "INVALID"}))
            metadata[f"{self.transform_device}TransformStatus"] = "INVALID"
        messages.append(pack_image(frame.pixels, matrix, self.image_device, timestamp,
                                   header_version=self.header_version, metadata=metadata))
        return messages

    def _run(self) -> None:
        try:
            if self.wait_for_client and not self.server.wait_for_clients(1):
                return  # stopped before anyone connected
            self._send_all()
        except Exception:  # the scanner is someone else's code: say what happened, end cleanly
            log.exception("simulated OpenIGTLink server stopped on an error")
        finally:
            self.done.set()

    def _send_all(self) -> None:
        period_ns = int(1e9 / self.fps) if self.fps > 0 else 0
        t0 = self.t0 if self.t0 is not None else now_ns()
        for n, late_ns in self._thread.paced(period_ns, t0, self.max_frames):
            if late_ns > period_ns:
                self.late += 1
            index = self.start_index + n
            frame = self.scanner.frame(index)
            messages = self.pack_frame(frame, index, wall_s())
            if len(self.sent) >= MAX_RECORDS:
                del self.sent[next(iter(self.sent))]
            self.sent[wire_timestamp(messages[-1])] = index
            self.server.broadcast(messages)
            self.frames_sent += 1
