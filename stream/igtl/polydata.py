"""Prostate and lesion outlines as OpenIGTLink POLYDATA, which 3D Slicer shows as model nodes.

Our own packer: pyigtl 0.3.4's ``PolyDataMessage._pack_content`` writes VERTICES in the host's
byte order (``astype(np.int32)``, little-endian on x86) where polydata.md says big-endian, and its
``_unpack_content`` indexes a ``struct.Struct`` without unpacking (pyigtl issue #21), so it can
neither be trusted to send vertices nor to read anything back. Lines and polygons it packs right;
the tests compare our bytes with its for those.

Layout (https://github.com/openigtlink/OpenIGTLink/blob/master/Documents/Protocol/polydata.md,
``igtl_polydata.h``), all big-endian: 10 uint32 (NPOINTS, NVERTICES, SIZE_VERTICES, NLINES,
SIZE_LINES, NPOLYGONS, SIZE_POLYGONS, NTRIANGLE_STRIPS, SIZE_TRIANGLE_STRIPS, NATTRIBUTES), then
NPOINTS x 3 float32, then each cell array as (n, i_1 .. i_n) uint32 runs; SIZE_* are bytes.
We send no attributes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from regseg import spatial
from regseg.errors import InputError
from regseg.stream.igtl.codec import pack_message

_POLY_HEADER = struct.Struct(">10I")
CELL_KINDS = ("vertices", "lines", "polygons", "triangle_strips")


@dataclass(frozen=True, slots=True)
class PolyData:
    """Points and cells as they travel: each cell is a sequence of point indices."""

    points: np.ndarray  # (N, 3) float32, mm
    vertices: tuple[tuple[int, ...], ...] = ()
    lines: tuple[tuple[int, ...], ...] = ()
    polygons: tuple[tuple[int, ...], ...] = ()
    triangle_strips: tuple[tuple[int, ...], ...] = ()


def _pack_cells(cells: Sequence[Sequence[int]], npoints: int, kind: str) -> bytes:
    runs = []
    for cell in cells:
        index = np.asarray(cell, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= npoints):
            raise InputError(f"POLYDATA {kind} cell {list(cell)[:8]}...: point indices must be in "
                             f"0..{npoints - 1}")
        runs.append(np.concatenate([[index.size], index]))
    if not runs:
        return b""
    return np.concatenate(runs).astype(">u4").tobytes()


def pack_polydata_content(poly: PolyData) -> bytes:
    """The POLYDATA content for ``poly`` (no attributes); see the module docstring for layout."""
    points = np.asarray(poly.points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or not np.isfinite(points).all():
        raise InputError(f"POLYDATA points: shape {points.shape}; finite (N, 3) mm expected")
    npoints = len(points)
    cells = [_pack_cells(getattr(poly, kind), npoints, kind) for kind in CELL_KINDS]
    counts = [len(getattr(poly, kind)) for kind in CELL_KINDS]
    header = _POLY_HEADER.pack(npoints, counts[0], len(cells[0]), counts[1], len(cells[1]),
                               counts[2], len(cells[2]), counts[3], len(cells[3]), 0)
    return b"".join([header, points.astype(">f4").tobytes(), *cells])


def unpack_polydata_content(content: bytes | memoryview) -> PolyData:
    """Read POLYDATA content back (attributes, if any, are skipped).

    Raises:
        InputError: sizes that do not add up, or cell indices outside the points.
    """
    content = memoryview(content).cast("B")
    if len(content) < _POLY_HEADER.size:
        raise InputError(f"POLYDATA content of {len(content)} bytes is shorter than its "
                         f"{_POLY_HEADER.size}-byte header")
    npoints, *sizes, _nattributes = _POLY_HEADER.unpack_from(content)
    offset = _POLY_HEADER.size
    end = offset + 12 * npoints
    if end > len(content):
        raise InputError(f"POLYDATA NPOINTS {npoints} needs {12 * npoints} bytes of points; "
                         f"{len(content) - offset} follow the header")
    points = np.frombuffer(content[offset:end], dtype=">f4").reshape(npoints, 3).astype(np.float32)
    offset = end
    out = {}
    for k, kind in enumerate(CELL_KINDS):
        count, size = sizes[2 * k], sizes[2 * k + 1]
        if size % 4 or offset + size > len(content):
            raise InputError(f"POLYDATA SIZE_{kind.upper()} {size} bytes: a multiple of 4 within "
                             f"the {len(content)}-byte content expected")
        values = np.frombuffer(content[offset:offset + size], dtype=">u4")
        offset += size
        cells, i = [], 0
        while i < len(values):
            n = int(values[i])
            if i + 1 + n > len(values):
                raise InputError(f"POLYDATA {kind}: a cell of {n} points runs past SIZE {size}")
            cell = tuple(int(v) for v in values[i + 1:i + 1 + n])
            if cell and max(cell) >= npoints:
                raise InputError(f"POLYDATA {kind}: index {max(cell)} with {npoints} points")
            cells.append(cell)
            i += 1 + n
        if len(cells) != count:
            raise InputError(f"POLYDATA N{kind.upper()} {count} but {len(cells)} cells in the data")
        out[kind] = tuple(cells)
    return PolyData(points=points, **out)


def label_outlines(mask: np.ndarray, image_to_world: np.ndarray) -> PolyData:
    """Outer outlines of a binary mask as closed polylines in world mm.

    Pixel (i = column, j = row) maps through ``image_to_world`` at k = 0, so the outline lies on the
    image plane exactly where Slicer shows the IMAGE sent with the same matrix. Each region's
    boundary (cv2.findContours, external only, straight runs compressed to their ends) becomes one
    LINES cell that repeats its first point to close. An empty mask gives an empty PolyData, which
    clears the model in Slicer.

    Args:
        mask: (H, W) bool or 0/1.
        image_to_world: (4, 4) pixel (i, j, k) -> mm.
    """
    mask = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    if mask.ndim != 2:
        raise InputError(f"outline mask: shape {mask.shape}; (H, W) expected")
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    pixels, lines, start = [], [], 0
    for contour in contours:
        ij = contour.reshape(-1, 2)  # OpenCV points are (x, y) = (i, j)
        pixels.append(ij)
        lines.append((*range(start, start + len(ij)), start))
        start += len(ij)
    if not pixels:
        return PolyData(points=np.zeros((0, 3), np.float32))
    ij = np.concatenate(pixels).astype(np.float64)
    world = spatial.apply(np.asarray(image_to_world, dtype=np.float64),
                          np.column_stack([ij, np.zeros(len(ij))]))
    return PolyData(points=world.astype(np.float32), lines=tuple(lines))


def pack_outline(
    mask: np.ndarray,
    image_to_world: np.ndarray,
    device_name: str,
    timestamp: float,
    *,
    header_version: int = 2,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """A POLYDATA message with the outlines of ``mask`` (see :func:`label_outlines`)."""
    content = pack_polydata_content(label_outlines(mask, image_to_world))
    return pack_message("POLYDATA", device_name, timestamp, content,
                        header_version=header_version, metadata=metadata)
