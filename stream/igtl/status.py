"""OpenIGTLink STATUS messages: what we tell Slicer about the stream (stale, refused, back to OK).

pyigtl has no STATUS class, so the body is packed here (status.md: C uint16, SUBCODE int64,
ERROR_NAME char[20], STATUS_MESSAGE null-terminated). Slicer shows the latest STATUS per device;
a STATUS after the overlays says whether they are current.

Protocol reference: https://github.com/openigtlink/OpenIGTLink/blob/master/Documents/Protocol/
status.md
"""

from __future__ import annotations

import struct

from regseg.clock import wall_s
from regseg.errors import InputError
from regseg.stream.igtl.codec import EXT_HEADER, HEADER_SIZE, pack_message

#: status.md codes we send (the full list: 0 invalid ... 19 shut down).
STATUS_OK = 1
STATUS_TIME_OUT = 7
STATUS_RESOURCE_ERROR = 11
STATUS_DEVICE = "regsegStatus"
_STATUS_HEAD = struct.Struct(">Hq20s")
MAX_STATUS_TEXT = 1000


def pack_status(
    code: int,
    subcode: int,
    error_name: str,
    text: str,
    *,
    device_name: str = STATUS_DEVICE,
    timestamp: float | None = None,
    header_version: int = 2,
) -> bytes:
    """A STATUS message, e.g. ``pack_status(STATUS_TIME_OUT, 3, "stale", "no frame for 3 s")``.

    Args:
        code: status.md code (1 OK, 7 time-out, 11 resource error ...).
        subcode: our detail; for a stale stream the whole seconds without a frame.
        error_name: at most 20 ASCII characters.
        text: ASCII, at most 1000 characters (sent null-terminated).
        device_name, timestamp, header_version: as :func:`~regseg.stream.igtl.codec.pack_message`
            (timestamp: now by default).
    Raises:
        InputError: a non-ASCII or too long ``error_name`` or ``text``.
    """
    if not (error_name.isascii() and len(error_name) <= 20):
        raise InputError(f"STATUS error name {error_name!r}: at most 20 ASCII characters")
    if not (text.isascii() and len(text) <= MAX_STATUS_TEXT):
        raise InputError(f"STATUS text {text[:40]!r}...: at most {MAX_STATUS_TEXT} ASCII "
                         "characters")
    content = _STATUS_HEAD.pack(code, subcode, error_name.encode()) + text.encode() + b"\0"
    return pack_message("STATUS", device_name, wall_s() if timestamp is None else timestamp,
                        content, header_version=header_version)


def unpack_status(data: bytes) -> tuple[int, int, str, str]:
    """(code, subcode, error_name, text) of a whole STATUS message (header + body), for tests and
    tools.

    Raises:
        InputError: not a STATUS message, or a body shorter than status.md's 30 fixed bytes.
    """
    kind = bytes(data[2:14]).rstrip(b"\0")
    if kind != b"STATUS":
        raise InputError(f"message type {kind!r}; STATUS expected")
    body = bytes(data[HEADER_SIZE:])
    if struct.unpack_from(">H", data)[0] >= 2:  # header v2: extended header + metadata
        ext_size, meta_header_size, meta_size, _ = EXT_HEADER.unpack_from(body)
        body = body[ext_size : len(body) - meta_header_size - meta_size]
    if len(body) < _STATUS_HEAD.size:
        raise InputError(f"STATUS body of {len(body)} bytes; at least {_STATUS_HEAD.size} expected")
    code, subcode, name = _STATUS_HEAD.unpack_from(body)
    text = body[_STATUS_HEAD.size :].split(b"\0", 1)[0]
    return code, subcode, name.rstrip(b"\0").decode("ascii", "replace"), text.decode("ascii",
                                                                                    "replace")
