"""Writes PLUS sequence files as frames arrive, so that a crash or a kill loses at most one frame.

A sequence file's header lists every frame's fields before the pixels, so it can only be written
once the last frame is known. While recording, two hidden files sit beside the target:
``.NAME.partial`` (the pixels, zlib/gzip-compressed on the fly, flushed to the OS after every frame
with ``Z_SYNC_FLUSH`` so that the bytes on disk always decompress to whole frames) and
``.NAME.journal`` (one JSON line per frame with its fields and where its pixels end). ``close()``
writes header and pixels to a temporary file and renames it over the target (atomic on POSIX), then
removes both. If the process dies first (SIGKILL, power, a crash), :func:`recover_recording` turns
what is on disk into a complete file with every frame whose journal line was written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

import numpy as np

from regseg.errors import InputError
from regseg.sequence_file import MET_TYPES, Sequence, sequence_kind

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "regseg-sequence-journal/1"
_CHUNK = 4 << 20
# What a header value may hold: printable Latin-1 (the header's encoding) and tab. A CR or LF ends
# the line (a NRRD header at the first blank line); anything above U+00FF does not encode.
_BAD_VALUE = re.compile(r"[^\t\x20-\x7e\xa0-\xff]")


def header_text(text: str) -> str:
    """``text`` as printable ASCII that a header line can hold, for values a peer chose.

    Control characters (CR, LF, ESC ...) and non-ASCII characters are written as Python escapes
    (``\\n``, ``\\x1b``, ``\\u03a9``), so a scanner's device name can neither end the header
    early nor fail to encode at close. Printable ASCII is returned unchanged.
    """
    return "".join(ch if " " <= ch <= "~" else ch.encode("unicode_escape").decode("ascii")
                   for ch in str(text))


def check_fields(fields: dict, where: str) -> dict[str, str]:
    """``fields`` as str -> str, refused unless every name and value fits on one header line.

    Names: printable ASCII without ``=`` or ``:`` (the MetaIO / NRRD separators), no space at
    either end. Values: printable Latin-1 or tab (pass peer text through :func:`header_text`).

    Raises:
        InputError: naming ``where``, the field and the offending character.
    """
    checked = {}
    for key, value in fields.items():
        key, value = str(key), str(value)
        if (not key or key != key.strip() or not key.isascii() or not key.isprintable()
                or "=" in key or ":" in key):
            raise InputError(f"{where}: field name {key!r}; printable ASCII without '=' or ':' "
                             "expected")
        if bad := _BAD_VALUE.search(value):
            raise InputError(f"{where}: field {key} = {value[:80]!r} holds {bad.group()!r}, "
                             "which a header line cannot hold; printable Latin-1 text without "
                             "CR/LF expected (escape peer text with header_text())")
        checked[key] = value
    return checked


def partial_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(pixels, journal): the hidden files of a recording to ``path`` that has not closed yet."""
    path = Path(path)
    return (path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.journal"))


def has_partial(path: str | os.PathLike) -> bool:
    """Whether an unfinished recording to ``path`` (a crashed or running one) left its files."""
    return partial_paths(path)[1].exists()


class SequenceWriter:
    """Writes frames to a sequence file as they come; the file is complete after ``close()``.

    Every ``add`` reaches the OS before it returns (pixels and journal flushed), so a killed
    process leaves a recording :func:`recover_recording` can complete.

    Args:
        path: ``.igs.mha``/``.seq.mha`` (MetaIO) or ``.igs.nrrd``/``.seq.nrrd`` (NRRD).
        fields: file-level header fields, e.g. ``{"UltrasoundImageOrientation": "MF"}``.
        compress: zlib (MetaIO CompressedData) or gzip (NRRD encoding) the pixels.
        level: zlib level, 1 (fast: live recording) .. 9 (small).
        spacing_mm: ElementSpacing / NRRD spacings (x = column, y = row) in mm; PLUS leaves these
            at 1 and takes the pixel size from the per-frame ImageToReference transform.
    Raises:
        InputError: a name that is not a sequence file, a field a header line cannot hold (see
            :func:`check_fields`), or an unfinished recording to the same path (recover it
            first: ``regseg-igt recover PATH``).
    """

    def __init__(self, path: str | os.PathLike, *, fields: dict[str, str] | None = None,
                 compress: bool = True, spacing_mm: tuple[float, float] = (1.0, 1.0),
                 level: int = 6) -> None:
        self.path = Path(path)
        self.kind = sequence_kind(self.path)
        self.fields = check_fields(fields or {}, f"{self.path}: file header")
        self.compress = compress
        self.spacing_mm = (float(spacing_mm[0]), float(spacing_mm[1]))
        self.count = 0
        self._shape: tuple[int, ...] | None = None
        self._dtype: np.dtype | None = None
        self._frame_fields: list[dict[str, str]] = []
        self._pixels_path, self._journal_path = partial_paths(self.path)
        if self._journal_path.exists():
            raise InputError(f"{self.path}: an unfinished recording to this file is on disk "
                             f"({self._journal_path.name}); recover it with `regseg-igt recover "
                             f"{self.path}` or choose another name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pixels = open(self._pixels_path, "wb")  # noqa: SIM115 (closed in close())
        self._journal = open(self._journal_path, "w", encoding="utf-8")  # noqa: SIM115
        # NRRD "gzip" is a gzip stream (16 + MAX_WBITS), MetaIO CompressedData a zlib one.
        self._zip = zlib.compressobj(level, zlib.DEFLATED, _wbits(self.kind)) if compress else None
        self._journal_line({"format": JOURNAL_FORMAT, "kind": self.kind, "compress": compress,
                            "spacing_mm": self.spacing_mm, "fields": self.fields})

    def add(self, pixels: np.ndarray, fields: dict[str, str]) -> None:
        """Append one frame: (H, W) or (H, W, C), the same shape and dtype as the first.

        Raises:
            InputError: pixels of another shape or dtype, or a field a header line cannot hold
                (checked here, so one bad frame is refused, not the whole file at close).
        """
        fields = check_fields(fields, f"{self.path}: frame {self.count}")
        pixels = np.ascontiguousarray(pixels)
        if self._shape is None:
            if pixels.ndim not in (2, 3) or pixels.dtype.str[1:] not in MET_TYPES.values():
                raise InputError(f"{self.path}: frame of shape {pixels.shape} {pixels.dtype}; "
                                 "(H, W) or (H, W, C) of an integer or float type expected")
            self._shape, self._dtype = pixels.shape, pixels.dtype
            self._journal_line({"shape": list(pixels.shape), "dtype": pixels.dtype.str})
        elif pixels.shape != self._shape or pixels.dtype != self._dtype:
            raise InputError(f"{self.path}: frame {self.count} is {pixels.shape} {pixels.dtype}; "
                             f"every frame must be {self._shape} {self._dtype} like the first")
        data = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
        if self._zip is not None:  # a sync flush ends the frame's deflate block on a byte
            data = self._zip.compress(data) + self._zip.flush(zlib.Z_SYNC_FLUSH)
        self._pixels.write(data)
        self._pixels.flush()
        self._frame_fields.append(fields)
        self.count += 1
        self._journal_line({"fields": self._frame_fields[-1], "end": self._pixels.tell()})

    def close(self) -> Path:
        """Write header and pixels to a temporary file, rename it over ``path``, drop the
        partial files. Returns the path."""
        if self._pixels.closed:
            return self.path
        if self._zip is not None:
            self._pixels.write(self._zip.flush())
        self._pixels.close()
        self._journal.close()
        size = os.path.getsize(self._pixels_path)
        closing = self.path.with_name(f".{self.path.name}.closing")
        with open(closing, "wb") as out:
            out.write(self._header(size).encode("latin-1"))
            with open(self._pixels_path, "rb") as pixels:
                shutil.copyfileobj(pixels, out, _CHUNK)
        os.replace(closing, self.path)
        self._pixels_path.unlink()
        self._journal_path.unlink()
        return self.path

    def _journal_line(self, record: dict) -> None:
        self._journal.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._journal.flush()

    def _frame_lines(self, sep: str) -> list[str]:
        return [f"Seq_Frame{i:04d}_{key}{sep}{value}"
                for i, fields in enumerate(self._frame_fields) for key, value in fields.items()]

    def _header(self, data_size: int) -> str:
        height, width = self._shape[:2] if self._shape else (0, 0)
        channels = self._shape[2] if self._shape and len(self._shape) == 3 else 1
        dtype = self._dtype if self._dtype is not None else np.dtype(np.uint8)
        col_mm, row_mm = self.spacing_mm
        if self.kind == "mha":
            met = {v: k for k, v in MET_TYPES.items()}[dtype.str[1:]]
            lines = ["ObjectType = Image", "NDims = 3", "AnatomicalOrientation = RAI",
                     "BinaryData = True", "BinaryDataByteOrderMSB = False",
                     "CenterOfRotation = 0 0 0", f"CompressedData = {self.compress}"]
            if self.compress:
                lines.append(f"CompressedDataSize = {data_size}")
            lines += [f"DimSize = {width} {height} {self.count}",
                      f"ElementNumberOfChannels = {channels}",
                      f"ElementSpacing = {col_mm!r} {row_mm!r} 1", f"ElementType = {met}",
                      "Offset = 0 0 0", "TransformMatrix = 1 0 0 0 1 0 0 0 1"]
            lines += [f"{k} = {v}" for k, v in self.fields.items()]
            lines += self._frame_lines(" = ") + ["ElementDataFile = LOCAL"]
            return "\n".join(lines) + "\n"
        nrrd = {"u1": "uint8", "i1": "int8", "u2": "uint16", "i2": "int16", "u4": "uint32",
                "i4": "int32", "f4": "float", "f8": "double"}[dtype.str[1:]]
        vector = channels > 1
        lines = ["NRRD0004", "# Complete NRRD file format specification at:",
                 "# http://teem.sourceforge.net/nrrd/format.html", f"type: {nrrd}",
                 f"dimension: {4 if vector else 3}",
                 f"sizes: {f'{channels} ' if vector else ''}{width} {height} {self.count}",
                 f"kinds: {'vector ' if vector else ''}domain domain list",
                 "endian: little", f"encoding: {'gzip' if self.compress else 'raw'}",
                 f"spacings: {'nan ' if vector else ''}{col_mm!r} {row_mm!r} nan"]
        lines += [f"{k}:={v}" for k, v in self.fields.items()]
        return "\n".join(lines + self._frame_lines(":=")) + "\n\n"


def write_sequence(path: str | os.PathLike, sequence: Sequence, *, compress: bool = True) -> Path:
    """Write ``sequence`` to ``path`` (format from the extension); see :class:`SequenceWriter`."""
    writer = SequenceWriter(path, fields=sequence.fields, compress=compress,
                            spacing_mm=sequence.element_spacing_mm)
    for frame in sequence.frames:
        writer.add(frame.pixels, frame.fields)
    return writer.close()


def recover_recording(path: str | os.PathLike, out: str | os.PathLike | None = None
                      ) -> tuple[Path, int]:
    """Complete an unfinished recording to ``path`` from its partial files.

    Every frame whose journal line reached the disk is kept (a torn last line or pixels cut
    mid-frame cost that frame only). The partial files are removed once ``out`` is written.

    Args:
        path: the file the recording was going to (``session.igs.mha``).
        out: where to write the completed file; default ``path`` itself.
    Returns:
        (the completed file, frames recovered).
    Raises:
        InputError: no unfinished recording for ``path``, or a journal that is not ours.
    """
    path = Path(path)
    pixels_path, journal_path = partial_paths(path)
    if not journal_path.exists():
        raise InputError(f"{path}: no unfinished recording to recover ({journal_path.name} not "
                         "found beside it)")
    header, layout, frames = _read_journal(journal_path)
    # Move the partial files aside first: the new writer (same target by default) needs the names.
    aside = [p.with_name(p.name + ".recovering") for p in (pixels_path, journal_path)]
    for src, dst in zip((pixels_path, journal_path), aside, strict=True):
        if src.exists():
            os.replace(src, dst)
    target = Path(out) if out is not None else path
    writer = SequenceWriter(target, fields=_escaped(header["fields"]),
                            compress=header["compress"], spacing_mm=tuple(header["spacing_mm"]))
    count = 0
    if layout is not None and frames and aside[0].exists():
        shape, dtype = tuple(layout["shape"]), np.dtype(layout["dtype"])
        for pixels in _frames_on_disk(aside[0], frames[-1]["end"], shape, dtype,
                                      _wbits(sequence_kind(path)) if header["compress"] else None):
            if count == len(frames):
                break
            writer.add(pixels, _escaped(frames[count]["fields"]))
            count += 1
    writer.close()
    for p in aside:
        p.unlink(missing_ok=True)
    log.warning("recovered %d frames of an unfinished recording into %s", count, target)
    return target, count


def _frames_on_disk(pixels_path: Path, end: int, shape: tuple[int, ...], dtype: np.dtype,
                    wbits: int | None):
    """Whole frames from the first ``end`` bytes of a partial pixel file, read in small chunks
    (a recording can be far larger than memory); a frame cut short is not yielded."""
    frame_bytes = int(np.prod(shape)) * dtype.itemsize
    inflate = zlib.decompressobj(wbits) if wbits is not None else None
    buffer = bytearray()
    with open(pixels_path, "rb") as pixels:
        left = end
        while left > 0:
            chunk = pixels.read(min(left, 64 << 10))
            if not chunk:
                break
            left -= len(chunk)
            buffer += inflate.decompress(chunk) if inflate is not None else chunk
            while len(buffer) >= frame_bytes:
                yield np.frombuffer(bytes(buffer[:frame_bytes]), dtype).reshape(shape)
                del buffer[:frame_bytes]


def _escaped(fields: dict) -> dict[str, str]:
    """Journal fields with values a header cannot hold escaped (journals of regseg versions that
    recorded a peer's device name raw)."""
    return {k: header_text(v) if _BAD_VALUE.search(str(v)) else v for k, v in fields.items()}


def _wbits(kind: str) -> int:
    return 16 + zlib.MAX_WBITS if kind == "nrrd" else zlib.MAX_WBITS


def _read_journal(journal_path: Path) -> tuple[dict, dict | None, list[dict]]:
    """(file header, pixel layout or None, frame records) of a journal; a torn tail is dropped."""
    records = []
    with open(journal_path, encoding="utf-8") as journal:
        for line in journal:
            if not line.endswith("\n"):
                break  # the write the process died in
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    if not records or records[0].get("format") != JOURNAL_FORMAT:
        raise InputError(f"{journal_path}: not a regseg recording journal (first line "
                         f"{records[0] if records else 'missing'}; {JOURNAL_FORMAT!r} expected)")
    layout = records[1] if len(records) > 1 and "shape" in records[1] else None
    frames = [r for r in records[2 if layout else 1:] if "end" in r and "fields" in r]
    return records[0], layout, frames
