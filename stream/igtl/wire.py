"""OpenIGTLink framing: whole messages off a socket, every anomaly dropped, counted and survived.

No threads here. Message bytes (packing, CRC64, IMAGE and TRANSFORM conversion) live in
:mod:`regseg.stream.igtl.codec`.
The socket handling is ours, because pyigtl's loops poll with 10 ms sleeps, concatenate ``bytes``
and never verify the CRC.

Protocol reference: https://github.com/openigtlink/OpenIGTLink/blob/master/Documents/Protocol/
(header.md).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass

from pyigtl.messages import MessageBase, message_type_to_class_constructor

from regseg.clock import now_ns
from regseg.errors import StreamError
from regseg.stream.igtl.codec import (
    HEADER,
    HEADER_SIZE,
    HEADER_VERSIONS,
    IMAGE_HEADER_SIZE,
    check_image_body,
    crc64,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 << 20  # bodies above this are skipped unread (counted as oversize)
DEFAULT_DISCARD_CAP_BYTES = 1 << 30  # above this a BODY_SIZE is taken as a corrupt stream: close
#: Room for the v2 extended header and metadata around an IMAGE's content (PLUS sends ~200 B).
IMAGE_METADATA_ALLOWANCE = 64 << 10
#: Bytes per pixel of the largest IMAGE we can use: RGBA uint8 (frame_from_image takes uint8 only).
MAX_BYTES_PER_PIXEL = 4
_DISCARD_CHUNK = 256 << 10
_MAX_TYPES_NAMED = 64


@dataclass(slots=True)
class WireStats:
    """What one or more MessageReaders saw. Each reader thread should own its own instance."""

    messages: int = 0  # decoded and returned
    bytes: int = 0  # every byte received, headers included
    bad_crc: int = 0  # body CRC64 did not match the header: message dropped
    unknown_type: int = 0  # type pyigtl cannot decode, or not in the reader's ``accept``: skipped
    oversize: int = 0  # BODY_SIZE above the type's body limit: skipped unread
    malformed: int = 0  # header or body that does not parse: message dropped
    ignored: int = 0  # types in the reader's ``ignore`` (STATUS keep-alives ...): skipped unread
    last_error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def add(self, other: WireStats) -> None:
        """Accumulate ``other``'s counters into this one (for totals over connections)."""
        for name in ("messages", "bytes", "bad_crc", "unknown_type", "oversize", "malformed",
                     "ignored"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.last_error = other.last_error or self.last_error


class RateLimitedLog:
    """Logs a warning per key at most once every ``interval_s`` s, saying how many it held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) < self._interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        self._logger.warning("%s%s", message, f" ({held} more like it not logged)" if held else "")


def image_body_limit(max_pixels: int) -> int:
    """The largest IMAGE body worth reading for frames of at most ``max_pixels`` pixels: RGBA uint8
    pixels, the 72-byte image header and room for the v2 extended header and metadata. A bigger
    BODY_SIZE is refused from the header, before a byte of the body is buffered."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels {max_pixels}; at least 1 expected")
    return IMAGE_HEADER_SIZE + max_pixels * MAX_BYTES_PER_PIXEL + IMAGE_METADATA_ALLOWANCE


def _control_characters(text: str) -> str:
    """The control characters in ``text`` (C0, DEL, C1), each once, in order of appearance.

    TYPE and DEVICE_NAME are ASCII in practice (PLUS and Slicer send ``Image_Reference``,
    ``ImageToReference``); a CR, LF or ESC in one is a malformed or hostile message. Printable
    non-ASCII (UTF-8) names are left alone. pyigtl has already cut the NUL/space padding.
    """
    return "".join(dict.fromkeys(ch for ch in text if ch < " " or "\x7f" <= ch <= "\x9f"))


_HEADER_PHASE, _BODY_PHASE, _DISCARD_PHASE = 0, 1, 2


class MessageReader:
    """Reads whole OpenIGTLink messages from a connected socket, one ``read()`` at a time.

    Bytes go straight into a preallocated buffer with ``recv_into``; a socket timeout in the middle
    of a message keeps what has arrived, and the next ``read()`` continues where this one stopped.
    Bad CRCs, unknown types, oversize and malformed messages are dropped and counted; the stream
    stays in step because BODY_SIZE always says where the next header starts. Works on blocking
    sockets with a timeout and on non-blocking ones (a would-block read returns None).

    Args:
        sock: a connected stream socket; its timeout (if any) bounds how long ``read()`` blocks.
        stats: counters to update (a new WireStats by default), see :class:`WireStats`.
        max_body_bytes: larger bodies are read and discarded in chunks, counted as ``oversize``.
        body_limits: per-type body limits that replace ``max_body_bytes`` for those types, e.g.
            ``{"IMAGE": image_body_limit(max_pixels), "TRANSFORM": 64 << 10}``.
        discard_cap_bytes: a BODY_SIZE above this means the stream is corrupt: StreamError.
        verify_crc: check each body's CRC64 (ECMA-182; ~3 ms per MB with crcmod's C extension).
        accept: message types to decode (default: every type pyigtl knows); others are skipped.
        ignore: types that are expected but not needed (STATUS keep-alives, STT_/GET_ queries):
            skipped by size and counted as ``ignored``, not as ``unknown_type``.
        initial_capacity: starting buffer size in bytes; it grows (never past max_body_bytes).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        stats: WireStats | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_limits: Mapping[str, int] | None = None,
        discard_cap_bytes: int = DEFAULT_DISCARD_CAP_BYTES,
        verify_crc: bool = True,
        accept: Collection[str] | None = None,
        ignore: Collection[str] = (),
        initial_capacity: int = 1 << 20,
    ) -> None:
        self.sock = sock
        self.stats = stats if stats is not None else WireStats()
        self.max_body_bytes = max_body_bytes
        self.body_limits = dict(body_limits or {})
        largest = max([max_body_bytes, *self.body_limits.values()])
        self.discard_cap_bytes = max(discard_cap_bytes, largest)
        self.verify_crc = verify_crc
        self.accept = frozenset(accept) if accept is not None else None
        self.ignore = frozenset(ignore)
        self._header = bytearray(HEADER_SIZE)
        self._buf = bytearray(max(min(initial_capacity, largest), _DISCARD_CHUNK))
        self._phase = _HEADER_PHASE
        self._have = 0  # bytes of the current phase's target already received
        self._need = HEADER_SIZE
        self._fields: dict = {}
        self._crc = 0
        self._log = RateLimitedLog(log)
        self._unknown_seen: set[str] = set()
        self.last_recv_ns = now_ns()  # when bytes last arrived (creation time until then)
        # when the last whole message ended, good or skipped (creation time until then): a peer
        # trickling bytes keeps last_recv_ns fresh but never this one
        self.last_message_ns = self.last_recv_ns
        self.last_type = ""  # TYPE of the last whole message
        self._budget = 0  # bytes this read() may still take (budget_bytes); < 0: no budget
        self._deadline_ns = 0  # this read() returns by then (0: no deadline)

    def read(self, budget_bytes: int | None = None,
             deadline_ns: int | None = None) -> MessageBase | None:
        """Return the next good message, or None when the socket timed out before one was complete.

        Args:
            budget_bytes: return None (progress kept) once this call has received at least this
                many bytes, so one peer cannot keep a thread serving several busy for long.
            deadline_ns: return None (progress kept) once ``now_ns()`` passes this, although
                bytes still arrive: the socket timeout bounds each receive, not the call, and a
                peer trickling bytes would otherwise hold it for ever.

        Raises:
            StreamError: the peer closed the connection, or the stream cannot be resynchronised
                (unknown header version, BODY_SIZE above ``discard_cap_bytes``).
            OSError: any other socket error.
        """
        self._budget = -1 if budget_bytes is None else max(budget_bytes, 1)
        self._deadline_ns = deadline_ns or 0
        while True:
            if self._phase == _HEADER_PHASE:
                if not self._fill(memoryview(self._header)):
                    return None
                self._start_body()
            elif self._phase == _DISCARD_PHASE:
                while self._need > 0:
                    if self._budget == 0 or self._past_deadline():
                        return None
                    size = min(self._need, _DISCARD_CHUNK)
                    if self._budget > 0:
                        size = min(size, self._budget)
                    chunk = memoryview(self._buf)[:size]
                    self._have = 0
                    if not self._fill(chunk, partial_ok=True):
                        return None
                    self._need -= self._have
                self._next_header()
            else:
                body = memoryview(self._buf)[: self._need]
                if not self._fill(body):
                    return None
                message = self._decode(body)
                self._next_header()
                if message is not None:
                    self.stats.messages += 1
                    return message

    def _fill(self, view: memoryview, partial_ok: bool = False) -> bool:
        """recv_into ``view`` from ``self._have`` on; False on timeout (progress kept)."""
        while self._have < len(view):
            try:
                n = self.sock.recv_into(view[self._have :])
            except (TimeoutError, BlockingIOError, InterruptedError):
                return False
            if n == 0:
                between = self._phase == _HEADER_PHASE and self._have == 0
                where = "between messages" if between else "in the middle of a message"
                raise StreamError(f"OpenIGTLink peer closed the connection {where}")
            self._have += n
            self.stats.bytes += n
            self.last_recv_ns = now_ns()
            if self._budget > 0:
                self._budget = max(self._budget - n, 0)
            if partial_ok:
                return True
            if (self._budget == 0 or self._past_deadline()) and self._have < len(view):
                return False
        return True

    def _past_deadline(self) -> bool:
        return self._deadline_ns > 0 and self.last_recv_ns >= self._deadline_ns

    def _next_header(self) -> None:
        """After a whole message (decoded, dropped or skipped): wait for the next header."""
        self._phase, self._have, self._need = _HEADER_PHASE, 0, HEADER_SIZE
        self.last_message_ns = self.last_recv_ns
        self.last_type = self._fields.get("message_type", "")

    def _start_body(self) -> None:
        version, raw_type, _, _, _, body_size, self._crc = HEADER.unpack(self._header)
        # header.md: version 1 (protocol v1/v2) and 2 (v3, extended header + metadata). Any other
        # value means we are not at a header boundary (or not talking OpenIGTLink): no way back.
        if version not in HEADER_VERSIONS:
            raise StreamError(f"OpenIGTLink header version {version} (1 or 2 expected): the "
                              "stream is out of step or the peer does not speak OpenIGTLink")
        if body_size > self.discard_cap_bytes:
            raise StreamError(f"OpenIGTLink BODY_SIZE {body_size} bytes is above the "
                              f"{self.discard_cap_bytes}-byte cap: the stream is corrupt")
        self._have, self._need = 0, body_size
        self._fields = {}
        try:
            self._fields = MessageBase.parse_header(bytes(self._header))
        except UnicodeDecodeError as exc:
            self._skip("malformed", f"undecodable TYPE/DEVICE_NAME {raw_type!r}: {exc}")
            return
        kind, name = self._fields["message_type"], self._fields["device_name"]
        # Peer text is logged with repr from here on: a name must not write to our log or terminal.
        if control := _control_characters(kind + name):
            self._fields = {}  # nor reach last_type
            self._skip("malformed", f"{kind!r} {name!r} dropped: control characters "
                       f"{control!r} in TYPE/DEVICE_NAME (printable text expected)")
            return
        limit = self.body_limits.get(kind, self.max_body_bytes)
        if body_size > limit:
            self._skip("oversize", f"{kind} {name!r} body of {body_size} "
                       f"bytes is above the {limit}-byte limit for {kind}")
        elif kind in self.ignore:
            self.stats.ignored += 1
            self._phase = _DISCARD_PHASE
        elif kind not in message_type_to_class_constructor or (
            self.accept is not None and kind not in self.accept
        ):
            # Not an error: PLUS sends STATUS keep-alives every 0.25 s, Slicer sends what it
            # likes. Counted, and said once per type.
            self.stats.unknown_type += 1
            # Said once per type, for a bounded number of types: a peer sending random names
            # must not grow this set for ever.
            if kind not in self._unknown_seen and len(self._unknown_seen) < _MAX_TYPES_NAMED:
                self._unknown_seen.add(kind)
                log.info("OpenIGTLink: skipping %r messages (not decoded here)", kind)
            self._phase = _DISCARD_PHASE
        else:
            if body_size > len(self._buf):
                self._buf = bytearray(min(max(body_size, 2 * len(self._buf)), limit))
            self._phase = _BODY_PHASE

    def _skip(self, counter: str, why: str) -> None:
        """Count ``counter``, log ``why`` (rate-limited), discard the body by its size."""
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.stats.last_error = why
        self._log.warning(counter, f"OpenIGTLink: {why}")
        self._phase = _DISCARD_PHASE

    def _decode(self, body: memoryview) -> MessageBase | None:
        fields = self._fields
        what = f"{fields['message_type']} {fields['device_name']!r}"
        if self.verify_crc and crc64(body) != self._crc:
            self.stats.bad_crc += 1
            self.stats.last_error = f"{what}: CRC64 mismatch"
            self._log.warning("bad_crc", f"OpenIGTLink: {what} dropped, CRC64 does not match")
            return None
        # A private copy: pyigtl's unpack makes views of it (the IMAGE pixels), and the buffer
        # is reused for the next message. A bytearray keeps those pixels writable.
        data = bytearray(body)
        try:
            if fields["message_type"] == "IMAGE":
                check_image_body(fields, data)
            message = MessageBase.create_message(fields["message_type"])
            message.unpack(fields, data)
        except Exception as exc:  # pyigtl raises struct.error, ValueError, KeyError, ...
            self.stats.malformed += 1
            self.stats.last_error = f"{what}: {exc}"
            self._log.warning("malformed", f"OpenIGTLink: {what} dropped, malformed: {exc}")
            return None
        return message
