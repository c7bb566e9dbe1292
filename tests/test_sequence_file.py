"""PLUS sequence files: files as PLUS writes them, byte-exact round trips, and bad files refused."""

import gzip
import os
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from regseg.errors import InputError
from regseg.sequence_file import (
    Sequence,
    SequenceFrame,
    format_matrix,
    parse_matrix,
    read_sequence,
)
from regseg.sequence_writer import SequenceWriter, write_sequence

EXTENSIONS = [".igs.mha", ".seq.mha", ".igs.nrrd", ".seq.nrrd"]


def make_sequence(channels: int = 1, n: int = 4, seed: int = 0) -> Sequence:
    rng = np.random.default_rng(seed)
    shape = (6, 9) if channels == 1 else (6, 9, channels)
    frames = []
    for i in range(n):
        pose = np.eye(4)
        pose[:3] = rng.normal(size=(3, 4))  # values with every float64 bit in use
        frames.append(SequenceFrame(
            rng.integers(0, 256, shape, dtype=np.uint8),
            {"FrameNumber": str(i), "Timestamp": repr(1_700_000_000 + i / 30 + 1e-7),
             "ImageToReferenceTransform": format_matrix(pose),
             "ImageToReferenceTransformStatus": "OK" if i != 2 else "INVALID",
             "ImageStatus": "OK"}))
    return Sequence(frames, {"UltrasoundImageOrientation": "MF"}, (0.25, 1 / 3))


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
def test_write_read_write_is_byte_exact(tmp_path, ext, compress, channels):
    sequence = make_sequence(channels)
    first = write_sequence(tmp_path / f"a{ext}", sequence, compress=compress)
    back = read_sequence(first)
    assert back.fields == sequence.fields
    assert back.element_spacing_mm == sequence.element_spacing_mm
    for ours, theirs in zip(sequence.frames, back.frames, strict=True):
        assert theirs.pixels.dtype == np.uint8
        np.testing.assert_array_equal(theirs.pixels, ours.pixels)
        assert theirs.fields == ours.fields
    second = write_sequence(tmp_path / f"b{ext}", back, compress=compress)
    assert first.read_bytes() == second.read_bytes()


def test_transforms_round_trip_to_the_same_float64_and_invalid_ones_are_none(tmp_path):
    sequence = make_sequence()
    back = read_sequence(write_sequence(tmp_path / "s.igs.mha", sequence))
    for i, (ours, theirs) in enumerate(zip(sequence.frames, back.frames, strict=True)):
        if i == 2:
            assert theirs.transform("ImageToReference") is None
        else:
            expected = parse_matrix(ours.fields["ImageToReferenceTransform"])
            assert np.array_equal(theirs.transform("ImageToReference"), expected)
        assert theirs.timestamp_s == float(ours.fields["Timestamp"])


def test_reads_a_metaio_file_as_plus_writes_it(tmp_path):
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = "\n".join([
        "ObjectType = Image", "NDims = 3", "AnatomicalOrientation = RAI", "BinaryData = True",
        "BinaryDataByteOrderMSB = False", "CenterOfRotation = 0 0 0", "CompressedData = True",
        f"CompressedDataSize = {len(zlib.compress(pixels.tobytes()))}", "DimSize = 4 3 2",
        "ElementNumberOfChannels = 1", "ElementSpacing = 1 1 1", "ElementType = MET_UCHAR",
        "Offset = 0 0 0", "TransformMatrix = 1 0 0 0 1 0 0 0 1",
        "UltrasoundImageOrientation = MF", "UltrasoundImageType = BRIGHTNESS",
        "Seq_Frame0000_FrameNumber = 0",
        "Seq_Frame0000_ProbeToTrackerTransform = 1 0 0 10 0 1 0 20 0 0 1 30 0 0 0 1",
        "Seq_Frame0000_ProbeToTrackerTransformStatus = OK",
        "Seq_Frame0000_Timestamp = 63.211", "Seq_Frame0000_UnfilteredTimestamp = 63.206",
        "Seq_Frame0000_ImageStatus = OK",
        "Seq_Frame0001_FrameNumber = 1",
        "Seq_Frame0001_ProbeToTrackerTransform = 1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1",
        "Seq_Frame0001_ProbeToTrackerTransformStatus = INVALID",
        "Seq_Frame0001_Timestamp = 63.244", "Seq_Frame0001_ImageStatus = OK",
        "ElementDataFile = LOCAL"]) + "\r\n"  # Windows line endings, as PLUS on Windows writes
    path = tmp_path / "plus.igs.mha"
    path.write_bytes(header.replace("\n", "\r\n").encode() + zlib.compress(pixels.tobytes()))
    sequence = read_sequence(path)
    assert sequence.fields == {"UltrasoundImageOrientation": "MF",
                               "UltrasoundImageType": "BRIGHTNESS"}
    assert len(sequence.frames) == 2
    np.testing.assert_array_equal(sequence.frames[1].pixels, pixels[1])
    probe = sequence.frames[0].transform("ProbeToTracker")
    np.testing.assert_array_equal(probe[:3, 3], [10, 20, 30])
    assert sequence.frames[1].transform("ProbeToTracker") is None
    assert sequence.frames[0].timestamp_s == 63.211


def test_reads_an_igsio_nrrd_with_a_singleton_slice_axis(tmp_path):
    pixels = np.arange(3 * 2 * 5, dtype=np.uint8).reshape(3, 2, 5)  # 3 frames of 2 x 5
    header = "\n".join([
        "NRRD0004", "# Complete NRRD file format specification at:",
        "type: unsigned char", "dimension: 4", "sizes: 5 2 1 3",
        "kinds: domain domain domain list", "endian: little", "encoding: raw",
        "ultrasound image orientation:=MF",
        "Seq_Frame0000_Timestamp:=1.5", "Seq_Frame0000_Status:=OK",
        "Seq_Frame0002_ImageToReferenceTransform:=2 0 0 0 0 2 0 0 0 0 1 0 0 0 0 1",
        "Seq_Frame0002_ImageToReferenceTransformStatus:=OK"]) + "\n\n"
    path = tmp_path / "igsio.seq.nrrd"
    path.write_bytes(header.encode() + pixels.tobytes())
    sequence = read_sequence(path)
    assert [f.pixels.shape for f in sequence.frames] == [(2, 5)] * 3
    np.testing.assert_array_equal(sequence.frames[2].pixels, pixels[2])
    assert sequence.frames[0].fields == {"Timestamp": "1.5", "Status": "OK"}
    assert sequence.frames[2].transform("ImageToReference")[0, 0] == 2.0
    assert sequence.fields["ultrasound image orientation"] == "MF"


def test_reads_a_header_with_a_separate_raw_file(tmp_path):
    pixels = np.arange(2 * 2 * 3, dtype=np.uint8)
    (tmp_path / "p.raw").write_bytes(pixels.tobytes())
    (tmp_path / "s.seq.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 3 2 2\n"
                                        "ElementType = MET_UCHAR\nElementDataFile = p.raw\n")
    sequence = read_sequence(tmp_path / "s.seq.mhd")
    np.testing.assert_array_equal(sequence.frames[1].pixels.ravel(), pixels[6:])


def test_streaming_writer_matches_write_sequence(tmp_path):
    sequence = make_sequence()
    writer = SequenceWriter(tmp_path / "w.igs.mha", fields=sequence.fields,
                            spacing_mm=sequence.element_spacing_mm)
    for frame in sequence.frames:
        writer.add(frame.pixels, frame.fields)
    streamed = writer.close()
    assert streamed.read_bytes() == write_sequence(tmp_path / "x.igs.mha", sequence).read_bytes()
    assert not list(tmp_path.glob(".*.pixels"))  # the temporary pixel file is gone


def test_empty_sequence_is_a_valid_file(tmp_path):
    path = SequenceWriter(tmp_path / "e.igs.mha").close()
    assert read_sequence(path).frames == []


@pytest.mark.parametrize(("name", "text", "match"), [
    ("s.png", "", "not a sequence file name"),
    ("s.igs.mha", "ObjectType = Image\nNDims = 3\n", "no ElementDataFile"),
    ("s.igs.mha", "NDims = 3\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n", "'DimSize'"),
    ("s.igs.mha", "DimSize = 4 3 2\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n1234",
     "4 bytes of pixels; the header's 2 frames of 4x3x1 uint8 need 24"),
    ("s.igs.mha", "DimSize = 4 3 2\nElementType = MET_UCHAR\nCompressedData = True\n"
     "ElementDataFile = LOCAL\nnot zlib", "does not decompress"),
    ("s.igs.mha", "DimSize = 4 3\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n",
     "W H N"),
    ("s.igs.mha", "DimSize = 4 3 1\nElementType = MET_RGB\nElementDataFile = LOCAL\n",
     "ElementType 'MET_RGB'; one of MET_UCHAR"),
    ("s.igs.mha", "garbage without separator\n", "is not 'key = value'"),
    ("s.seq.nrrd", "P5\n", "NRRD magic"),
    # an ElementSpacing that is there but unusable used to become 1 mm silently
    ("s.igs.mha", "DimSize = 2 2 1\nElementType = MET_UCHAR\nElementSpacing = 0.2 -0.2 1\n"
     "ElementDataFile = LOCAL\n1234", r"ElementSpacing \(spacings\) '0.2 -0.2 1'; positive"),
    ("s.igs.mha", "DimSize = 2 2 1\nElementType = MET_UCHAR\nElementSpacing = inf inf 1\n"
     "ElementDataFile = LOCAL\n1234", "'inf inf 1'; positive, finite"),
    ("s.igs.mha", "DimSize = 2 2 1\nElementType = MET_UCHAR\nElementSpacing = a b\n"
     "ElementDataFile = LOCAL\n1234", "'a b'; positive, finite"),
])
def test_bad_files_are_refused_naming_what_is_wrong(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_bytes(text.encode())
    with pytest.raises(InputError, match=match):
        read_sequence(path)


def test_writer_refuses_a_frame_of_another_size(tmp_path):
    writer = SequenceWriter(tmp_path / "s.igs.mha")
    writer.add(np.zeros((4, 4), np.uint8), {})
    with pytest.raises(InputError, match=r"frame 1 is \(5, 4\) uint8; every frame must be"):
        writer.add(np.zeros((5, 4), np.uint8), {})
    writer.close()
    assert len(read_sequence(tmp_path / "s.igs.mha").frames) == 1


@pytest.mark.parametrize("text", ["1 2 3", "a b c d e f g h i j k l m n o p", "nan " * 16])
def test_parse_matrix_refuses_what_is_not_16_finite_numbers(text):
    with pytest.raises(InputError, match="16"):
        parse_matrix(text)


def test_nrrd_pixels_in_several_gzip_members_are_read(tmp_path):
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8)
    header = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 3 2\nencoding: gzip\n\n"
    data = gzip.compress(pixels[:10].tobytes()) + gzip.compress(pixels[10:].tobytes())
    (tmp_path / "s.seq.nrrd").write_bytes(header + data)
    back = read_sequence(tmp_path / "s.seq.nrrd")
    np.testing.assert_array_equal(np.stack([f.pixels for f in back.frames]).ravel(), pixels)


def mha_header(data_file: str = "LOCAL", dims: str = "4 3 2", compressed: bool = False) -> str:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementType = MET_UCHAR\n"
            f"CompressedData = {compressed}\nElementDataFile = {data_file}\n")


@pytest.mark.parametrize(("data_file", "match"), [
    ("/dev/zero", "ElementDataFile '/dev/zero'; LOCAL or a file name relative to the header's"),
    ("../p.raw", "ElementDataFile '../p.raw'; LOCAL or a file name relative"),
    ("sub/../../p.raw", "without '..'"),
    ("zero.raw", "pixel data .*zero.raw is not a regular file"),
    ("fifo.raw", "pixel data .*fifo.raw is not a regular file"),
    ("missing.raw", "cannot open the pixel data .*missing.raw"),
])
def test_a_data_file_that_is_not_a_file_beside_the_header_is_refused(tmp_path, data_file, match):
    """Red team: ``ElementDataFile = /dev/zero`` read until memory ran out."""
    (tmp_path / "p.raw").write_bytes(bytes(24))
    (tmp_path / "zero.raw").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.raw")  # opening it must not wait for a writer
    path = tmp_path / "d" / "s.seq.mhd"
    path.parent.mkdir()
    path.write_text(mha_header(data_file))
    (tmp_path / "d" / "zero.raw").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "d" / "fifo.raw")
    start = time.perf_counter()
    with pytest.raises(InputError, match=match):
        read_sequence(path)
    assert time.perf_counter() - start < 1.0


def test_a_sequence_file_that_is_a_device_is_refused(tmp_path):
    (tmp_path / "s.igs.mha").symlink_to("/dev/zero")
    with pytest.raises(InputError, match="sequence file .*s.igs.mha is not a regular file"):
        read_sequence(tmp_path / "s.igs.mha")


def test_a_header_line_without_end_is_refused(tmp_path):
    (tmp_path / "s.igs.mha").write_bytes(b"ObjectType = " + b"x" * (2 << 20))
    with pytest.raises(InputError, match="a header line of more than 1048576 bytes"):
        read_sequence(tmp_path / "s.igs.mha")


def zip_bomb(size: int, wbits: int) -> bytes:
    """``size`` zero bytes, deflated (about 1000:1), made in 1 MB steps."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, wbits)
    zeros = bytes(1 << 20)
    return b"".join(deflate.compress(zeros) for _ in range(size >> 20)) + deflate.flush()


@pytest.mark.parametrize("kind", ["mha", "nrrd"])
def test_a_zip_bomb_is_refused_without_inflating_it(tmp_path, kind):
    """64 MB of zeros behind a header that claims 24 bytes of pixels: refused after decompressing
    at most 25 bytes (it used to inflate all of it, and a larger one exhausted memory)."""
    if kind == "mha":
        path = tmp_path / "s.igs.mha"
        path.write_bytes(mha_header(compressed=True).encode() + zip_bomb(64 << 20, 15))
    else:
        path = tmp_path / "s.igs.nrrd"
        path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 3 2\n"
                         b"encoding: gzip\n\n" + zip_bomb(64 << 20, 31))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InputError, match="decompress to more than 24 bytes; the header's 2 "
                           "frames of 4x3x1 uint8 need 24"):
            read_sequence(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 16 << 20  # one 4 MB read chunk, not the 64 MB inside


def test_a_header_claiming_more_than_its_compressed_bytes_can_hold_is_refused(tmp_path):
    path = tmp_path / "s.igs.mha"
    dims = "100000 100000 100"  # 1 TB of pixels from a few bytes
    path.write_bytes(mha_header(dims=dims, compressed=True).encode() + zlib.compress(bytes(100)))
    with pytest.raises(InputError, match="compressed pixels cannot hold what the header's 100 "
                       "frames of 100000x100000x1 uint8 need 1000000000000 bytes"):
        read_sequence(path)


def test_a_truncated_compressed_stream_is_refused(tmp_path):
    path = tmp_path / "s.igs.mha"
    data = zlib.compress(np.arange(24, dtype=np.uint8).tobytes())
    path.write_bytes(mha_header(compressed=True).encode() + data[:-4])  # no Adler-32 trailer
    with pytest.raises(InputError, match="does not decompress: the stream ends early"):
        read_sequence(path)
