"""OpenIGTLink framing and conversion: byte round trips, bad input on the wire, IMAGE -> Frame."""

import logging
import socket
import struct
import threading

import numpy as np
import pytest
from pyigtl.messages import ImageMessage, MessageBase, StringMessage, TransformMessage

from regseg.errors import InputError, StreamError
from regseg.stream.igtl.codec import (
    HEADER_SIZE,
    crc64,
    frame_from_image,
    pack_image,
    pack_transform,
    wire_timestamp,
)
from regseg.stream.igtl.wire import MessageReader, image_body_limit

TS = 1_700_000_000.25


def pose() -> np.ndarray:
    """Pixel -> mm with values float32 holds exactly, so pack/unpack/pack can be byte-exact."""
    m = np.array([[0.0, -0.25, 0.0, 12.0], [0.5, 0.0, 0.0, -30.0], [0.0, 0.0, 1.0, 4.5],
                  [0, 0, 0, 1]])
    return m


def unpack(data: bytes) -> MessageBase:
    fields = MessageBase.parse_header(data[:HEADER_SIZE])
    msg = MessageBase.create_message(fields["message_type"])
    msg.unpack(fields, data[HEADER_SIZE:])
    return msg


def corrupt_crc(data: bytes, offset: int = -1) -> bytes:
    """Flip one body byte: the header's CRC64 no longer matches."""
    out = bytearray(data)
    out[offset] ^= 0xFF
    return bytes(out)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    b.settimeout(2.0)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("header_version", [1, 2])
@pytest.mark.parametrize("shape", [(48, 64), (48, 64, 3)])
def test_image_pack_unpack_pack_is_byte_exact(header_version, shape):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    meta = {"Seq": "7"}
    data = pack_image(pixels, pose(), "Overlay", TS, header_version=header_version, metadata=meta)
    msg = unpack(data)
    assert msg.header_version == header_version
    assert msg.metadata == (meta if header_version == 2 else {})
    assert msg.world_coordinate_system == "ras"
    np.testing.assert_array_equal(msg.image.reshape(shape), pixels)
    np.testing.assert_allclose(msg.ijk_to_world_matrix, pose())
    assert msg.pack() == data  # pyigtl's own packer agrees byte for byte
    assert pack_image(pixels, pose(), "Overlay", msg.timestamp, header_version=header_version,
                      metadata=meta) == data


@pytest.mark.parametrize("header_version", [1, 2])
def test_transform_pack_unpack_pack_is_byte_exact(header_version):
    data = pack_transform(pose(), "MRIToImage", TS, header_version=header_version)
    msg = unpack(data)
    assert isinstance(msg, TransformMessage) and msg.device_name == "MRIToImage"
    np.testing.assert_allclose(msg.matrix, pose())
    assert msg.timestamp == TS
    assert msg.pack() == data
    assert pack_transform(msg.matrix, "MRIToImage", msg.timestamp,
                          header_version=header_version) == data


def test_wire_timestamp_survives_a_second_round_trip():
    ts = wire_timestamp(pack_transform(np.eye(4), "T", 1_700_000_123.123456789))
    assert abs(ts - 1_700_000_123.123456789) < 1e-9
    assert wire_timestamp(pack_transform(np.eye(4), "T", ts)) == ts


def test_crc64_in_steps_matches_pyigtl():
    from pyigtl.messages import CRC64

    data = np.random.default_rng(1).integers(0, 256, 1_000_003, dtype=np.uint8).tobytes()
    assert crc64(data) == CRC64(data)
    assert crc64(b"") == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(array=np.zeros((4, 4), np.float32)), "uint8"),
        (dict(array=np.zeros((4, 4, 4), np.uint8)), r"\(H, W, 3\)"),
        (dict(device_name="A" * 21), "20 ASCII"),
        (dict(image_to_world=np.eye(3)), r"\(4, 4\)"),
        (dict(header_version=3), "header_version 3"),
        (dict(metadata={"k": "é"}), "ASCII"),
    ],
)
def test_pack_image_refuses_bad_input(kwargs, match):
    args = dict(array=np.zeros((4, 4), np.uint8), image_to_world=np.eye(4), device_name="Im",
                timestamp=TS) | kwargs
    with pytest.raises(InputError, match=match):
        pack_image(**args)


def test_reader_reads_v1_and_v2_and_counts(pair):
    a, b = pair
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    a.sendall(pack_image(grey, pose(), "Image_Reference", TS, header_version=1)
              + pack_transform(pose(), "ImageToReference", TS, header_version=2))
    reader = MessageReader(b)
    image, transform = reader.read(), reader.read()
    assert isinstance(image, ImageMessage) and image.header_version == 1
    np.testing.assert_array_equal(image.image[0], grey)
    assert image.image.flags.writeable  # our copy, not a view of the reused buffer
    assert isinstance(transform, TransformMessage) and transform.header_version == 2
    assert reader.stats.messages == 2 and reader.stats.bad_crc == 0


def test_bad_crc_is_dropped_and_the_next_message_gets_through(pair):
    a, b = pair
    a.sendall(corrupt_crc(pack_transform(np.eye(4), "Bad", TS))
              + pack_transform(np.eye(4), "Good", TS))
    reader = MessageReader(b)
    msg = reader.read()
    assert msg.device_name == "Good"
    assert reader.stats.bad_crc == 1 and reader.stats.messages == 1
    assert "CRC64" in reader.stats.last_error


def test_crc_check_can_be_off(pair):
    a, b = pair
    first_pixel = HEADER_SIZE + 12 + 72  # after the extended header and the IMAGE header
    a.sendall(corrupt_crc(pack_image(np.zeros((2, 2), np.uint8), np.eye(4), "Im", TS),
                          first_pixel))
    reader = MessageReader(b, verify_crc=False)
    msg = reader.read()
    assert msg.device_name == "Im" and msg.image[0, 0, 0] == 0xFF


def test_unknown_and_unwanted_types_are_skipped_by_body_size(pair):
    a, b = pair
    unknown = StringMessage("hello", TS, "Note").pack()
    unknown = unknown[:2] + struct.pack("12s", b"NDARRAY") + unknown[14:]  # type pyigtl lacks
    a.sendall(unknown + StringMessage("x", TS, "Text").pack()
              + pack_transform(np.eye(4), "After", TS))
    reader = MessageReader(b, accept=("IMAGE", "TRANSFORM"))
    assert reader.read().device_name == "After"
    assert reader.stats.unknown_type == 2


def test_oversize_body_is_discarded_in_chunks(pair):
    a, b = pair
    big = pack_image(np.zeros((600, 800), np.uint8), np.eye(4), "Big", TS)
    small = pack_transform(np.eye(4), "Small", TS)
    sender = threading.Thread(target=a.sendall, args=(big + small,))
    sender.start()
    reader = MessageReader(b, max_body_bytes=100_000)
    assert reader.read().device_name == "Small"
    sender.join()
    assert reader.stats.oversize == 1 and reader.stats.bytes == len(big) + len(small)


def test_malformed_image_body_is_dropped_with_the_field_named(pair):
    a, b = pair
    msg = ImageMessage(np.zeros((1, 4, 4), np.uint8), np.eye(4), "ras", TS, "Im")
    data = bytearray(msg.pack())
    data[HEADER_SIZE + 6: HEADER_SIZE + 12] = struct.pack(">HHH", 5, 4, 1)  # SIZE 5x4, 16 pixels
    data[HEADER_SIZE + 66: HEADER_SIZE + 72] = struct.pack(">HHH", 5, 4, 1)  # subvolume size too
    data[50:58] = struct.pack(">Q", crc64(data[HEADER_SIZE:]))
    a.sendall(bytes(data) + pack_transform(np.eye(4), "Next", TS))
    reader = MessageReader(b)
    assert reader.read().device_name == "Next"
    assert reader.stats.malformed == 1
    assert "SIZE (i, j, k)=(5, 4, 1)" in reader.stats.last_error


def test_partial_reads_across_timeouts_keep_the_data(pair):
    a, b = pair
    b.settimeout(0.01)
    pixels = (np.arange(64 * 48).reshape(48, 64) % 251).astype(np.uint8)
    data = pack_image(pixels, pose(), "Im", TS)
    reader = MessageReader(b)
    timeouts = 0
    for start in range(0, len(data), 500):
        a.sendall(data[start:start + 500])
        msg = reader.read()
        if msg is None:
            timeouts += 1
            assert reader.read() is None  # nothing more has arrived: another timeout, data kept
    assert msg is not None and msg.device_name == "Im"
    assert timeouts == len(range(0, len(data), 500)) - 1
    np.testing.assert_array_equal(msg.image[0], pixels)


def test_peer_closing_mid_message_raises_stream_error(pair):
    a, b = pair
    a.sendall(pack_transform(np.eye(4), "T", TS)[:30])
    a.close()
    with pytest.raises(StreamError, match="middle of a message"):
        MessageReader(b).read()


def test_not_openigtlink_is_a_stream_error(pair):
    a, b = pair
    a.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 40)
    with pytest.raises(StreamError, match="header version"):
        MessageReader(b).read()


def image_message(pixels, matrix, system="ras", name="Image_Reference"):
    msg = ImageMessage(pixels, matrix, system, TS, name)
    return unpack(msg.pack())


def test_frame_from_image_ras():
    pixels = np.arange(6 * 8, dtype=np.uint8).reshape(1, 6, 8)
    frame = frame_from_image(image_message(pixels, pose()), 3, 123)
    assert frame.pixels.shape == (6, 8) and frame.pixels.dtype == np.uint8
    np.testing.assert_array_equal(frame.pixels, pixels[0])
    np.testing.assert_allclose(frame.image_to_reference, pose())
    assert frame.spacing_mm == (0.25, 0.5)  # (row, col): column j has length 0.25, i 0.5
    assert (frame.seq, frame.acquired_ns, frame.source_ts) == (3, 123, TS)
    assert frame.device_name == "Image_Reference"


def test_frame_from_image_converts_lps_to_ras():
    lps = pose()
    frame = frame_from_image(image_message(np.zeros((1, 6, 8), np.uint8), lps, "lps"), 0, 0)
    expected = lps.copy()
    expected[:2] *= -1
    np.testing.assert_allclose(frame.image_to_reference, expected)
    # the same physical point: pixel (2, 3) in RAS is the LPS point with x, y negated
    p = np.array([2, 3, 0, 1.0])
    np.testing.assert_allclose(frame.image_to_reference @ p, (lps @ p) * [-1, -1, 1, 1])


def test_frame_from_image_takes_a_separate_pose():
    separate = np.diag([0.3, 0.3, 1.0, 1.0])
    frame = frame_from_image(image_message(np.zeros((1, 6, 8), np.uint8), pose()), 0, 0,
                             image_to_reference=separate)
    np.testing.assert_allclose(frame.image_to_reference, separate)
    assert frame.spacing_mm == pytest.approx((0.3, 0.3))


def test_frame_from_image_rgb_to_grey():
    rgb = np.zeros((1, 2, 2, 3), np.uint8)
    rgb[0, 0, 0] = (255, 255, 255)
    rgb[0, 0, 1] = (255, 0, 0)
    frame = frame_from_image(image_message(rgb, np.eye(4)), 0, 0)
    assert frame.pixels.tolist() == [[255, 76], [0, 0]]


@pytest.mark.parametrize(
    "pixels, matrix, match",
    [
        (np.zeros((2, 4, 4), np.uint8), np.eye(4), "k=2 slices"),
        (np.zeros((1, 0, 4), np.uint8), np.eye(4), "empty"),
        (np.zeros((1, 4, 4), np.uint16), np.eye(4), "SCALAR_TYPE uint16"),
        (np.zeros((1, 4, 4, 2), np.uint8), np.eye(4), "NUM_COMPONENTS 2"),
        (np.zeros((1, 4, 4), np.uint8), np.diag([0.0, 1.0, 1.0, 1.0]), "positive, finite"),
    ],
)
def test_frame_from_image_refuses_what_is_not_a_bmode_frame(pixels, matrix, match):
    with pytest.raises(InputError, match=match):
        frame_from_image(image_message(pixels, matrix), 0, 0)


def test_an_image_above_its_type_limit_is_refused_from_its_header(pair):
    """An 8000x8000 IMAGE with a 2000x2000 frame limit: counted as oversize when its header
    arrives, its body never buffered (issue 9: one such frame took RSS from 0.5 to 3.6 GB)."""
    a, b = pair
    limit = image_body_limit(2000 * 2000)
    header = pack_image(np.zeros((1, 1), np.uint8), np.eye(4), "Image_Reference", TS)[:HEADER_SIZE]
    claim = bytearray(header)
    struct.pack_into(">Q", claim, 42, 72 + 8000 * 8000)  # BODY_SIZE of an 8000x8000 frame
    a.sendall(bytes(claim) + b"\0" * 1000)  # the start of the body, then nothing
    b.settimeout(0.2)
    reader = MessageReader(b, body_limits={"IMAGE": limit}, max_body_bytes=64 << 10)
    assert reader.read() is None  # timed out in the middle of the discarded body
    assert reader.stats.oversize == 1 and f"{limit}-byte limit for IMAGE" in reader.stats.last_error
    assert len(reader._buf) <= 1 << 20  # nothing of the claimed 64 MB was allocated
    assert 4 * 2000 * 2000 < limit < 4 * 2000 * 2000 + (128 << 10)
    a.close()  # the rest of the 64 MB never comes
    with pytest.raises(StreamError, match="in the middle of a message"):
        reader.read()


def renamed(data: bytes, name: bytes) -> bytes:
    """``data`` with DEVICE_NAME (header bytes 14..34) replaced; the CRC covers the body only."""
    return data[:14] + struct.pack("20s", name) + data[34:]


@pytest.mark.parametrize("name", [b"Img\n\nZZZZ", b"\x1b[1;31m\nX\x1b[2K\rFAKE", b"Im\x00g",
                                  b"Img\x7f", "Img\u009b".encode()])
def test_a_device_name_with_control_characters_is_dropped_as_malformed(pair, caplog, name):
    a, b = pair
    a.sendall(renamed(pack_transform(np.eye(4), "X", TS), name)
              + pack_transform(np.eye(4), "Next", TS))
    reader = MessageReader(b)
    with caplog.at_level(logging.WARNING, logger="regseg.stream.igtl.wire"):
        assert reader.read().device_name == "Next"
    assert reader.stats.malformed == 1 and reader.stats.messages == 1
    assert "control characters" in reader.stats.last_error
    [record] = caplog.records
    assert repr(name.decode()) in record.getMessage()  # named, escaped
    assert not any(ch in record.getMessage() for ch in "\n\r\x1b\x00\x7f\x9b")


def test_a_printable_utf8_device_name_is_accepted(pair):
    a, b = pair
    a.sendall(renamed(pack_transform(np.eye(4), "X", TS), "ImageΩ_Référence".encode()))
    msg = MessageReader(b).read()
    assert msg.device_name == "ImageΩ_Référence"


def test_peer_names_are_logged_with_repr(pair, caplog):
    """Red team: a TRANSFORM with a bad CRC put its raw name in our log; names are now quoted
    with repr (a quote or backslash shows as such, not as the end of the name)."""
    a, b = pair
    name = "It's\\'ok"
    a.sendall(corrupt_crc(pack_transform(np.eye(4), name, TS)) + pack_transform(np.eye(4), "N", TS))
    with caplog.at_level(logging.WARNING, logger="regseg.stream.igtl.wire"):
        assert MessageReader(b).read().device_name == "N"
    assert f"TRANSFORM {name!r} dropped, CRC64 does not match" in caplog.records[0].getMessage()


def test_frame_from_image_names_the_device_with_repr():
    msg = image_message(np.zeros((2, 4, 4), np.uint8), np.eye(4), name="Im'g")
    with pytest.raises(InputError, match=r"IMAGE \"Im'g\": SIZE k=2 slices"):
        frame_from_image(msg, 0, 0)
