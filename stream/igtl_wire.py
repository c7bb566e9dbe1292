"""OpenIGTLink framing and conversion: read messages off a socket, IMAGE to Frame, pack ours.

No threads here. Message classes, header parsing and CRC64 are pyigtl's; the socket handling is
ours, because pyigtl's loops poll with 10 ms sleeps, concatenate ``bytes`` and never verify the CRC.

Protocol reference: https://github.com/openigtlink/OpenIGTLink/blob/master/Documents/Protocol/
(header.md, image.md, transform.md).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass

import numpy as np
from pyigtl.messages import (
    CRC64,
    ImageMessage,
    MessageBase,
    TransformMessage,
    _igtl_nanosec_to_frac,
    message_type_to_class_constructor,
)

from regseg.errors import InputError, StreamError
from regseg.types import Frame

log = logging.getLogger(__name__)

HEADER_SIZE = 58  # header.md: V, TYPE, DEVICE_NAME, TIME_STAMP, BODY_SIZE, CRC64
_HEADER = struct.Struct(">H12s20sIIQQ")
# header v2: EXT_HEADER_SIZE, META_HEADER_SIZE, META_SIZE, MSG_ID
_EXT_HEADER = struct.Struct(">HHII")
# image.md: V, NUM_COMPONENTS, SCALAR_TYPE, ENDIAN, COORD, SIZE (i, j, k)
_IMAGE_HEADER = struct.Struct(">HBBBBHHH")
IMAGE_HEADER_SIZE = 72  # the above + 12 float32 (T, S, N, centre) + 6 uint16 (subvolume)
DEVICE_NAME_SIZE = 20

DEFAULT_MAX_BODY_BYTES = 64 << 20  # bodies above this are skipped unread (counted as oversize)
DEFAULT_DISCARD_CAP_BYTES = 1 << 30  # above this a BODY_SIZE is taken as a corrupt stream: close
_DISCARD_CHUNK = 256 << 10
_CRC_STEP = 128 << 10

#: ITU-R BT.601 luma weights, for RGB(A) images that must become grey B-mode.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: LPS <-> RAS: negate x and y (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(slots=True)
class WireStats:
    """What one or more MessageReaders saw. Each reader thread should own its own instance."""

    messages: int = 0  # decoded and returned
    bytes: int = 0  # every byte received, headers included
    bad_crc: int = 0  # body CRC64 did not match the header: message dropped
    unknown_type: int = 0  # type pyigtl cannot decode, or not in the reader's ``accept``: skipped
    oversize: int = 0  # BODY_SIZE above max_body_bytes: skipped unread
    malformed: int = 0  # header or body that does not parse: message dropped
    last_error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def add(self, other: WireStats) -> None:
        """Accumulate ``other``'s counters into this one (for totals over connections)."""
        for name in ("messages", "bytes", "bad_crc", "unknown_type", "oversize", "malformed"):
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


_HEADER_PHASE, _BODY_PHASE, _DISCARD_PHASE = 0, 1, 2


class MessageReader:
    """Reads whole OpenIGTLink messages from a connected socket, one ``read()`` at a time.

    Bytes go straight into a preallocated buffer with ``recv_into``; a socket timeout in the middle
    of a message keeps what has arrived, and the next ``read()`` continues where this one stopped.
    Bad CRCs, unknown types, oversize and malformed messages are dropped and counted; the stream
    stays in step because BODY_SIZE always says where the next header starts.

    Args:
        sock: a connected stream socket; its timeout (if any) bounds how long ``read()`` blocks.
        stats: counters to update (a new WireStats by default), see :class:`WireStats`.
        max_body_bytes: larger bodies are read and discarded in chunks, counted as ``oversize``.
        discard_cap_bytes: a BODY_SIZE above this means the stream is corrupt: StreamError.
        verify_crc: check each body's CRC64 (ECMA-182; ~3 ms per MB with crcmod's C extension).
        accept: message types to decode (default: every type pyigtl knows); others are skipped.
        initial_capacity: starting buffer size in bytes; it grows (never past max_body_bytes).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        stats: WireStats | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        discard_cap_bytes: int = DEFAULT_DISCARD_CAP_BYTES,
        verify_crc: bool = True,
        accept: Collection[str] | None = None,
        initial_capacity: int = 1 << 20,
    ) -> None:
        self.sock = sock
        self.stats = stats if stats is not None else WireStats()
        self.max_body_bytes = max_body_bytes
        self.discard_cap_bytes = max(discard_cap_bytes, max_body_bytes)
        self.verify_crc = verify_crc
        self.accept = frozenset(accept) if accept is not None else None
        self._header = bytearray(HEADER_SIZE)
        self._buf = bytearray(max(min(initial_capacity, max_body_bytes), _DISCARD_CHUNK))
        self._phase = _HEADER_PHASE
        self._have = 0  # bytes of the current phase's target already received
        self._need = HEADER_SIZE
        self._fields: dict = {}
        self._crc = 0
        self._log = RateLimitedLog(log)
        self._unknown_seen: set[str] = set()

    def read(self) -> MessageBase | None:
        """Return the next good message, or None when the socket timed out before one was complete.

        Raises:
            StreamError: the peer closed the connection, or the stream cannot be resynchronised
                (unknown header version, BODY_SIZE above ``discard_cap_bytes``).
            OSError: any other socket error.
        """
        while True:
            if self._phase == _HEADER_PHASE:
                if not self._fill(memoryview(self._header)):
                    return None
                self._start_body()
            elif self._phase == _DISCARD_PHASE:
                while self._need > 0:
                    chunk = memoryview(self._buf)[: min(self._need, _DISCARD_CHUNK)]
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
            except (TimeoutError, BlockingIOError):
                return False
            if n == 0:
                between = self._phase == _HEADER_PHASE and self._have == 0
                where = "between messages" if between else "in the middle of a message"
                raise StreamError(f"OpenIGTLink peer closed the connection {where}")
            self._have += n
            self.stats.bytes += n
            if partial_ok:
                return True
        return True

    def _next_header(self) -> None:
        self._phase, self._have, self._need = _HEADER_PHASE, 0, HEADER_SIZE

    def _start_body(self) -> None:
        version, raw_type, _, _, _, body_size, self._crc = _HEADER.unpack(self._header)
        # header.md: version 1 (protocol v1/v2) and 2 (v3, extended header + metadata). Any other
        # value means we are not at a header boundary (or not talking OpenIGTLink): no way back.
        if version not in (1, 2):
            raise StreamError(f"OpenIGTLink header version {version} (1 or 2 expected): the "
                              "stream is out of step or the peer does not speak OpenIGTLink")
        if body_size > self.discard_cap_bytes:
            raise StreamError(f"OpenIGTLink BODY_SIZE {body_size} bytes is above the "
                              f"{self.discard_cap_bytes}-byte cap: the stream is corrupt")
        self._have, self._need = 0, body_size
        try:
            self._fields = MessageBase.parse_header(bytes(self._header))
        except UnicodeDecodeError as exc:
            self._skip("malformed", f"undecodable TYPE/DEVICE_NAME {raw_type!r}: {exc}")
            return
        kind = self._fields["message_type"]
        if body_size > self.max_body_bytes:
            self._skip("oversize", f"{kind} '{self._fields['device_name']}' body of {body_size} "
                       f"bytes is above the {self.max_body_bytes}-byte limit")
        elif kind not in message_type_to_class_constructor or (
            self.accept is not None and kind not in self.accept
        ):
            # Not an error: PLUS sends STATUS keep-alives every 0.25 s, Slicer sends what it
            # likes. Counted, and said once per type.
            self.stats.unknown_type += 1
            if kind not in self._unknown_seen:
                self._unknown_seen.add(kind)
                log.info("OpenIGTLink: skipping %r messages (not decoded here)", kind)
            self._phase = _DISCARD_PHASE
        else:
            if body_size > len(self._buf):
                self._buf = bytearray(min(max(body_size, 2 * len(self._buf)), self.max_body_bytes))
            self._phase = _BODY_PHASE

    def _skip(self, counter: str, why: str) -> None:
        """Count ``counter``, log ``why`` (rate-limited), discard the body by its size."""
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.stats.last_error = why
        self._log.warning(counter, f"OpenIGTLink: {why}")
        self._phase = _DISCARD_PHASE

    def _decode(self, body: memoryview) -> MessageBase | None:
        fields = self._fields
        what = f"{fields['message_type']} '{fields['device_name']}'"
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


def _content_range(header_version: int, body: bytes | bytearray) -> tuple[int, int]:
    """(start, end) of the content in a body: header v2 wraps it in extended header + metadata."""
    if header_version < 2:
        return 0, len(body)
    if len(body) < _EXT_HEADER.size:
        raise InputError(f"body of {len(body)} bytes is shorter than the 12-byte extended header")
    ext_size, meta_header_size, meta_size, _ = _EXT_HEADER.unpack_from(body)
    end = len(body) - meta_header_size - meta_size
    if ext_size < _EXT_HEADER.size or end < ext_size:
        raise InputError(f"extended header says EXT_HEADER_SIZE={ext_size}, metadata "
                         f"{meta_header_size}+{meta_size} bytes, in a {len(body)}-byte body")
    return ext_size, end


def check_image_body(fields: dict, body: bytes | bytearray) -> None:
    """Check an IMAGE body before pyigtl reshapes it, so the error names the field and value.

    Raises:
        InputError: unknown scalar type, a subvolume, or a pixel byte count that does not match
            SIZE x NUM_COMPONENTS x the scalar size.
    """
    start, end = _content_range(fields["header_version"], body)
    content_size = end - start
    if content_size < IMAGE_HEADER_SIZE:
        raise InputError(f"IMAGE content is {content_size} bytes, shorter than its 72-byte header")
    _, components, scalar_type, _, _, *size = _IMAGE_HEADER.unpack_from(body, start)
    if scalar_type not in ImageMessage.scalar_types:
        raise InputError(f"IMAGE SCALAR_TYPE {scalar_type} is not one of "
                         f"{sorted(ImageMessage.scalar_types)} (int8..uint32, float32, float64)")
    sub = struct.unpack_from(">6H", body, start + 60)
    if sub[:3] != (0, 0, 0) or list(sub[3:]) != size:
        raise InputError(f"IMAGE subvolume start {sub[:3]} size {sub[3:]} of an image of size "
                         f"{tuple(size)}: subvolumes are not supported, send whole images")
    itemsize = np.dtype(ImageMessage.scalar_types[scalar_type]).itemsize
    expected = size[0] * size[1] * size[2] * components * itemsize
    if content_size - IMAGE_HEADER_SIZE != expected:
        raise InputError(f"IMAGE SIZE (i, j, k)={tuple(size)} x {components} components x "
                         f"{itemsize} bytes = {expected} bytes of pixels expected, "
                         f"the body carries {content_size - IMAGE_HEADER_SIZE}")


def image_matrix_ras(msg: ImageMessage) -> np.ndarray:
    """The IMAGE's (i, j, k) -> world matrix in RAS mm, (4, 4) float64.

    OpenIGTLink IMAGE carries a coordinate-system flag (image.md: 1 RAS, 2 LPS); pyigtl exposes it
    as ``world_coordinate_system``. LPS is converted by negating the first two rows.
    """
    matrix = np.array(msg.ijk_to_world_matrix, dtype=np.float64)
    if str(msg.world_coordinate_system).lower() == "lps":
        matrix = LPS_TO_RAS @ matrix
    return matrix


def frame_from_image(
    msg: ImageMessage, seq: int, acquired_ns: int, image_to_reference: np.ndarray | None = None
) -> Frame:
    """Turn a received IMAGE into a Frame.

    Pixels: pyigtl gives (k, j, i[, c]); one slice (k = 1) becomes (H, W) = (j, i). RGB or RGBA
    uint8 becomes grey with ITU-R BT.601 luma weights (alpha ignored). Only uint8 is accepted:
    B-mode is 8-bit, and rescaling other types per frame would change intensities between frames.

    Args:
        msg: a decoded IMAGE message.
        seq: the source's frame counter.
        acquired_ns: ``regseg.clock.now_ns()`` at receipt.
        image_to_reference: (4, 4) pixel (i, j, k) -> reference mm, e.g. from a TRANSFORM
            ``ImageToReference``; default: the IMAGE's own matrix, converted to RAS.
    Returns:
        A Frame with ``spacing_mm`` = (row, col) from the column norms of ``image_to_reference``,
        ``source_ts`` = the message timestamp (s since 1970) and the message's device name.
    Raises:
        InputError: a volume (k > 1), an empty image, 2 or more than 4 components, a non-uint8
            type, or a matrix with a zero-length pixel axis; the message names the field and value.
    """
    name = msg.device_name
    image = np.asarray(msg.image)
    if image.ndim == 2:  # built locally as (j, i), not received: pyigtl always gives 3-D or 4-D
        image = image[np.newaxis]
    if image.ndim == 3:
        image = image[..., np.newaxis]
    if image.ndim != 4:
        raise InputError(f"IMAGE '{name}': array of shape {image.shape}; (k, j, i[, c]) expected")
    slices, rows, cols, components = image.shape
    if slices != 1:
        raise InputError(f"IMAGE '{name}': SIZE k={slices} slices (a 3-D volume); a single 2-D "
                         f"frame (k=1) is expected")
    if rows == 0 or cols == 0:
        raise InputError(f"IMAGE '{name}': SIZE (i, j)=({cols}, {rows}) is empty")
    if image.dtype != np.uint8:
        raise InputError(f"IMAGE '{name}': SCALAR_TYPE {image.dtype}; uint8 B-mode is expected. "
                         "Send 8-bit images (PLUS: an unsigned char B-mode channel).")
    if components == 1:
        pixels = image[0, :, :, 0]
    elif components in (3, 4):
        pixels = np.rint(image[0, :, :, :3].astype(np.float32) @ _LUMA).astype(np.uint8)
    else:
        raise InputError(f"IMAGE '{name}': NUM_COMPONENTS {components}; 1 (grey), 3 (RGB) or "
                         f"4 (RGBA) expected")
    if image_to_reference is None:
        matrix = image_matrix_ras(msg)
    else:
        matrix = np.array(image_to_reference, dtype=np.float64)
    col_mm, row_mm = np.linalg.norm(matrix[:3, 0]), np.linalg.norm(matrix[:3, 1])
    if not (col_mm > 0 and row_mm > 0 and np.isfinite(matrix).all()):
        raise InputError(f"IMAGE '{name}': image_to_reference has pixel axes of length "
                         f"(i, j)=({col_mm}, {row_mm}) mm; positive, finite spacing expected")
    return Frame(
        seq=seq,
        acquired_ns=acquired_ns,
        pixels=np.ascontiguousarray(pixels),
        spacing_mm=(float(row_mm), float(col_mm)),
        image_to_reference=matrix,
        source_ts=float(msg.timestamp),
        device_name=name,
    )


def check_device_name(device_name: str) -> None:
    """Raise InputError unless ``device_name`` fits DEVICE_NAME: at most 20 ASCII characters."""
    encoded = device_name.encode("ascii", errors="replace")
    if len(encoded) > DEVICE_NAME_SIZE or not device_name.isascii():
        raise InputError(f"device name {device_name!r}: at most {DEVICE_NAME_SIZE} ASCII "
                         "characters (header.md DEVICE_NAME is char[20])")


def _check_matrix(matrix: np.ndarray, what: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise InputError(f"{what}: shape {matrix.shape}, finite (4, 4) expected")
    return matrix


def crc64(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """OpenIGTLink's CRC64 (ECMA-182, pyigtl's crcmod function), in 128 KiB steps.

    crcmod's C loop holds the GIL (~3 ms per MB): whole-body calls on multi-MB images stall every
    other Python thread, the pipeline included. Between steps another thread can take the GIL.
    """
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _CRC_STEP):
        crc = CRC64(view[start : start + _CRC_STEP], crc)
    return crc


def _pack(msg: MessageBase, header_version: int, metadata: dict[str, str] | None) -> bytes:
    """Header + body as pyigtl's ``MessageBase.pack`` lays them out (byte-identical, tested), but
    with the CRC in steps (see :func:`crc64`) and one join instead of repeated ``bytes +``."""
    if header_version not in (1, 2):
        raise InputError(f"header_version {header_version}; 1 or 2 expected")
    timestamp = float(msg.timestamp)
    if not 0 <= timestamp < 2**32:
        raise InputError(f"timestamp {timestamp} s; 0 <= t < 2**32 s since 1970 expected")
    content = msg._pack_content()
    parts = [content]
    if header_version == 2:
        try:
            items = [(k.encode("ascii"), v.encode("ascii")) for k, v in (metadata or {}).items()]
        except (UnicodeEncodeError, AttributeError) as exc:
            raise InputError(f"metadata {metadata!r}: ASCII str keys and values expected") from exc
        # header.md (v3): INDEX_COUNT, then KEY_SIZE, VALUE_ENCODING (3 = US-ASCII), VALUE_SIZE.
        meta_header = struct.pack(">H", len(items)) + b"".join(
            struct.pack(">HHI", len(k), 3, len(v)) for k, v in items)
        meta_body = b"".join(k + v for k, v in items)
        ext = _EXT_HEADER.pack(_EXT_HEADER.size, len(meta_header), len(meta_body), msg.message_id)
        parts = [ext, content, meta_header, meta_body]
    crc = 0
    for part in parts:
        crc = crc64(part, crc)
    seconds = int(timestamp)
    # TIME_STAMP is 32.32 fixed point; the same fraction arithmetic as pyigtl's pack.
    frac = _igtl_nanosec_to_frac(int((timestamp - seconds) * 10**9))
    header = _HEADER.pack(header_version, msg.message_type.encode("ascii"),
                          msg.device_name.encode("ascii"), seconds, frac,
                          sum(len(p) for p in parts), crc)
    return b"".join([header, *parts])


def pack_image(
    array: np.ndarray,
    image_to_world: np.ndarray,
    device_name: str,
    timestamp: float,
    *,
    header_version: int = 2,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Pack an (H, W) grey or (H, W, 3) RGB uint8 image as an IMAGE message in RAS.

    Args:
        array: (H, W) or (H, W, 3) uint8; row j, column i.
        image_to_world: (4, 4) pixel (i, j, k) -> RAS mm; its column norms are the spacing.
        device_name: at most 20 ASCII characters.
        timestamp: seconds since 1970 (the frame's ``source_ts``, so receivers can match frames).
        header_version: 2 (OpenIGTLink v3, what Slicer sends) or 1 for v1-only receivers.
        metadata: ASCII key/value strings, sent only with header v2 (dropped with v1).
    """
    array = np.asarray(array)
    grey_or_rgb = array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)
    if array.dtype != np.uint8 or not grey_or_rgb:
        raise InputError(f"image to send: {array.dtype} array of shape {array.shape}; "
                         "uint8 (H, W) or (H, W, 3) expected")
    if min(array.shape[:2]) == 0 or max(array.shape[:2]) > 0xFFFF:
        raise InputError(f"image to send: shape {array.shape}; 1..65535 pixels per axis expected")
    check_device_name(device_name)
    matrix = _check_matrix(image_to_world, f"IMAGE '{device_name}' matrix")
    # pyigtl reads a 2-D array as (k, j) and a 3-D one as (k, j, i): add the k axis explicitly.
    msg = ImageMessage(array[np.newaxis], ijk_to_world_matrix=matrix, world_coordinate_system="ras",
                       timestamp=timestamp, device_name=device_name)
    return _pack(msg, header_version, metadata)


def pack_transform(
    matrix: np.ndarray,
    device_name: str,
    timestamp: float,
    *,
    header_version: int = 2,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Pack a (4, 4) matrix as a TRANSFORM message (transform.md: 3x3 column-major, then mm).

    Args: as :func:`pack_image`; only the top three rows of ``matrix`` travel (as float32).
    """
    check_device_name(device_name)
    matrix = _check_matrix(matrix, f"TRANSFORM '{device_name}'")
    msg = TransformMessage(matrix, timestamp=timestamp, device_name=device_name)
    return _pack(msg, header_version, metadata)


def wire_timestamp(data: bytes) -> float:
    """The timestamp a receiver will decode from a packed message (32.32 fixed point, header.md)."""
    return MessageBase.parse_header(bytes(data[:HEADER_SIZE]))["timestamp"]
