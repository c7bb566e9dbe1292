"""Disconnects, server restarts and stalled senders: IgtlSource comes back by itself, and how fast.

The measured times are printed (pytest -s) for the note.
"""

import socket
import threading
import time

import numpy as np

from regseg.stream.igtl.codec import pack_image, pack_transform
from regseg.stream.igtl.server import IgtlServer
from regseg.stream.igtl.source import BACKOFF_FIRST_S, IgtlSource
from regseg.stream.igtl.status import pack_status

WAIT_S = 5.0
TS0 = 1_700_000_000.0


def image(timestamp: float) -> bytes:
    return pack_image(np.full((8, 8), 9, np.uint8), np.diag([0.2, 0.2, 1.0, 1.0]),
                      "Image_Reference", timestamp)


def take_until(source: IgtlSource, timestamp: float) -> float | None:
    """perf_counter() when the frame sent with ``timestamp`` came out of the slot, else None."""
    while (frame := source.slot.get(timeout=WAIT_S)) is not None:
        if abs(frame.source_ts - timestamp) < 1e-6:
            return time.perf_counter()
    return None


def test_dropped_connection_resumes_within_the_first_backoff():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_S)
    source = IgtlSource("127.0.0.1", listener.getsockname()[1])
    times = []
    try:
        source.start()
        for round_ in range(5):
            conn, _ = listener.accept()
            conn.sendall(image(TS0 + round_))
            assert take_until(source, TS0 + round_) is not None
            dropped = time.perf_counter()
            conn.close()  # the server drops us
            conn, _ = listener.accept()  # ... and we are back
            conn.sendall(image(TS0 + round_ + 0.5))
            back = take_until(source, TS0 + round_ + 0.5)
            assert back is not None
            times.append(back - dropped)
            if round_ < 4:
                conn.close()
    finally:
        source.stop()  # before the last close, which is then not a drop
        conn.close()
        listener.close()
    print(f"\nreconnect: drop -> next frame {1000 * min(times):.0f}..{1000 * max(times):.0f} ms "
          f"over {len(times)} drops (first backoff {1000 * BACKOFF_FIRST_S:.0f} ms)")
    assert max(times) < BACKOFF_FIRST_S + 0.5
    stats = source.stats()
    assert stats["disconnects"] == 9 and stats["connects"] == 10 and stats["reconnects"] == 9


def test_a_restarted_server_on_the_same_port_is_found_again():
    server = IgtlServer("127.0.0.1", 0)
    port = server.port
    source = IgtlSource("127.0.0.1", port)
    try:
        source.start()
        assert server.wait_for_clients(1, WAIT_S)
        server.broadcast([image(TS0)])
        assert take_until(source, TS0) is not None
        stopped = time.perf_counter()
        server.close()  # PLUS restarts: for a while nobody listens (connects are refused)
        server = IgtlServer("127.0.0.1", port)
        assert server.wait_for_clients(1, WAIT_S)
        server.broadcast([image(TS0 + 1)])
        back = take_until(source, TS0 + 1)
        assert back is not None
    finally:
        source.stop()
        server.close()
    print(f"\nreconnect: server restart on the same port -> frames again after "
          f"{1000 * (back - stopped):.0f} ms")
    assert back - stopped < 3.0


def test_a_stalled_sender_is_dropped_and_the_stream_resumes():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_S)
    source = IgtlSource("127.0.0.1", listener.getsockname()[1], stall_timeout_s=0.3)
    try:
        source.start()
        stalled, _ = listener.accept()
        stalled.sendall(image(TS0)[:30])  # half a header, then silence (connection kept open)
        start = time.perf_counter()
        conn, _ = listener.accept()  # the source gave up on the stalled one and came back
        detected = time.perf_counter() - start
        conn.sendall(image(TS0 + 1))
        assert take_until(source, TS0 + 1) is not None
        stats = source.stats()
        assert stats["stalls"] == 1 and stats["disconnects"] == 1
        stalled.close()
        conn.close()
    finally:
        source.stop()
        listener.close()
    print(f"\nstall: detected and reconnected {1000 * detected:.0f} ms after the last byte "
          "(stall_timeout_s 0.3)")
    assert 0.25 < detected < 0.3 + BACKOFF_FIRST_S + 0.5


def test_a_sender_trickling_bytes_is_stalled_on_whole_messages():
    """One byte every 50 ms never completes a message: stalled, although bytes keep coming (issue
    9: stall detection once counted bytes, and such a sender was never dropped)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_S)
    source = IgtlSource("127.0.0.1", listener.getsockname()[1], stall_timeout_s=0.4)
    done = threading.Event()
    last_byte = [0.0]

    def trickle(conn: socket.socket) -> None:
        try:
            for byte in image(TS0):
                conn.sendall(bytes([byte]))
                last_byte[0] = time.perf_counter()
                if done.wait(0.05):  # the sender's pace, not synchronisation
                    return
        except OSError:
            return  # the source closed the connection

    try:
        source.start()
        trickler, _ = listener.accept()
        start = time.perf_counter()
        thread = threading.Thread(target=trickle, args=(trickler,))
        thread.start()
        conn, _ = listener.accept()  # the source gave up on the trickler and came back
        detected = time.perf_counter()
        quiet = detected - last_byte[0]
        done.set()
        thread.join(WAIT_S)
        conn.sendall(image(TS0 + 1))
        assert take_until(source, TS0 + 1) is not None
        stats = source.stats()
        trickler.close()
        conn.close()
    finally:
        done.set()
        source.stop()
        listener.close()
    print(f"\nstall: a sender trickling a byte every 50 ms dropped and reconnected "
          f"{1000 * (detected - start):.0f} ms after its connection opened (stall_timeout_s 0.4; "
          f"its last byte {1000 * quiet:.0f} ms before)")
    assert stats["stalls"] == 1 and stats["disconnects"] == 1 and stats["frames"] == 1
    assert quiet < 0.4  # bytes were still arriving: only whole messages count
    assert 0.35 < detected - start < 0.4 + BACKOFF_FIRST_S + 0.5


def test_a_sender_of_keepalives_only_is_counted_not_stalled():
    """PLUS without images still sends STATUS every 0.25 s: alive (no reconnect), but counted and
    logged as sending no IMAGE."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_S)
    source = IgtlSource("127.0.0.1", listener.getsockname()[1], stall_timeout_s=0.3)
    pace = threading.Event()
    try:
        source.start()
        conn, _ = listener.accept()
        conn.sendall(image(TS0))
        assert take_until(source, TS0) is not None
        deadline = time.perf_counter() + WAIT_S
        for spell in (1, 2):  # each spell without IMAGE counted once, however long
            while source.keepalive_only < spell and time.perf_counter() < deadline:
                conn.sendall(pack_status(1, 0, "", "keep-alive", device_name=""))
                pace.wait(0.05)  # PLUS's keep-alive pace (faster here), not synchronisation
            for _ in range(3):  # a little longer: still the same spell
                conn.sendall(pack_status(1, 0, "", "keep-alive", device_name=""))
                pace.wait(0.05)
            assert source.keepalive_only == spell
            conn.sendall(image(TS0 + spell))
            assert take_until(source, TS0 + spell) is not None
        conn.close()
    finally:
        source.stop()
        listener.close()
    stats = source.stats()
    assert stats["keepalive_only"] == 2 and stats["stalls"] == 0 and stats["connects"] == 1
    assert stats["wire"]["ignored"] > 0 and stats["wire"]["unknown_type"] == 0


def test_a_pose_that_follows_its_image_is_waited_for_across_the_socket():
    """PLUS may send IMAGE before TRANSFORM (client-info order): each frame gets its own pose."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT_S)
    source = IgtlSource("127.0.0.1", listener.getsockname()[1])
    poses = []
    try:
        source.start()
        conn, _ = listener.accept()
        for i in range(6):
            pose = np.diag([0.2, 0.2, 1.0, 1.0])
            pose[:3, 3] = [i, 2 * i, 3 * i]
            poses.append(pose)
            conn.sendall(image(TS0 + i)
                         + pack_transform(pose, "ImageToReference", TS0 + i))
        received = []
        while (frame := source.slot.get(timeout=WAIT_S)) is not None:
            received.append(frame)
            if frame.source_ts == TS0 + 5:
                break
        conn.close()
    finally:
        source.stop()
        listener.close()
    for frame in received[1:]:  # the first went out before the order was known
        i = int(round(frame.source_ts - TS0))
        np.testing.assert_allclose(frame.image_to_reference, poses[i], atol=1e-6)
    pairing = source.stats()["pairing"]
    assert pairing["late_poses"] == 1 and pairing["poses_follow_images"]
    assert pairing["paired"] == 5
