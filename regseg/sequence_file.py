"""PLUS sequence files (.igs.mha, .seq.mha, .igs.nrrd, .seq.nrrd): tracked frames, read and written.

A sequence file is one MetaIO or NRRD image whose last axis is time, plus per-frame text fields
in the header: ``Seq_Frame0000_Timestamp``, ``Seq_Frame0000_ImageToReferenceTransform`` (16
numbers, row-major), ``Seq_Frame0000_ImageToReferenceTransformStatus`` (OK / INVALID) ...
Formats: https://plustoolkit.github.io/legacy/plus/FileSequenceFile (PLUS docs,
FileSequenceFile.md) and IGSIO ``vtkIGSIOMetaImageSequenceIO`` / ``vtkIGSIONrrdSequenceIO``.

Numbers we write use Python's shortest round-trip ``repr``, so a file read back gives the very
same float64 matrices and timestamps: recording is bit-exact for pixels, poses and times.
Writing is :mod:`regseg.sequence_writer` (streaming, crash-safe, recoverable).
"""

from __future__ import annotations

import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from regseg.errors import InputError
from regseg.types import Frame

SEQUENCE_EXTENSIONS = (".igs.mha", ".seq.mha", ".igs.mhd", ".seq.mhd", ".igs.nrrd", ".seq.nrrd",
                       ".igs.nhdr", ".seq.nhdr", ".mha", ".mhd", ".nrrd", ".nhdr")
_FRAME_FIELD = re.compile(r"^Seq_Frame(\d+)_(.+)$")
MET_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2",
              "MET_UINT": "u4", "MET_INT": "i4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}
_NRRD_TYPES = {"uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1",
               "signed char": "i1", "int8": "i1", "int8_t": "i1", "short": "i2", "int16": "i2",
               "ushort": "u2", "unsigned short": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
               "uint": "u4", "unsigned int": "u4", "uint32": "u4", "float": "f4", "double": "f8"}
# MetaIO fields that describe the pixel block; everything else in the header is kept as is.
# (The geometry fields are unused by PLUS: it places frames by their per-frame transforms.)
_META_FORMAT = {"ObjectType", "NDims", "BinaryData", "BinaryDataByteOrderMSB", "CompressedData",
                "CompressedDataSize", "DimSize", "ElementNumberOfChannels", "ElementType",
                "ElementDataFile", "ElementByteOrderMSB", "ElementSpacing", "AnatomicalOrientation",
                "CenterOfRotation", "Offset", "TransformMatrix"}
_NRRD_FORMAT = {"type", "dimension", "sizes", "kinds", "endian", "encoding", "data file",
                "datafile", "space dimension", "space directions", "space origin", "spacings",
                "space"}
_CHUNK = 4 << 20
#: A header line longer than this is not a PLUS header (a frame's fields are < 1 KB).
_MAX_HEADER_LINE = 1 << 20
#: Deflate packs at most 1032 bytes into 1 (258-byte matches at ~2 bits each); a header claiming
#: more pixels than its compressed data could hold is refused before anything is decompressed.
_MAX_DEFLATE_RATIO = 1032


@dataclass(slots=True)
class SequenceFrame:
    """One frame: pixels and its per-frame fields (names without ``Seq_FrameNNNN_``)."""

    pixels: np.ndarray  # (H, W) or (H, W, C), the file's dtype
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def timestamp_s(self) -> float | None:
        """``Timestamp`` (PLUS's filtered time, s), else ``UnfilteredTimestamp``, else None."""
        value = self.fields.get("Timestamp", self.fields.get("UnfilteredTimestamp"))
        return None if value is None else float(value)

    def transform(self, name: str) -> np.ndarray | None:
        """The (4, 4) ``<name>Transform`` if present and its status is OK (or absent), else None.

        Args:
            name: the transform name without the suffix, e.g. ``ImageToReference``.
        Raises:
            InputError: a value that is not 16 finite numbers.
        """
        value = self.fields.get(f"{name}Transform")
        status = self.fields.get(f"{name}TransformStatus", "OK")
        if value is None or status.strip().upper() != "OK":
            return None
        return parse_matrix(value, f"{name}Transform")


@dataclass(slots=True)
class Sequence:
    """A whole sequence: frames of one shape and dtype, and the file's other header fields."""

    frames: list[SequenceFrame]
    fields: dict[str, str] = field(default_factory=dict)  # e.g. UltrasoundImageOrientation
    element_spacing_mm: tuple[float, float] = (1.0, 1.0)  # (x = column, y = row), as in the file


def format_matrix(matrix: np.ndarray) -> str:
    """16 numbers, row-major, each the shortest text that reads back as the same float64."""
    return " ".join(repr(float(v)) for v in np.asarray(matrix, dtype=np.float64).reshape(16))


def parse_matrix(text: str, what: str = "transform") -> np.ndarray:
    """A (4, 4) float64 matrix from 16 whitespace-separated numbers (row-major)."""
    try:
        values = np.array([float(v) for v in text.split()], dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"{what} {text!r}: 16 numbers expected") from exc
    if values.size != 16 or not np.isfinite(values).all():
        raise InputError(f"{what} {text!r}: 16 finite numbers expected, got {values.size}")
    return values.reshape(4, 4)


def sequence_kind(path: Path) -> str:
    """"mha" (MetaIO) or "nrrd", from the file name; InputError for another name."""
    name = path.name.lower()
    if not name.endswith(SEQUENCE_EXTENSIONS):
        raise InputError(f"{path}: not a sequence file name; one of "
                         f"{', '.join(SEQUENCE_EXTENSIONS)} expected (e.g. session.igs.mha)")
    return "nrrd" if name.endswith((".nrrd", ".nhdr")) else "mha"


def _read_header(path: Path, kind: str) -> tuple[dict[str, str], dict[int, dict[str, str]], int]:
    """(file fields, per-frame fields by index, byte offset of the pixel data)."""
    fields: dict[str, str] = {}
    frames: dict[int, dict[str, str]] = {}
    with _open_regular(path, path, "sequence file") as f:
        first = True
        while line := f.readline(_MAX_HEADER_LINE):
            if len(line) == _MAX_HEADER_LINE and not line.endswith(b"\n"):
                raise InputError(f"{path}: a header line of more than {_MAX_HEADER_LINE} bytes; "
                                 "'key = value' lines expected (is this a PLUS sequence file?)")
            text = line.decode("latin-1").rstrip("\r\n")
            if kind == "nrrd":
                if first and not text.startswith("NRRD"):
                    raise InputError(f"{path}: does not start with a NRRD magic line")
                first = False
                if text == "":  # the blank line ends a NRRD header
                    break
                if text.startswith(("#", "NRRD")):
                    continue
                key, sep, value = text.partition(":")
                value = value[1:] if value.startswith("=") else value  # "key:=value" pairs
            else:
                key, sep, value = text.partition("=")
            if not sep:
                raise InputError(f"{path}: header line {text[:80]!r} is not 'key = value' "
                                 "(MetaIO) or 'key: value' (NRRD); is this a PLUS sequence file?")
            key, value = key.strip(), value.strip()
            if match := _FRAME_FIELD.match(key):
                frames.setdefault(int(match.group(1)), {})[match.group(2)] = value
            else:
                fields[key] = value
            if kind == "mha" and key == "ElementDataFile":  # MetaIO: always the last field
                break
        else:
            if kind == "mha":
                raise InputError(f"{path}: no ElementDataFile line ends the MetaIO header")
        return fields, frames, f.tell()


def _layout(path: Path, kind: str, fields: dict[str, str]) -> tuple[tuple[int, ...], np.dtype,
                                                                    bool, str]:
    """(sizes as (frames, H, W, C), dtype, compressed, data file or LOCAL) from the header."""
    try:
        if kind == "mha":
            dims = [int(v) for v in fields["DimSize"].split()]
            channels = int(fields.get("ElementNumberOfChannels", "1"))
            code = MET_TYPES.get(fields["ElementType"])
            if code is None:
                raise InputError(f"{path}: ElementType {fields['ElementType']!r}; one of "
                                 f"{', '.join(MET_TYPES)} expected")
            big = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False"))
            big = big.strip().lower() == "true"
            compressed = fields.get("CompressedData", "False").strip().lower() == "true"
            data_file = fields["ElementDataFile"]
            if len(dims) == 4 and dims[2] == 1:  # IGSIO writes 2-D frames as W H 1 N too
                dims = [dims[0], dims[1], dims[3]]
            if len(dims) != 3:
                raise InputError(f"{path}: DimSize {fields['DimSize']!r}; W H N (2-D frames) "
                                 "expected")
            width, height, count = dims
        else:
            sizes = [int(v) for v in fields["sizes"].split()]
            kinds = fields.get("kinds", "").lower().split()
            code = _NRRD_TYPES.get(fields["type"].strip().lower())
            if code is None:
                raise InputError(f"{path}: NRRD type {fields['type']!r}; one of "
                                 f"{', '.join(sorted(set(_NRRD_TYPES)))} expected")
            big = fields.get("endian", "little").strip().lower() == "big"
            encoding = fields.get("encoding", "raw").strip().lower()
            if encoding not in ("raw", "gz", "gzip"):
                raise InputError(f"{path}: NRRD encoding {encoding!r}; raw or gzip expected")
            compressed = encoding != "raw"
            data_file = fields.get("data file", fields.get("datafile", "LOCAL"))
            vector = bool(kinds) and kinds[0] in ("vector", "rgb-color", "rgba-color")
            channels = sizes[0] if vector else 1
            spatial = sizes[1:] if vector else sizes
            if len(spatial) == 4 and spatial[2] == 1:
                spatial = [spatial[0], spatial[1], spatial[3]]
            if len(spatial) != 3:
                raise InputError(f"{path}: NRRD sizes {fields['sizes']!r} kinds {kinds}; 2-D "
                                 "frames over time expected")
            width, height, count = spatial
    except KeyError as exc:
        raise InputError(f"{path}: header field {exc} is missing") from exc
    except ValueError as exc:
        raise InputError(f"{path}: unreadable size in the header: {exc}") from exc
    dtype = np.dtype(code).newbyteorder(">" if big else "<")
    return (count, height, width, channels), dtype, compressed, data_file


def read_sequence(path: str | os.PathLike) -> Sequence:
    """Read a PLUS sequence file (MetaIO .mha/.mhd or NRRD .nrrd/.nhdr, raw or compressed).

    Raises:
        InputError: an unknown extension, a malformed header, or pixel data whose size does not
            match the header (the message names the file and both sizes).
    """
    path = Path(path)
    kind = sequence_kind(path)
    try:
        fields, frame_fields, offset = _read_header(path, kind)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc
    (count, height, width, channels), dtype, compressed, data_file = _layout(path, kind, fields)
    source = path if data_file.upper() == "LOCAL" else _data_path(path, kind, data_file)
    start = offset if data_file.upper() == "LOCAL" else 0
    expected = count * height * width * channels * dtype.itemsize
    what = f"the header's {count} frames of {width}x{height}x{channels} {dtype} need {expected}"
    try:
        with _open_regular(source, path, "pixel data") as f:
            f.seek(start)
            size = os.fstat(f.fileno()).st_size - start
            if not compressed:
                if size != expected:  # checked before reading: nothing is read past the pixels
                    raise InputError(f"{path}: {max(size, 0)} bytes of pixels; {what}")
                data = f.read(expected)
            else:
                data = _inflate(f, path, kind, size, expected, what)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the pixel data in {source} ({exc})") from exc
    if len(data) != expected:
        raise InputError(f"{path}: {len(data)} bytes of pixels; {what}")
    shape = (count, height, width, channels) if channels > 1 else (count, height, width)
    pixels = np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    frames = [SequenceFrame(pixels[i], frame_fields.get(i, {})) for i in range(count)]
    fmt = _META_FORMAT if kind == "mha" else _NRRD_FORMAT
    return Sequence(frames, {k: v for k, v in fields.items() if k not in fmt},
                    _element_spacing(fields.get("ElementSpacing", fields.get("spacings", "")),
                                     path))


def _open_regular(source: Path, path: Path, what: str):
    """``source`` opened for binary reading, refused unless it is a regular file (a device such
    as /dev/zero or a FIFO would feed the reader for ever; O_NONBLOCK: opening a FIFO must not
    wait for a writer)."""
    try:
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot open the {what} {source} ({exc})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"{path}: the {what} {source} is not a regular file (mode "
                         f"{stat.filemode(mode)}); a file on disk expected")
    return os.fdopen(fd, "rb")


def _data_path(path: Path, kind: str, data_file: str) -> Path:
    """The detached pixel file a header names: a file in the header's folder or below it.

    Our writer only writes LOCAL (pixels after the header); a name that is absolute or climbs
    out with ``..`` would let a file picked up from elsewhere read any file on the machine.
    """
    field = "ElementDataFile" if kind == "mha" else "data file"
    name = Path(data_file)
    if not data_file or name.is_absolute() or ".." in name.parts:
        raise InputError(f"{path}: {field} {data_file!r}; LOCAL or a file name relative to the "
                         "header's folder, without '..', expected")
    return path.parent / name


def _inflate(f, path: Path, kind: str, size: int, expected: int, what: str) -> bytearray:
    """Decompress at most ``expected`` + 1 bytes from ``f`` (a zlib stream, or gzip members for
    NRRD), reading it in chunks: a zip bomb costs at most what the header says the pixels
    take, and a header claiming more than ``size`` compressed bytes can hold is refused at once.
    """
    if expected > _MAX_DEFLATE_RATIO * max(size, 0) + 1024:
        raise InputError(f"{path}: {max(size, 0)} bytes of compressed pixels cannot hold what "
                         f"{what} bytes (deflate packs at most {_MAX_DEFLATE_RATIO}:1)")
    wbits = 16 + zlib.MAX_WBITS if kind == "nrrd" else zlib.MAX_WBITS
    inflate = zlib.decompressobj(wbits)
    out = bytearray()
    try:
        while chunk := f.read(_CHUNK):
            while chunk:
                if inflate.eof:  # after a zlib stream MetaIO ignores the rest (as zlib does);
                    if kind != "nrrd":  # a NRRD gzip file may hold several members
                        return out
                    if not chunk.strip(b"\0"):  # zero padding after the last member
                        break
                    inflate = zlib.decompressobj(wbits)
                # max_length is >= 1 here (0 would mean "no limit")
                out += inflate.decompress(chunk, expected + 1 - len(out))
                if len(out) > expected:
                    raise InputError(f"{path}: compressed pixels decompress to more than "
                                     f"{expected} bytes; {what} (a corrupt or hostile file)")
                chunk = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
    except zlib.error as exc:
        raise InputError(f"{path}: compressed pixel data does not decompress: {exc}") from exc
    if not inflate.eof:
        raise InputError(f"{path}: compressed pixel data does not decompress: the stream ends "
                         f"early after {len(out)} bytes (a truncated file?); {what}")
    return out


def _element_spacing(text: str, path: Path) -> tuple[float, float]:
    """(x, y) mm from ElementSpacing or NRRD spacings (a leading nan is a vector axis); 1 mm
    when the header has none (MetaIO's default). A value that is there but unusable is refused:
    it used to become 1 mm silently (``0.2 -0.2`` or ``inf inf``: untracked frames 5x too big)."""
    if not text.strip():
        return (1.0, 1.0)
    values = [v for v in text.split() if v.lower() != "nan"]
    try:
        x, y = float(values[0]), float(values[1])
    except (IndexError, ValueError):
        x = y = float("nan")
    if not (0 < x < float("inf") and 0 < y < float("inf")):
        raise InputError(f"{path}: ElementSpacing (spacings) {text.strip()[:80]!r}; positive, "
                         "finite pixel sizes in mm (x y ...) expected")
    return (x, y)


#: ITU-R BT.601 luma weights, for RGB sequences (the same as for RGB IMAGE messages).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Per-frame field regseg adds for untracked frames whose pixel size is not ElementSpacing.
SPACING_FIELD = "SpacingMm"
DEFAULT_DEVICE = "Image_Reference"


def frame_from_sequence(frame: SequenceFrame, index: int, acquired_ns: int, *,
                        transform_name: str = "ImageToReference",
                        element_spacing_mm: tuple[float, float] = (1.0, 1.0)) -> Frame:
    """One sequence frame as a Frame.

    ``seq`` is the file's ``FrameNumber`` (so gaps the recorder saw stay visible) or ``index``;
    ``image_to_reference`` the ``<transform_name>Transform`` when its status is OK, else None
    (untracked); ``spacing_mm`` (row, col) the ``SpacingMm`` field (regseg writes it when the
    pixel size is not derivable), else the column norms of that matrix, else ElementSpacing;
    ``source_ts`` the ``Timestamp`` field (0 when absent); a replay maps it through
    :class:`regseg.clock.SenderClock` (relative timestamps anchored to the wall clock).

    Raises:
        InputError: pixels that are not (H, W) uint8 grey or (H, W, 3|4) uint8 colour.
    """
    pixels = frame.pixels
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (
            pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise InputError(f"sequence frame {index}: {pixels.dtype} pixels of shape {pixels.shape};"
                         " uint8 (H, W) B-mode or (H, W, 3|4) colour expected")
    if pixels.ndim == 3:
        pixels = np.rint(pixels[..., :3].astype(np.float32) @ _LUMA).astype(np.uint8)
    matrix = frame.transform(transform_name)
    if SPACING_FIELD in frame.fields:
        row, col = (float(v) for v in frame.fields[SPACING_FIELD].split())
        spacing = (row, col)
    elif matrix is not None:
        spacing = (float(np.linalg.norm(matrix[:3, 1])), float(np.linalg.norm(matrix[:3, 0])))
    else:
        spacing = (element_spacing_mm[1], element_spacing_mm[0])
    seq = frame.fields.get("FrameNumber", "")
    return Frame(
        seq=int(seq) if seq.strip().lstrip("-").isdigit() else index,
        acquired_ns=acquired_ns,
        pixels=pixels,
        spacing_mm=spacing,
        image_to_reference=matrix,
        source_ts=frame.timestamp_s or 0.0,
        device_name=frame.fields.get("FriendlyDeviceName", DEFAULT_DEVICE),
    )
