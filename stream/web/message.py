"""One web-view message per Result: a JSON header and the overlay as JPEG, in one binary frame.

Layout (all of it one binary WebSocket message): 4-byte big-endian header length N, N bytes of
UTF-8 JSON, then the JPEG. The header carries what the page shows beside the image: the frame's
sequence number, the trust fields (``flagged``, ``flags``, ``error_mm``, ``quality``), the
pipeline latency of this frame (receipt -> result, ms) and ``sent_ts`` (our wall clock when
encoded, s since 1970; the page measures send -> drawn against its own clock on this machine).
"""

from __future__ import annotations

import json
import math
import struct

import cv2
import numpy as np

from regseg.clock import now_ns, wall_s
from regseg.errors import InputError
from regseg.types import Result

#: JPEG quality: q80 of a 256 x 256 overlay is ~0.5 ms and ~10 kB here (notes research-wave2 §6:
#: q70 0.39 ms / 9 kB, q85 0.64 ms / 12 kB with cv2 on one thread).
JPEG_QUALITY = 80
_LENGTH = struct.Struct(">I")


def _number(value: float | None) -> float | None:
    """JSON has no NaN: None instead."""
    if value is None:
        return None
    value = float(value)
    return round(value, 3) if math.isfinite(value) else None


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes.

    Raises:
        InputError: not an (H, W, 3) uint8 array.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InputError(f"overlay of shape {rgb.shape} {rgb.dtype}; (H, W, 3) uint8 expected")
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise InputError(f"overlay of shape {rgb.shape}: JPEG encoding failed")
    return jpeg.tobytes()


def pack(header: dict, jpeg: bytes) -> bytes:
    """The binary message: length-prefixed JSON header, then the JPEG."""
    head = json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return _LENGTH.pack(len(head)) + head + jpeg


def unpack(message: bytes) -> tuple[dict, bytes]:
    """(header, jpeg) of a message made by :func:`pack` (tests, Python clients).

    Raises:
        InputError: too short, or a header that is not a JSON object.
    """
    if len(message) < _LENGTH.size:
        raise InputError(f"web message of {len(message)} bytes; at least 4 expected")
    (n,) = _LENGTH.unpack_from(message)
    if n > len(message) - _LENGTH.size:
        raise InputError(f"web message header length {n} > the {len(message) - 4} bytes left")
    try:
        header = json.loads(message[4:4 + n])
    except ValueError as exc:
        raise InputError(f"web message header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InputError("web message header is not a JSON object")
    return header, message[4 + n:]


def result_message(result: Result, session: str, quality: int = JPEG_QUALITY) -> bytes:
    """The web-view message of one Result of ``session``."""
    frame = result.frame
    jpeg = encode_jpeg(result.overlay, quality)
    header = {
        "session": session,
        "seq": int(frame.seq),
        "hw": [int(result.overlay.shape[0]), int(result.overlay.shape[1])],
        "latency_ms": _number((now_ns() - frame.acquired_ns) / 1e6),  # receipt -> encoded
        "sent_ts": wall_s(),
        "flagged": bool(result.flagged),
        "flags": list(result.flags),
        "error_mm": _number(result.error_mm),
        "quality": _number(result.quality),
        "tracked": frame.image_to_reference is not None,
    }
    return pack(header, jpeg)
