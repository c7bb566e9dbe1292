"""OpenIGTLink messages as bytes: header v1/v2 packing, CRC64, IMAGE and TRANSFORM <-> our types.

No sockets and no threads here (framing off a socket is :mod:`regseg.stream.igtl.wire`). Message
classes, header parsing and the CRC function are pyigtl's; packing is ours so that the CRC runs in
steps and header v1 or v2 (extended header + metadata) is chosen per call.

Protocol reference: https://github.com/openigtlink/OpenIGTLink/blob/master/Documents/Protocol/
(header.md, image.md, transform.md).
"""

from __future__ import annotations

import struct

import numpy as np
from pyigtl.messages import (
    CRC64,
    ImageMessage,
    MessageBase,
    TransformMessage,
    _igtl_nanosec_to_frac,
)

from regseg.errors import InputError
from regseg.types import Frame

HEADER_SIZE = 58  # header.md: V, TYPE, DEVICE_NAME, TIME_STAMP, BODY_SIZE, CRC64
HEADER = struct.Struct(">H12s20sIIQQ")
#: header.md: 1 = protocol v1/v2 (what OpenIGTLink <= 2.x and PLUS < 2.6 speak), 2 = v3.
HEADER_VERSIONS = (1, 2)
# header v2: EXT_HEADER_SIZE, META_HEADER_SIZE, META_SIZE, MSG_ID
EXT_HEADER = struct.Struct(">HHII")
# image.md: V, NUM_COMPONENTS, SCALAR_TYPE, ENDIAN, COORD, SIZE (i, j, k)
_IMAGE_HEADER = struct.Struct(">HBBBBHHH")
IMAGE_HEADER_SIZE = 72  # the above + 12 float32 (T, S, N, centre) + 6 uint16 (subvolume)
DEVICE_NAME_SIZE = 20
_CRC_STEP = 128 << 10

#: ITU-R BT.601 luma weights, for RGB(A) images that must become grey B-mode.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: LPS <-> RAS: negate x and y (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _content_range(header_version: int, body: bytes | bytearray) -> tuple[int, int]:
    """(start, end) of the content in a body: header v2 wraps it in extended header + metadata."""
    if header_version < 2:
        return 0, len(body)
    if len(body) < EXT_HEADER.size:
        raise InputError(f"body of {len(body)} bytes is shorter than the 12-byte extended header")
    ext_size, meta_header_size, meta_size, _ = EXT_HEADER.unpack_from(body)
    end = len(body) - meta_header_size - meta_size
    if ext_size < EXT_HEADER.size or end < ext_size:
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
        raise InputError(f"IMAGE {name!r}: array of shape {image.shape}; (k, j, i[, c]) expected")
    slices, rows, cols, components = image.shape
    if slices != 1:
        raise InputError(f"IMAGE {name!r}: SIZE k={slices} slices (a 3-D volume); a single 2-D "
                         f"frame (k=1) is expected")
    if rows == 0 or cols == 0:
        raise InputError(f"IMAGE {name!r}: SIZE (i, j)=({cols}, {rows}) is empty")
    if image.dtype != np.uint8:
        raise InputError(f"IMAGE {name!r}: SCALAR_TYPE {image.dtype}; uint8 B-mode is expected. "
                         "Send 8-bit images (PLUS: an unsigned char B-mode channel).")
    if components == 1:
        pixels = image[0, :, :, 0]
    elif components in (3, 4):
        pixels = np.rint(image[0, :, :, :3].astype(np.float32) @ _LUMA).astype(np.uint8)
    else:
        raise InputError(f"IMAGE {name!r}: NUM_COMPONENTS {components}; 1 (grey), 3 (RGB) or "
                         f"4 (RGBA) expected")
    if image_to_reference is None:
        matrix = image_matrix_ras(msg)
    else:
        matrix = np.array(image_to_reference, dtype=np.float64)
    col_mm, row_mm = np.linalg.norm(matrix[:3, 0]), np.linalg.norm(matrix[:3, 1])
    if not (col_mm > 0 and row_mm > 0 and np.isfinite(matrix).all()):
        raise InputError(f"IMAGE {name!r}: image_to_reference has pixel axes of length "
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


def check_header_version(header_version: int) -> int:
    """Return ``header_version`` if it is 1 or 2, else raise InputError saying which to choose."""
    if header_version not in HEADER_VERSIONS:
        raise InputError(f"header_version {header_version!r}; 1 (for OpenIGTLink <= 2.x receivers, "
                         "e.g. Debian's 1.11 library) or 2 (Slicer, PLUS) expected")
    return header_version


def pack_message(
    message_type: str,
    device_name: str,
    timestamp: float,
    content: bytes,
    *,
    header_version: int = 2,
    metadata: dict[str, str] | None = None,
    message_id: int = 0,
) -> bytes:
    """Header + body of any message type around already packed ``content``.

    The layout is pyigtl's ``MessageBase.pack`` (byte-identical, tested), with the CRC in steps
    (see :func:`crc64`) and one join instead of repeated ``bytes +``. With header v1 there is no
    extended header and ``metadata`` is not sent (header.md: metadata needs header v2).

    Args:
        message_type: TYPE, at most 12 ASCII characters (IMAGE, TRANSFORM, POLYDATA, ...).
        device_name: DEVICE_NAME, at most 20 ASCII characters.
        timestamp: seconds since 1970, 0 <= t < 2**32 (32.32 fixed point on the wire).
        content: the message content (image.md, transform.md, polydata.md ...).
        header_version: 1 or 2.
        metadata: ASCII key/value strings (header v2 only).
        message_id: MSG_ID of the extended header (header v2 only).
    Raises:
        InputError: a bad header version, timestamp, name or metadata (the message says which).
    """
    check_header_version(header_version)
    check_device_name(device_name)
    timestamp = float(timestamp)
    if not 0 <= timestamp < 2**32:
        raise InputError(f"timestamp {timestamp} s; 0 <= t < 2**32 s since 1970 expected")
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
        ext = EXT_HEADER.pack(EXT_HEADER.size, len(meta_header), len(meta_body), message_id)
        parts = [ext, content, meta_header, meta_body]
    crc = 0
    for part in parts:
        crc = crc64(part, crc)
    seconds = int(timestamp)
    # TIME_STAMP is 32.32 fixed point; the same fraction arithmetic as pyigtl's pack.
    frac = _igtl_nanosec_to_frac(int((timestamp - seconds) * 10**9))
    header = HEADER.pack(header_version, message_type.encode("ascii"),
                         device_name.encode("ascii"), seconds, frac,
                         sum(len(p) for p in parts), crc)
    return b"".join([header, *parts])


def _pack(msg: MessageBase, header_version: int, metadata: dict[str, str] | None) -> bytes:
    return pack_message(msg.message_type, msg.device_name, msg.timestamp, msg._pack_content(),
                        header_version=header_version, metadata=metadata,
                        message_id=msg.message_id)


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
    matrix = _check_matrix(matrix, f"TRANSFORM '{device_name}'")
    msg = TransformMessage(matrix, timestamp=timestamp, device_name=device_name)
    return _pack(msg, header_version, metadata)


def wire_timestamp(data: bytes) -> float:
    """The timestamp a receiver will decode from a packed message (32.32 fixed point, header.md)."""
    return MessageBase.parse_header(bytes(data[:HEADER_SIZE]))["timestamp"]
