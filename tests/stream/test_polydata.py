"""POLYDATA outlines: byte round trips, the layout against pyigtl's packer, and the geometry."""

import struct

import numpy as np
import pyigtl
import pytest

from regseg.errors import InputError
from regseg.stream.igtl.codec import HEADER_SIZE, crc64
from regseg.stream.igtl.polydata import (
    PolyData,
    label_outlines,
    pack_outline,
    pack_polydata_content,
    unpack_polydata_content,
)
from regseg.stream.igtl.sink import pack_result
from regseg.types import Frame, Result

TS = 1_700_000_000.5


def square_mask() -> np.ndarray:
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:8] = True  # rows 2..5, columns 3..7
    return mask


def test_content_round_trip_is_byte_exact():
    poly = PolyData(points=np.array([[0, 0, 0], [1.5, -2, 3], [4, 5, 6.25]], np.float32),
                    vertices=((0,), (2,)), lines=((0, 1, 2, 0),), polygons=((0, 1, 2),),
                    triangle_strips=((2, 1, 0),))
    content = pack_polydata_content(poly)
    back = unpack_polydata_content(content)
    np.testing.assert_array_equal(back.points, poly.points)
    assert (back.vertices, back.lines, back.polygons, back.triangle_strips) == (
        poly.vertices, poly.lines, poly.polygons, poly.triangle_strips)
    assert pack_polydata_content(back) == content
    # polydata.md header: NPOINTS, then (count, bytes) per cell kind, NATTRIBUTES.
    assert struct.unpack(">10I", content[:40]) == (3, 2, 16, 1, 20, 1, 16, 1, 16, 0)


def test_lines_and_polygons_match_pyigtls_packer():
    points = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0]], np.float32)
    ours = pack_polydata_content(PolyData(points, lines=((0, 1, 2, 0),), polygons=((0, 1, 2),)))
    theirs = pyigtl.PolyDataMessage(points=points, lines=np.array([4, 0, 1, 2, 0]),
                                    polygons=np.array([3, 0, 1, 2]))._pack_content()
    assert ours == theirs


def test_pyigtl_packs_vertices_in_host_order_which_is_why_we_pack_ourselves():
    points = np.zeros((1, 3), np.float32)
    ours = pack_polydata_content(PolyData(points, vertices=((0,),)))
    theirs = pyigtl.PolyDataMessage(points=points, vertices=np.array([1, 0]))._pack_content()
    assert ours[-8:] == struct.pack(">II", 1, 0)  # big-endian, as polydata.md says
    assert theirs[-8:] != ours[-8:]


def test_outline_lies_on_the_mask_border_in_mm():
    image_to_world = np.diag([0.5, 0.25, 1.0, 1.0])
    image_to_world[:3, 3] = [10.0, 20.0, 30.0]
    poly = label_outlines(square_mask(), image_to_world)
    assert len(poly.lines) == 1
    line = poly.lines[0]
    assert line[0] == line[-1] and len(set(line)) == len(poly.points)  # one closed polyline
    corners = {(3, 2), (7, 2), (7, 5), (3, 5)}  # (i, j) of the square's corner pixels
    expected = {(10 + 0.5 * i, 20 + 0.25 * j, 30.0) for i, j in corners}
    assert {tuple(float(v) for v in p) for p in poly.points} == expected


def test_empty_mask_gives_empty_polydata():
    poly = label_outlines(np.zeros((4, 4), bool), np.eye(4))
    assert poly.points.shape == (0, 3) and poly.lines == ()
    assert unpack_polydata_content(pack_polydata_content(poly)).points.shape == (0, 3)


def test_packed_message_has_type_name_and_a_valid_crc():
    data = pack_outline(square_mask(), np.eye(4), "ProstateContour", TS, header_version=1)
    header = pyigtl.MessageBase.parse_header(data[:HEADER_SIZE])
    assert (header["message_type"], header["device_name"]) == ("POLYDATA", "ProstateContour")
    assert header["timestamp"] == TS and header["body_size"] == len(data) - HEADER_SIZE
    assert struct.unpack(">Q", data[50:58])[0] == crc64(data[HEADER_SIZE:])
    assert len(unpack_polydata_content(data[HEADER_SIZE:]).lines) == 1


def test_sink_sends_gland_and_lesion_outlines_before_the_transform():
    labels = np.zeros((10, 12), np.uint8)
    labels[square_mask()] = 1
    labels[3:5, 4:6] = 2
    frame = Frame(seq=1, acquired_ns=0, pixels=np.zeros((10, 12), np.uint8), spacing_mm=(1, 1),
                  image_to_reference=np.eye(4), source_ts=TS)
    result = Result(frame=frame, mri_to_image=np.eye(4), warped_labels=labels, labels=labels,
                    overlay=np.zeros((10, 12, 3), np.uint8), quality=0.9, flagged=False)
    messages = pack_result(result, contour_devices=("ProstateContour", "LesionContour"))
    kinds = [(m[2:14].rstrip(b"\0"), m[14:34].rstrip(b"\0")) for m in messages]
    assert kinds == [(b"IMAGE", b"Overlay"), (b"IMAGE", b"Labels"), (b"IMAGE", b"MRILabels"),
                     (b"POLYDATA", b"ProstateContour"), (b"POLYDATA", b"LesionContour"),
                     (b"POLYDATA", b"TargetContour"), (b"TRANSFORM", b"MRIToImage")]
    lesion = messages[4]
    fields = pyigtl.MessageBase.parse_header(lesion[:HEADER_SIZE])
    assert fields["header_version"] == 2
    # Header v2: skip the 12-byte extended header; metadata follows the content.
    ext, meta_header, meta_size, _ = struct.unpack(">HHII", lesion[HEADER_SIZE:HEADER_SIZE + 12])
    content = lesion[HEADER_SIZE + ext:len(lesion) - meta_header - meta_size]
    poly = unpack_polydata_content(content)
    assert {tuple(p[:2]) for p in poly.points} == {(4, 3), (5, 3), (5, 4), (4, 4)}


@pytest.mark.parametrize(("content", "match"), [
    (b"\0" * 12, "shorter than its 40-byte header"),
    (struct.pack(">10I", 5, 0, 0, 0, 0, 0, 0, 0, 0, 0), "NPOINTS 5"),
    (struct.pack(">10I", 1, 0, 0, 1, 6, 0, 0, 0, 0, 0) + b"\0" * 18, "multiple of 4"),
    (struct.pack(">10I", 1, 0, 0, 1, 12, 0, 0, 0, 0, 0) + b"\0" * 12
     + struct.pack(">3I", 2, 0, 7), "index 7 with 1 points"),
    (struct.pack(">10I", 1, 0, 0, 2, 12, 0, 0, 0, 0, 0) + b"\0" * 12
     + struct.pack(">3I", 2, 0, 0), "NLINES 2 but 1 cells"),
])
def test_malformed_content_is_refused_with_the_field_named(content, match):
    with pytest.raises(InputError, match=match):
        unpack_polydata_content(content)


def test_cells_pointing_past_the_points_are_not_packed():
    with pytest.raises(InputError, match="point indices must be in 0..1"):
        pack_polydata_content(PolyData(np.zeros((2, 3)), lines=((0, 2),)))
    with pytest.raises(InputError, match="finite"):
        pack_polydata_content(PolyData(np.full((1, 3), np.nan)))
