"""The OpenIGTLink client source: IMAGE (+ TRANSFORM) messages from PLUS or a scanner, as Frames."""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import replace

import numpy as np
from pyigtl.messages import ImageMessage, MessageBase, TransformMessage

from regseg.clock import now_ns
from regseg.errors import InputError, StreamError
from regseg.stream.igtl.codec import frame_from_image
from regseg.stream.igtl.pairing import Paired, Pose, TimestampPairer, pose_is_valid
from regseg.stream.igtl.wire import DEFAULT_MAX_BODY_BYTES, MessageReader, RateLimitedLog, WireStats
from regseg.stream.slot import LatestSlot
from regseg.stream.source import SourceThread
from regseg.types import Frame

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
#: PLUS sends a STATUS keep-alive every 0.25 s (vtkPlusOpenIGTLinkServer KeepAliveIntervalSec), so
#: 5 s without one whole message (20 keep-alives missed; bytes alone do not count: a peer trickling
#: a byte every few seconds is as stalled as a silent one) mean a stalled sender or a half-open
#: connection: drop it and reconnect.
STALL_TIMEOUT_S = 5.0
#: Bodies of what a tracker or PLUS sends besides images: a TRANSFORM is 48 bytes (+ metadata).
SMALL_BODY_BYTES = 64 << 10
MAX_TRANSFORM_DEVICES = 64  # latest pose kept per TRANSFORM device name, for this many names


class IgtlSource:
    """Connects to an OpenIGTLink server and puts each IMAGE, as a Frame, into ``slot``.

    The pose (``image_to_reference``) is the TRANSFORM named ``transform_device`` whose timestamp
    matches the IMAGE's (:class:`~regseg.stream.igtl.pairing.TimestampPairer`: PLUS stamps both
    with the tracked frame's time and may send either first). With no such TRANSFORM the IMAGE's
    own matrix is used: PLUS embeds ImageToReference in ``Image_Reference``. A pose flagged invalid
    (PLUS metadata ``TransformStatus`` INVALID / ``TransformValid`` false, or the IMAGE's
    ``<transform_device>TransformStatus``) makes the frame untracked (``image_to_reference`` None).
    ``transform_ts_mismatch`` counts IMAGEs that found no pose of their instant although poses
    arrive. Other TRANSFORMs (e.g. ``ProbeToTracker``) are kept, latest per name: :meth:`pose`.

    Only one image device is used: ``image_device``, or the first IMAGE device seen.
    A dropped or stalled connection (no whole message for ``stall_timeout_s``) is counted and
    retried (backoff ``backoff_s`` doubling to ``backoff_max_s``) while ``reconnect``; otherwise, or
    after ``stop()``, the thread ends and closes ``slot``. A sender that keeps the connection
    alive (STATUS keep-alives, TRANSFORMs) but sends no IMAGE for ``stall_timeout_s`` is not
    stalled: each such spell is counted in ``keepalive_only`` and logged (the sinks tell Slicer
    the overlay is stale).

    Args:
        host, port: the server (PLUS: 18944).
        slot: where Frames go; a new LatestSlot by default.
        image_device: IMAGE device name to use (PLUS: ``Image_Reference``); None: first seen.
        transform_device: TRANSFORM device carrying the pose; None: always the IMAGE matrix.
        reconnect: reconnect after a failed or dropped connection.
        poll_s: socket timeout in s: only bounds how long stop() can take if shutdown() is missed.
        connect_timeout_s: TCP connect timeout in s.
        max_image_bytes: IMAGE bodies above this are refused from their header, never buffered
            (:func:`~regseg.stream.igtl.wire.image_body_limit` of the largest frame accepted).
        max_body_bytes: the same for types other than IMAGE, TRANSFORM and STATUS (which have
            :data:`SMALL_BODY_BYTES`); they are skipped anyway.
        verify_crc: see :class:`~regseg.stream.igtl.wire.MessageReader`.
        stall_timeout_s: seconds without a whole message after which the connection is dropped
            (None: never).
        backoff_s, backoff_max_s: first and longest wait between connection attempts, s.
        pairer: the image/pose pairing (default: :class:`TimestampPairer` with its defaults).
        expect_images: False for a pose-only source (``--pose-source``): no keep-alive-only
            reports, as IMAGEs are not expected.
    """

    knows_truth = False

    def __init__(
        self,
        host: str,
        port: int,
        slot: LatestSlot[Frame] | None = None,
        image_device: str | None = None,
        transform_device: str | None = "ImageToReference",
        reconnect: bool = True,
        *,
        poll_s: float = 0.5,
        connect_timeout_s: float = 2.0,
        max_image_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_body_bytes: int = SMALL_BODY_BYTES,
        verify_crc: bool = True,
        stall_timeout_s: float | None = STALL_TIMEOUT_S,
        backoff_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        pairer: TimestampPairer[ImageMessage] | None = None,
        expect_images: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.slot: LatestSlot[Frame] = slot if slot is not None else LatestSlot()
        self.image_device = image_device
        self.transform_device = transform_device
        self.reconnect = reconnect
        self.poll_s = poll_s
        self.connect_timeout_s = connect_timeout_s
        self.max_body_bytes = max_body_bytes
        self.body_limits = {"IMAGE": max_image_bytes, "TRANSFORM": SMALL_BODY_BYTES,
                            "STATUS": SMALL_BODY_BYTES}
        self.verify_crc = verify_crc
        self.stall_timeout_ns = None if not stall_timeout_s else int(stall_timeout_s * 1e9)
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.pairer: TimestampPairer[ImageMessage] = pairer or TimestampPairer()
        self.expect_images = expect_images
        self.wire = WireStats()
        self.frames = 0
        self.connects = 0
        self.reconnects = 0  # connection attempts after a failure or a drop
        self.disconnects = 0  # connections lost after being made
        self.connect_failures = 0
        self.bad_frames = 0  # IMAGEs frame_from_image refused (InputError)
        self.other_devices = 0  # IMAGEs from a device other than the one in use
        self.transform_ts_mismatch = 0
        self.invalid_poses = 0  # frames made untracked because the sender flagged their pose
        self.stalls = 0  # connections dropped after stall_timeout_s without a whole message
        self.keepalive_only = 0  # spells of stall_timeout_s with messages but no IMAGE
        self.last_image_ns = 0  # when the last IMAGE arrived (0: none yet)
        self.transforms = 0  # TRANSFORM messages received, every device
        self.connected = threading.Event()
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._poses: dict[str, Pose] = {}
        self._poses_of_device = 0  # poses received from transform_device
        self._device: str | None = image_device
        self._log = RateLimitedLog(log)
        self._thread = SourceThread(self._run, f"igtl-source-{host}:{port}")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread within ``timeout`` s (shutdown() wakes a blocked read) and close slot."""
        self._thread.stop(timeout, wake=self._shutdown_socket)
        self.slot.close()

    @property
    def finished(self) -> bool:
        """True once the thread has ended (stopped, or the connection lost without reconnect)."""
        return self._thread.finished

    @property
    def device(self) -> str | None:
        """The IMAGE device in use (None until the first IMAGE when none was named)."""
        return self._device

    def pose(self, device: str | None = None) -> Pose | None:
        """The latest pose from TRANSFORM ``device`` (default: ``transform_device``), any thread."""
        return self._poses.get(device or self.transform_device or "")

    def stats(self) -> dict:
        return {
            "kind": "igtl",
            "server": f"{self.host}:{self.port}",
            "device": self._device,
            "frames": self.frames,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "disconnects": self.disconnects,
            "connect_failures": self.connect_failures,
            "bad_frames": self.bad_frames,
            "other_devices": self.other_devices,
            "transform_ts_mismatch": self.transform_ts_mismatch,
            "invalid_poses": self.invalid_poses,
            "stalls": self.stalls,
            "keepalive_only": self.keepalive_only,
            "transforms": self.transforms,
            "pairing": self.pairer.stats(),
            "wire": self.wire.as_dict(),
        }

    def _shutdown_socket(self) -> None:
        with self._sock_lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run(self) -> None:
        delay = self.backoff_s
        try:
            while not self._thread.stopping.is_set():
                received = self._session()
                if not self.reconnect or self._thread.stopping.is_set():
                    break
                # A server that delivered messages resets the backoff; one that keeps refusing
                # or dropping us at once is retried ever more slowly, up to 2 s.
                if received:
                    delay = self.backoff_s
                if self._thread.stopping.wait(delay):
                    break
                delay = min(delay * 2, self.backoff_max_s)
                self.reconnects += 1
        finally:
            self.slot.close()

    def _session(self) -> bool:
        """One connection, from connect to drop. Returns True if any message arrived."""
        try:
            sock = socket.create_connection((self.host, self.port), self.connect_timeout_s)
        except OSError as exc:
            self.connect_failures += 1
            self._log.warning("connect", f"OpenIGTLink {self.host}:{self.port}: connect failed: "
                              f"{exc}")
            return False
        with self._sock_lock:
            if self._thread.stopping.is_set():
                sock.close()
                return False
            self._sock = sock
        self.connects += 1
        self.connected.set()
        reader = MessageReader(sock, stats=self.wire, max_body_bytes=self.max_body_bytes,
                               body_limits=self.body_limits, verify_crc=self.verify_crc,
                               accept=("IMAGE", "TRANSFORM"), ignore=("STATUS",))
        before = self.wire.messages
        try:
            self._receive(sock, reader)
        except OSError as exc:  # StreamError (peer closed, out of step, stalled) or socket error
            if not self._thread.stopping.is_set():
                self.disconnects += 1
                self._log.warning("drop", f"OpenIGTLink {self.host}:{self.port}: {exc}")
        finally:
            self.connected.clear()
            with self._sock_lock:
                self._sock = None
            sock.close()
            self._emit(self.pairer.flush())
        return self.wire.messages > before

    def _receive(self, sock: socket.socket, reader: MessageReader) -> None:
        """Read until stop() or an error; raises StreamError when the sender stalls."""
        connected_ns = now_ns()
        counted_spell_ns = -1  # start of the keep-alive-only spell already counted
        while not self._thread.stopping.is_set():
            # Wake for a held image's deadline or the stall deadline, else every poll_s
            # (a timeout keeps partial data: the next read continues the message).
            now = now_ns()
            wake_ns = [int(self.poll_s * 1e9)]
            if (deadline := self.pairer.deadline_ns) is not None:
                wake_ns.append(deadline - now)
            if self.stall_timeout_ns is not None:
                wake_ns.append(reader.last_message_ns + self.stall_timeout_ns - now + 1_000_000)
            wait_ns = max(min(wake_ns), 0)
            sock.settimeout(wait_ns / 1e9)
            message = reader.read(deadline_ns=now + wait_ns)
            now = now_ns()
            if message is not None:
                self._take(message, now)
            self._emit(self.pairer.expire(now))
            if self.stall_timeout_ns is None:
                continue
            silent_ns = now - reader.last_message_ns
            if silent_ns > self.stall_timeout_ns:
                self.stalls += 1
                raise StreamError(f"no whole message for {silent_ns / 1e9:.1f} s (last byte "
                                  f"{(now - reader.last_recv_ns) / 1e9:.1f} s ago): the sender "
                                  "stalled (dropping the connection to reconnect)")
            spell_ns = max(connected_ns, self.last_image_ns)  # waiting for an IMAGE since
            if (self.expect_images and now - spell_ns > self.stall_timeout_ns
                    and spell_ns != counted_spell_ns):
                counted_spell_ns = spell_ns
                self.keepalive_only += 1
                self._log.warning("keepalive", f"OpenIGTLink {self.host}:{self.port}: messages "
                                  f"({(reader.last_type or 'keep-alives')!r}) but no IMAGE for "
                                  f"{(now - spell_ns) / 1e9:.1f} s: the sender is alive but not "
                                  "imaging")

    def _take(self, message: MessageBase, received_ns: int) -> None:
        if isinstance(message, TransformMessage):
            self.transforms += 1
            pose = Pose(np.array(message.matrix, dtype=np.float64), float(message.timestamp),
                        pose_is_valid(message.metadata), received_ns)
            name = message.device_name
            if name in self._poses or len(self._poses) < MAX_TRANSFORM_DEVICES:
                self._poses[name] = pose
            if name == self.transform_device:
                self._poses_of_device += 1
                self._emit(self.pairer.add_pose(pose))
            return
        if not isinstance(message, ImageMessage):
            return
        self.last_image_ns = received_ns
        if self._device is None:
            self._device = message.device_name
            log.info("OpenIGTLink %s:%d: using IMAGE device %r", self.host, self.port,
                     self._device)
        if message.device_name != self._device:
            self.other_devices += 1
            return
        self._emit(self.pairer.add_image(message, float(message.timestamp), received_ns))

    def _emit(self, released: list[Paired[ImageMessage]]) -> None:
        """Turn released images into Frames with their pose (see the class docstring)."""
        for paired in released:
            message, pose = paired.item, paired.pose
            tracked = True
            if pose is None:
                if self._poses_of_device:
                    self.transform_ts_mismatch += 1
                # PLUS also sends the embedded pose's status as IMAGE metadata (a frame field).
                status = message.metadata.get(f"{self.transform_device}TransformStatus")
                tracked = pose_is_valid({"TransformStatus": status} if status else None)
            elif not pose.valid:
                tracked = False
            try:
                frame = frame_from_image(message, self.frames, paired.received_ns,
                                         pose.matrix if pose is not None and tracked else None)
            except InputError as exc:
                self.bad_frames += 1
                self._log.warning("frame", f"OpenIGTLink {self.host}:{self.port}: {exc}")
                continue
            if not tracked:
                self.invalid_poses += 1
                frame = replace(frame, image_to_reference=None)
            self.slot.put(frame)
            self.frames += 1
