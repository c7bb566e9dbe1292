"""The OpenIGTLink client source: IMAGE (+ TRANSFORM) messages from PLUS or a scanner, as Frames."""

from __future__ import annotations

import logging
import socket
import threading

import numpy as np
from pyigtl.messages import ImageMessage, MessageBase, TransformMessage

from regseg.clock import now_ns
from regseg.errors import InputError
from regseg.stream.igtl_wire import (
    DEFAULT_MAX_BODY_BYTES,
    MessageReader,
    RateLimitedLog,
    WireStats,
    frame_from_image,
)
from regseg.stream.slot import LatestSlot
from regseg.types import Frame

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0


class IgtlSource:
    """Connects to an OpenIGTLink server and puts each IMAGE, as a Frame, into ``slot``.

    The pose (``image_to_reference``) is the latest TRANSFORM named ``transform_device`` once one
    has arrived, else the IMAGE's own matrix (PLUS embeds ImageToReference in ``Image_Reference``).
    A TRANSFORM applies to the IMAGEs that follow it: a sender should send the pose first (PLUS
    sends in its client-info order); ``transform_ts_mismatch`` counts IMAGEs whose pose carried a
    different timestamp.

    Only one image device is used: ``image_device``, or the first IMAGE device seen.
    A dropped connection is counted and retried (backoff 0.1 s doubling to 2 s) while
    ``reconnect``; otherwise, or after ``stop()``, the thread ends and closes ``slot``.

    Args:
        host, port: the server (PLUS: 18944).
        slot: where Frames go; a new LatestSlot by default.
        image_device: IMAGE device name to use (PLUS: ``Image_Reference``); None: first seen.
        transform_device: TRANSFORM device carrying the pose; None: always the IMAGE matrix.
        reconnect: reconnect after a failed or dropped connection.
        poll_s: socket timeout in s: only bounds how long stop() can take if shutdown() is missed.
        connect_timeout_s: TCP connect timeout in s.
        max_body_bytes, verify_crc: see :class:`~regseg.stream.igtl_wire.MessageReader`.
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
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        verify_crc: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.slot: LatestSlot[Frame] = slot if slot is not None else LatestSlot()
        self.image_device = image_device
        self.transform_device = transform_device
        self.reconnect = reconnect
        self.poll_s = poll_s
        self.connect_timeout_s = connect_timeout_s
        self.max_body_bytes = max_body_bytes
        self.verify_crc = verify_crc
        self.wire = WireStats()
        self.frames = 0
        self.connects = 0
        self.reconnects = 0  # connection attempts after a failure or a drop
        self.disconnects = 0  # connections lost after being made
        self.connect_failures = 0
        self.bad_frames = 0  # IMAGEs frame_from_image refused (InputError)
        self.other_devices = 0  # IMAGEs from a device other than the one in use
        self.transform_ts_mismatch = 0
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._pose: np.ndarray | None = None
        self._pose_ts = 0.0
        self._device: str | None = image_device
        self._log = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._run, name=f"igtl-source-{host}:{port}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread within ``timeout`` s (shutdown() wakes a blocked read) and close slot."""
        self._stop.set()
        with self._sock_lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.slot.close()

    @property
    def finished(self) -> bool:
        """True once the thread has ended (stopped, or the connection lost without reconnect)."""
        return self._thread.ident is not None and not self._thread.is_alive()

    @property
    def device(self) -> str | None:
        """The IMAGE device in use (None until the first IMAGE when none was named)."""
        return self._device

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
            "wire": self.wire.as_dict(),
        }

    def _run(self) -> None:
        delay = BACKOFF_FIRST_S
        try:
            while not self._stop.is_set():
                received = self._session()
                if not self.reconnect or self._stop.is_set():
                    break
                # A server that delivered messages resets the backoff; one that keeps refusing
                # or dropping us at once is retried ever more slowly, up to 2 s.
                if received:
                    delay = BACKOFF_FIRST_S
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, BACKOFF_MAX_S)
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
            if self._stop.is_set():
                sock.close()
                return False
            self._sock = sock
        self.connects += 1
        self.connected.set()
        sock.settimeout(self.poll_s)
        reader = MessageReader(sock, stats=self.wire, max_body_bytes=self.max_body_bytes,
                               verify_crc=self.verify_crc, accept=("IMAGE", "TRANSFORM"))
        before = self.wire.messages
        try:
            while not self._stop.is_set():
                message = reader.read()
                if message is not None:
                    self._take(message, now_ns())
        except OSError as exc:  # StreamError (peer closed, out of step) or a socket error
            if not self._stop.is_set():
                self.disconnects += 1
                self._log.warning("drop", f"OpenIGTLink {self.host}:{self.port}: {exc}")
        finally:
            self.connected.clear()
            with self._sock_lock:
                self._sock = None
            sock.close()
        return self.wire.messages > before

    def _take(self, message: MessageBase, acquired_ns: int) -> None:
        if isinstance(message, TransformMessage):
            if message.device_name == self.transform_device:
                self._pose = np.array(message.matrix, dtype=np.float64)
                self._pose_ts = message.timestamp
            return
        if not isinstance(message, ImageMessage):
            return
        if self._device is None:
            self._device = message.device_name
            log.info("OpenIGTLink %s:%d: using IMAGE device '%s'", self.host, self.port,
                     self._device)
        if message.device_name != self._device:
            self.other_devices += 1
            return
        if self._pose is not None and self._pose_ts != message.timestamp:
            self.transform_ts_mismatch += 1
        try:
            frame = frame_from_image(message, self.frames, acquired_ns, self._pose)
        except InputError as exc:
            self.bad_frames += 1
            self._log.warning("frame", f"OpenIGTLink {self.host}:{self.port}: {exc}")
            return
        self.slot.put(frame)
        self.frames += 1
