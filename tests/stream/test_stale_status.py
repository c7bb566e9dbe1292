"""Staleness is visible: with no new Result for a while, Slicer gets a STATUS saying so (issue 9),
and one saying OK once Results flow again. No sleeps: the client waits on the messages."""

import json
import socket

import numpy as np
import zmq

from regseg.stream.igtl.codec import HEADER, HEADER_SIZE
from regseg.stream.igtl.server import IgtlServer
from regseg.stream.igtl.sink import IgtlSink
from regseg.stream.igtl.status import (
    STATUS_OK,
    STATUS_TIME_OUT,
    pack_status,
    unpack_status,
)
from regseg.stream.zmq_sink import ZmqSink
from regseg.types import Frame, Result

WAIT_S = 5.0


def make_result(seq: int) -> Result:
    frame = Frame(seq=seq, acquired_ns=1, pixels=np.zeros((8, 8), np.uint8),
                  spacing_mm=(0.2, 0.2), image_to_reference=np.diag([0.2, 0.2, 1.0, 1.0]),
                  source_ts=1_700_000_000.0 + seq)
    zeros = np.zeros((8, 8), np.uint8)
    return Result(frame=frame, mri_to_image=np.eye(4), warped_labels=zeros, labels=zeros,
                  overlay=np.zeros((8, 8, 3), np.uint8), quality=0.9, flagged=False)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    return bytes(data)


def next_of(sock: socket.socket, kind: bytes) -> bytes:
    """The next whole message of type ``kind`` (others skipped); the socket timeout bounds it."""
    while True:
        header = recv_exactly(sock, HEADER_SIZE)
        body_size = HEADER.unpack(header)[5]
        message = header + recv_exactly(sock, body_size)
        if header[2:14].rstrip(b"\0") == kind:
            return message


def test_status_round_trip_in_both_header_versions():
    for version in (1, 2):
        data = pack_status(STATUS_TIME_OUT, 3, "stale", "stale: no frame for 3 s",
                           header_version=version)
        assert unpack_status(data) == (STATUS_TIME_OUT, 3, "stale", "stale: no frame for 3 s")


def test_a_stale_stream_says_so_and_then_says_it_is_live_again():
    with IgtlServer() as server, socket.create_connection(("127.0.0.1", server.port)) as slicer:
        slicer.settimeout(WAIT_S)
        assert server.wait_for_clients(1, WAIT_S)
        sink = IgtlSink(server, stale_after_s=0.2)
        try:
            sink.submit(make_result(1))
            next_of(slicer, b"TRANSFORM")  # the Result's last message
            code, subcode, name, text = unpack_status(next_of(slicer, b"STATUS"))
            assert (code, name) == (STATUS_TIME_OUT, "stale")
            assert text.startswith("stale: no frame for") and subcode == 0  # 0.2 s: 0 whole s
            again = unpack_status(next_of(slicer, b"STATUS"))  # repeated while stale
            assert again[0] == STATUS_TIME_OUT
            sink.submit(make_result(2))
            next_of(slicer, b"TRANSFORM")
            code, _, _, text = unpack_status(next_of(slicer, b"STATUS"))
            assert code == STATUS_OK and text == "ok: live"
        finally:
            sink.close()
        assert sink.stats()["stale_reports"] >= 2


def test_no_status_while_results_keep_coming():
    with IgtlServer() as server, socket.create_connection(("127.0.0.1", server.port)) as slicer:
        slicer.settimeout(WAIT_S)
        assert server.wait_for_clients(1, WAIT_S)
        sink = IgtlSink(server, stale_after_s=WAIT_S)
        try:
            for seq in range(20):
                sink.submit(make_result(seq))
                next_of(slicer, b"TRANSFORM")  # one at a time: nothing is skipped
        finally:
            sink.close()
        assert sink.stats()["stale_reports"] == 0 and sink.stats()["published"] == 20


def test_zmq_subscribers_of_the_status_topic_hear_stale_and_live():
    context = zmq.Context.instance()
    sink = ZmqSink("tcp://127.0.0.1:*", stale_after_s=0.2, context=context)
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"status.regseg")
    sub.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
    sub.connect(sink.endpoint)
    try:
        # Slow joiner: statuses repeat every 0.2 s while stale, so one arrives once connected.
        topic, header = sub.recv_multipart()
        status = json.loads(header)
        assert topic == b"status.regseg" and status["stale"] is True
        assert status["no_frame_for_s"] >= 0.2 and status["last_seq"] == -1
        sink.submit(make_result(7))
        while (status := json.loads(sub.recv_multipart()[1]))["stale"]:
            pass  # a stale report may have been in flight before the Result
        assert status["last_seq"] == 7 and status["no_frame_for_s"] == 0.0
    finally:
        sub.close(linger=0)
        sink.close()
    assert sink.stats()["stale_reports"] >= 1
