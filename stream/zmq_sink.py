"""The ZeroMQ sink: each Result as a JSON header plus the raw overlay and label buffers (no pickle).

Message, multipart: ``[topic, header_json, overlay_bytes, labels_bytes, mri_labels_bytes]``. The
header says each buffer's shape and dtype (C order), so any language can rebuild the arrays; see
:func:`decode_parts`. ``mri_labels`` are the MRI labels through the full registration (affine +
deformable), all zero on a flagged frame (never sent as truth). The header carries the trust
fields: ``flagged``, ``flags``, ``error_mm``, ``seg_confidence``, and the biopsy target
``target_mm`` (MRI lesion centroid, Reference frame mm; null when not in view or flagged) with
``target_margin_mm``. Format version 2 (version 1 had no mri_labels part and no trust fields).
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import zmq

from regseg.clock import wall_s
from regseg.errors import InputError, StreamError
from regseg.stream.igtl.sink import target_mm
from regseg.stream.igtl.wire import RateLimitedLog
from regseg.stream.sink_thread import SinkThread
from regseg.types import Result

log = logging.getLogger(__name__)

TOPIC = b"regseg"
#: The longest message a subscriber may send us (a subscription: one byte and a topic prefix).
MAX_SUBSCRIPTION_BYTES = 4096
FORMAT_VERSION = 2
BUFFERS = ("overlay", "labels", "mri_labels")
_ALLOWED_DTYPES = {"uint8", "int8", "uint16", "int16", "int32", "uint32", "float32", "float64"}


def _number(value: float) -> float | None:
    """JSON has no NaN or infinity: send null instead (strict parsers reject NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _matrix(matrix: np.ndarray | None) -> list[list[float]] | None:
    return None if matrix is None else np.asarray(matrix, dtype=np.float64).tolist()


def result_header(result: Result) -> dict:
    """The JSON-able description of a Result: ids, times, geometry, quality and both buffers."""
    frame = result.frame
    target = target_mm(result)
    return {
        "v": FORMAT_VERSION,
        "seq": frame.seq,
        "source_ts": frame.source_ts,  # sender's wall clock, s since 1970
        "acquired_ns": frame.acquired_ns,  # our monotonic clock at receipt, ns
        "sent_ts": wall_s(),  # our wall clock when published, s since 1970
        "device_name": frame.device_name,
        "overlay": {"shape": list(result.overlay.shape), "dtype": str(result.overlay.dtype)},
        "labels": {"shape": list(result.labels.shape), "dtype": str(result.labels.dtype)},
        "spacing_mm": [float(s) for s in frame.spacing_mm],  # (row, col)
        # MRI RAS mm -> frame pixel (i, j, k); null when flagged: never published as truth
        "mri_to_image": None if result.flagged else _matrix(result.mri_to_image),
        "image_to_reference": _matrix(frame.image_to_reference),  # null when untracked
        "quality": _number(result.quality),
        "flagged": bool(result.flagged),
        "flags": list(result.flags),
        "error_mm": _number(result.error_mm),  # estimated registration error
        "seg_confidence": _number(result.seg_confidence),
        "jump_mm": _number(result.jump_mm),
        # do no harm (regseg.stream.do_no_harm): "registered" or "tracked" (registration
        # withheld), and QualityNet's estimates of both alignments (null: gate off)
        "correction": result.correction,
        "error_tracked_mm": _number(result.error_tracked_mm),
        "error_registered_mm": _number(result.error_registered_mm),
        # the image-based refinement (--lc2): how far it moved the network's plane at the
        # gland, mm (null: off, or it applied no move)
        "lc2_move_mm": _number(result.lc2_move_mm),
        # its LC2 over the chance level; a move is applied only at >= 1.5 (null: not computed)
        "lc2_significance": _number(result.lc2_significance),
        # the 3-D consensus of recent frames: this plane's offset along its normal, mm (null:
        # off, or not enough distinct planes yet); above 3 mm the frame is flagged out_of_plane
        "out_of_plane_mm": _number(result.out_of_plane_mm),
        # the sweep behind it: distinct planes since the registration, and whether the sweep
        # that checks the registration along the normals is still to be made (null: off)
        "sweep_planes": None if result.sweep_pending is None else int(result.sweep_planes),
        "sweep_pending": result.sweep_pending,
        # --estimate-check: "pending k/N", "passed" or "failed" (null: off); after
        # "failed" (and --estimate-check on) every frame is flagged estimate_unverified
        "estimate_check": getattr(result, "estimate_check", None),
        # the registration it suggests (Reference mm -> MRI mm; null: none): never applied here
        "suggested_reference_to_mri": _matrix(result.suggested_reference_to_mri),
        # what the labels part is: "network", "network+mri" (--seg-prior) or "withheld"
        "labels_source": result.labels_source,
        "mri_labels": {"shape": list(result.warped_labels.shape),
                       "dtype": str(result.warped_labels.dtype)},
        "target_mm": None if target is None else [float(v) for v in target],
        "target_ij": None if result.target_ij is None or result.flagged
        else [float(v) for v in result.target_ij],
        "target_margin_mm": _number(result.target_margin_mm),
        "timings_ms": {k: _number(v) for k, v in result.timings_ms.items()},
    }


def encode(result: Result, topic: bytes = TOPIC) -> list:
    """The multipart message for ``result``; the array parts are zero-copy views when contiguous."""
    header = json.dumps(result_header(result), allow_nan=False).encode("utf-8")
    overlay = np.ascontiguousarray(result.overlay)
    labels = np.ascontiguousarray(result.labels)
    mri_labels = (np.zeros_like(result.warped_labels) if result.flagged
                  else np.ascontiguousarray(result.warped_labels))
    return [topic, header, memoryview(overlay).cast("B"), memoryview(labels).cast("B"),
            memoryview(mri_labels).cast("B")]


def _array(part, spec: dict, what: str) -> np.ndarray:
    try:
        dtype, shape = str(spec["dtype"]), tuple(int(n) for n in spec["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{what}: header entry {spec!r}; {{'shape': [...], 'dtype': ...}} "
                         "expected") from exc
    if dtype not in _ALLOWED_DTYPES:
        raise InputError(f"{what}: dtype {dtype!r}; one of {sorted(_ALLOWED_DTYPES)} expected")
    buffer = memoryview(part).cast("B")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(buffer) != expected:
        raise InputError(f"{what}: {len(buffer)} bytes for shape {shape} {dtype}; "
                         f"{expected} expected")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def decode(parts: list) -> tuple[dict, np.ndarray, np.ndarray]:
    """Rebuild (header, overlay, labels) from a received multipart message (see
    :func:`decode_parts` for all buffers, the MRI labels included)."""
    header, arrays = decode_parts(parts)
    return header, arrays["overlay"], arrays["labels"]


def decode_parts(parts: list) -> tuple[dict, dict[str, np.ndarray]]:
    """Rebuild (header, {"overlay", "labels", "mri_labels"}) from a received multipart message.

    ``parts`` may be bytes or zmq.Frame objects (``recv_multipart(copy=False)``); the arrays are
    read-only views of them, not copies.

    Raises:
        InputError: not 5 parts, a header that is not JSON, or a buffer that does not match its
            declared shape and dtype.
    """
    if len(parts) != 2 + len(BUFFERS):
        raise InputError(f"regseg ZMQ message has {len(parts)} parts; {2 + len(BUFFERS)} "
                         "expected (topic, header, overlay, labels, mri_labels)")
    try:
        header = json.loads(bytes(memoryview(parts[1])))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"regseg ZMQ header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InputError(f"regseg ZMQ header is a JSON {type(header).__name__}; an object expected")
    if header.get("v") != FORMAT_VERSION:
        raise InputError(f"regseg ZMQ header version {header.get('v')!r}; "
                         f"{FORMAT_VERSION} expected")
    arrays = {name: _array(part, header.get(name, {}), name)
              for name, part in zip(BUFFERS, parts[2:], strict=True)}
    return header, arrays


class ZmqSink:
    """Publishes each Result on a ZeroMQ PUB socket, from its own thread.

    ``submit`` never blocks: Results pass to a :class:`SinkThread` (backlog dropped,
    ``skipped``); sends use NOBLOCK (``drops`` counts refusals). A PUB socket never blocks and
    drops silently per subscriber at its SNDHWM, so a slow subscriber loses messages inside
    libzmq, uncounted.

    Staleness (issue 9): when no Result has gone out for ``stale_after_s`` (and every
    ``stale_after_s`` while that lasts), a status message goes out on topic ``status.<topic>``
    (default ``status.regseg``: subscribers of the Results' topic do not get it unless they
    subscribe to it too): ``[b"status.regseg", header_json]`` with ``{"v": 1, "stale": true,
    "no_frame_for_s": ..., "last_seq": ..., "sent_ts": ...}``; the next Result is followed by one
    with ``"stale": false``. See :func:`status_parts`.

    Args:
        endpoint: where to bind, e.g. ``tcp://127.0.0.1:5556``; ``tcp://127.0.0.1:*`` picks a
            free port (the bound one is in ``.endpoint``).
        sndhwm: messages queued per subscriber before libzmq drops: small, latest matters.
        topic: first frame of every message (subscribers filter on its prefix).
        context: a zmq.Context; the process-wide instance by default.
        stale_after_s: seconds without a Result before the stale status (None: never).
        allow: IP addresses that may subscribe (ZeroMQ's ZAP handshake, on a context of the
            sink's own); None: any peer that reaches the endpoint. A subscriber can grow the
            publisher's memory (libzmq keeps every distinct subscription, ~50 bytes of memory
            per byte sent), so a sink bound beyond loopback should name its subscribers.
    Raises:
        StreamError: the endpoint cannot be bound (in use, bad address).
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5556",
        *,
        sndhwm: int = 2,
        topic: bytes = TOPIC,
        context: zmq.Context | None = None,
        stale_after_s: float | None = 1.0,
        allow: frozenset[str] | None = None,
    ) -> None:
        self.topic = topic
        self.last_seq = -1  # of the last Result published (-1: none yet)
        self._auth = None
        if allow is not None:  # one ZAP handler per context: this sink's own
            from zmq.auth.thread import ThreadAuthenticator

            context = self._own_context = zmq.Context()
            self._auth = ThreadAuthenticator(context, log=logging.getLogger(__name__ + ".zap"))
            self._auth.start()
            self._auth.allow(*sorted(allow))
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUB)
        if self._auth is not None:
            self._socket.setsockopt(zmq.ZAP_DOMAIN, b"regseg")  # NULL mechanism: ask ZAP
        # What a subscriber sends us is its subscriptions: a byte and a topic prefix. libzmq
        # builds any message whole before it looks at it, so without this cap one 16 MB message
        # grew the process by 1.9 GB (a red-team run); now the peer is disconnected.
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        # A peer that connects and never completes ZMTP's handshake holds a file handle: 5 s,
        # not libzmq's 30 s (a subscriber on the network completes it in milliseconds).
        self._socket.setsockopt(zmq.HANDSHAKE_IVL, 5000)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            self._close_auth()
            raise StreamError(f"ZMQ sink cannot bind {endpoint}: {exc}") from exc
        self.endpoint = self._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.published = 0
        self.drops = 0
        self._log = RateLimitedLog(log)
        # The socket is used only by the sink thread from here on (ZMQ sockets are not
        # thread-safe; Thread.start() is the memory barrier that hands it over), and closed after
        # it ends.
        self._thread = SinkThread(lambda result: encode(result, self.topic), self._send,
                                  name="zmq-sink", logger=log, stale_after_s=stale_after_s,
                                  on_stale=lambda idle_s: self._send_status(True, idle_s),
                                  on_fresh=lambda: self._send_status(False, 0.0))

    def submit(self, result: Result) -> None:
        """Hand ``result`` over; never blocks. Its arrays must not change after this call."""
        self._thread.submit(result)

    def close(self, timeout: float = 2.0) -> None:
        """Publish what is pending, end the thread (within ``timeout`` s), close the socket."""
        if self._thread.close(timeout):
            self._socket.close(linger=0)
            self._close_auth()

    def _close_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._own_context.term()
            self._auth = None

    def stats(self) -> dict:
        return {
            "kind": "zmq",
            "endpoint": self.endpoint,
            "submitted": self._thread.submitted,
            "published": self.published,
            "skipped": self._thread.skipped,
            "drops": self.drops,
            "encode_errors": self._thread.encode_errors,
            "stale_reports": self._thread.stale_reports,
        }

    def _send_status(self, stale: bool, no_frame_for_s: float) -> None:
        try:
            self._socket.send_multipart(status_parts(stale, no_frame_for_s, self.last_seq,
                                                     self.topic), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.drops += 1

    def _send(self, result: Result, parts: list) -> None:
        try:
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            self.published += 1
            self.last_seq = result.frame.seq
        except zmq.Again:
            self.drops += 1
        except zmq.ZMQError as exc:
            self.drops += 1
            self._log.warning("send", f"ZMQ sink: send failed: {exc}")


def status_parts(stale: bool, no_frame_for_s: float, last_seq: int,
                 topic: bytes = TOPIC) -> list[bytes]:
    """The status message ``[b"status." + topic, header_json]`` (see :class:`ZmqSink`)."""
    header = {"v": 1, "stale": bool(stale), "no_frame_for_s": round(float(no_frame_for_s), 3),
              "last_seq": int(last_seq), "sent_ts": wall_s()}
    return [b"status." + topic, json.dumps(header).encode("utf-8")]
