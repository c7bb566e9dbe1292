"""IgtlSource against pyigtl's server and against a raw socket that misbehaves."""

import socket
import time

import numpy as np
import pyigtl
import pytest

from regseg.stream.igtl.codec import pack_image
from regseg.stream.igtl.sim_server import SimIgtlServer
from regseg.stream.igtl.source import IgtlSource
from regseg.stream.slot import LatestSlot
from regseg.types import Frame

TS = 1_700_000_000.5
WAIT_S = 5.0


def image_to_reference() -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = [[0, -0.2, 0], [0.2, 0, 0], [0, 0, 1]]
    m[:3, 3] = [5.0, -7.0, 30.0]
    return m


@pytest.fixture
def listener():
    """A bare listening socket: the test plays the server, byte by byte."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(WAIT_S)
    yield sock
    sock.close()


def started(source: IgtlSource) -> IgtlSource:
    source.start()
    return source


def test_frames_from_pyigtl_server_with_separate_transform(pyigtl_server):
    slot: LatestSlot = LatestSlot()
    source = started(IgtlSource("127.0.0.1", pyigtl_server.port, slot))
    try:
        assert source.connected.wait(WAIT_S)
        pixels = np.arange(30 * 40, dtype=np.uint16).reshape(1, 30, 40).astype(np.uint8)
        pose = image_to_reference()
        pyigtl_server.send_message(pyigtl.TransformMessage(pose, TS, "ImageToReference"),
                                   wait=False)
        # The IMAGE's own matrix differs: the separate TRANSFORM must win.
        pyigtl_server.send_message(pyigtl.ImageMessage(pixels, np.eye(4), "ras", TS,
                                                       "Image_Reference"), wait=False)
        frame = slot.get(timeout=WAIT_S)
        assert frame is not None
        np.testing.assert_array_equal(frame.pixels, pixels[0])
        np.testing.assert_allclose(frame.image_to_reference, pose, atol=1e-6)
        assert frame.spacing_mm == pytest.approx((0.2, 0.2))
        assert frame.source_ts == TS and frame.seq == 0
        assert frame.device_name == "Image_Reference" and frame.truth is None
        assert source.stats()["transform_ts_mismatch"] == 0
    finally:
        source.stop()
    assert source.finished and slot.closed
    assert source.knows_truth is False


def test_image_matrix_in_lps_is_used_when_no_transform_comes(pyigtl_server):
    source = started(IgtlSource("127.0.0.1", pyigtl_server.port))
    try:
        assert source.connected.wait(WAIT_S)
        lps = np.diag([0.5, 0.5, 1.0, 1.0])
        lps[:3, 3] = [10.0, 20.0, 30.0]
        pyigtl_server.send_message(pyigtl.ImageMessage(np.zeros((1, 8, 8), np.uint8), lps, "lps",
                                                       TS, "Image_Reference"), wait=False)
        frame = source.slot.get(timeout=WAIT_S)
        expected = lps.copy()
        expected[:2] *= -1
        np.testing.assert_allclose(frame.image_to_reference, expected)
    finally:
        source.stop()


def test_bad_messages_and_other_devices_do_not_stop_the_source(listener):
    source = started(IgtlSource("127.0.0.1", listener.getsockname()[1]))
    conn, _ = listener.accept()
    try:
        bad_crc = bytearray(pack_image(np.zeros((4, 4), np.uint8), np.eye(4), "Image_Reference",
                                       TS))
        bad_crc[-10] ^= 0xFF
        uint16 = pyigtl.ImageMessage(np.zeros((1, 4, 4), np.uint16), np.eye(4), "ras", TS,
                                     "Image_Reference")
        conn.sendall(
            pack_image(np.ones((4, 4), np.uint8), np.eye(4), "Image_Reference", TS)  # in use
            + bytes(bad_crc)
            + pack_image(np.zeros((4, 4), np.uint8), np.eye(4), "Other", TS)
            + uint16.pack()  # a frame frame_from_image refuses
        )
        frames = [source.slot.get(timeout=WAIT_S)]
        conn.sendall(pack_image(np.full((4, 4), 2, np.uint8), np.eye(4), "Image_Reference",
                                TS + 1))
        while frames[-1] is not None and frames[-1].source_ts != TS + 1:
            frames.append(source.slot.get(timeout=WAIT_S))
        stats = source.stats()
        assert frames[-1] is not None and frames[-1].pixels[0, 0] == 2
        assert stats["wire"]["bad_crc"] == 1
        assert stats["other_devices"] == 1
        assert stats["bad_frames"] == 1
        assert stats["device"] == "Image_Reference"
        assert not source.finished
    finally:
        conn.close()
        source.stop()


def test_reconnects_after_the_server_drops_the_connection(listener):
    source = started(IgtlSource("127.0.0.1", listener.getsockname()[1]))
    try:
        for n in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.sendall(pack_image(np.full((4, 4), n, np.uint8), np.eye(4),
                                        "Image_Reference", TS + n))
                frame = source.slot.get(timeout=WAIT_S)
                assert frame is not None and frame.seq == n and frame.pixels[0, 0] == n
        stats = source.stats()
        # The second connection exists, so the drop was seen and a reconnect made.
        assert stats["disconnects"] >= 1 and stats["reconnects"] >= 1 and stats["connects"] == 2
    finally:
        source.stop()


def test_no_reconnect_ends_the_source_and_closes_the_slot(listener):
    source = started(IgtlSource("127.0.0.1", listener.getsockname()[1], reconnect=False))
    conn, _ = listener.accept()
    conn.close()
    assert source.slot.get(timeout=WAIT_S) is None and source.slot.closed
    source.stop()
    assert source.finished and source.stats()["disconnects"] == 1


def test_stop_is_prompt_while_connected_or_backing_off(listener, free_port):
    connected = started(IgtlSource("127.0.0.1", listener.getsockname()[1], poll_s=30.0))
    conn, _ = listener.accept()
    assert connected.connected.wait(WAIT_S)
    refused = started(IgtlSource("127.0.0.1", free_port()))
    try:
        start = time.monotonic()
        connected.stop()  # blocked in recv with a 30 s timeout: shutdown() must wake it
        refused.stop()  # waiting out a backoff: the stop Event must wake it
        assert time.monotonic() - start < 1.0
        assert connected.finished and refused.finished
        assert refused.stats()["connect_failures"] >= 1
    finally:
        conn.close()


class FakeScanner:
    """SimulatedScanner's API in miniature: frame i has pixel value i, translation (i, 0, 0)."""

    class config:  # noqa: N801 - mirrors scanner.config.fps
        fps = 25.0

    def frame(self, index: int) -> Frame:
        pose = image_to_reference()
        pose[0, 3] = float(index)
        return Frame(seq=index, acquired_ns=0, pixels=np.full((16, 24), index % 256, np.uint8),
                     spacing_mm=(0.2, 0.2), image_to_reference=pose)


def test_sim_server_frames_arrive_in_order_and_match_ground_truth():
    scanner = FakeScanner()
    with SimIgtlServer(scanner, fps=0, max_frames=40) as sim:
        source = started(IgtlSource("127.0.0.1", sim.port))
        try:
            frames = []
            while not frames or sim.index_for(frames[-1].source_ts) != 39:
                frame = source.slot.get(timeout=WAIT_S)
                assert frame is not None
                frames.append(frame)
        finally:
            source.stop()
    indices = [sim.index_for(f.source_ts) for f in frames]
    assert indices == sorted(indices) and indices[-1] == 39 and None not in indices
    for frame, index in zip(frames, indices, strict=True):
        assert frame.pixels[0, 0] == index
        truth = scanner.frame(index).image_to_reference
        np.testing.assert_allclose(frame.image_to_reference, truth, atol=1e-5)
    assert source.stats()["transform_ts_mismatch"] == 0
    assert sim.stats()["frames_sent"] == 40


def test_sim_server_paces_frames_with_the_scanner_rate():
    with SimIgtlServer(FakeScanner(), fps=None, max_frames=6) as sim:  # 25 fps: 5 periods
        with socket.create_connection(("127.0.0.1", sim.port)):
            start = time.monotonic()
            assert sim.done.wait(WAIT_S)
            elapsed = time.monotonic() - start
    assert 0.18 <= elapsed < 2.0
    stamps = sorted(sim.sent)
    # Each frame has its own deadline, t0 + n * 40 ms: the first may be late, never early.
    assert stamps[-1] - stamps[0] >= 0.15


def test_sim_server_stops_while_waiting_for_a_client():
    sim = SimIgtlServer(FakeScanner())
    sim.start()
    start = time.monotonic()
    sim.stop()
    assert time.monotonic() - start < 1.0 and sim.done.is_set() and sim.frames_sent == 0
