"""ZmqSink: JSON header + raw buffers to a SUB socket, decode(), and its error paths."""

import json
import socket
import struct
import time
from dataclasses import replace

import numpy as np
import pytest
import zmq

from regseg.errors import InputError, StreamError
from regseg.stream.zmq_sink import ZmqSink, decode, decode_parts, encode
from regseg.types import Frame, Result

WAIT_S = 5.0


def make_result(seq=3, quality=0.8) -> Result:
    rng = np.random.default_rng(seq)
    frame = Frame(seq=seq, acquired_ns=123_456_789, pixels=np.zeros((24, 40), np.uint8),
                  spacing_mm=(0.3, 0.2), image_to_reference=np.diag([0.2, 0.3, 1.0, 1.0]),
                  source_ts=1_700_000_000.5)
    return Result(frame=frame, mri_to_image=np.eye(4) * 2,
                  warped_labels=np.zeros((24, 40), np.uint8),
                  labels=rng.integers(0, 3, (24, 40), dtype=np.uint8),
                  overlay=rng.integers(0, 256, (24, 40, 3), dtype=np.uint8),
                  quality=quality, flagged=False, timings_ms={"affine": 1.5, "total": 4.0})


@pytest.fixture
def sink():
    s = ZmqSink("tcp://127.0.0.1:*")
    yield s
    s.close()


@pytest.fixture
def subscriber(sink):
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"regseg")
    sub.connect(sink.endpoint)
    yield sub
    sub.close()


def receive(sink, subscriber, result):
    """Submit until one arrives: a PUB drops what it sends before the SUB has joined."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        sink.submit(result)
        if subscriber.poll(100):
            return subscriber.recv_multipart(copy=False)
    raise AssertionError("nothing received from the ZMQ sink")


def test_round_trip_through_a_sub_socket(sink, subscriber):
    result = make_result()
    header, overlay, labels = decode(receive(sink, subscriber, result))
    np.testing.assert_array_equal(overlay, result.overlay)
    np.testing.assert_array_equal(labels, result.labels)
    assert header["seq"] == 3 and header["source_ts"] == 1_700_000_000.5
    assert header["acquired_ns"] == 123_456_789
    assert header["overlay"] == {"shape": [24, 40, 3], "dtype": "uint8"}
    assert header["labels"] == {"shape": [24, 40], "dtype": "uint8"}
    assert header["spacing_mm"] == [0.3, 0.2]
    assert header["mri_to_image"] == (np.eye(4) * 2).tolist()
    assert header["image_to_reference"] == np.diag([0.2, 0.3, 1.0, 1.0]).tolist()
    assert header["quality"] == 0.8 and header["flagged"] is False
    assert header["timings_ms"] == {"affine": 1.5, "total": 4.0}
    sink.close()  # the count follows the send, which can return after the subscriber has it
    assert sink.stats()["published"] >= 1


def trusted_result(flagged: bool) -> Result:
    warped = np.zeros((24, 40), np.uint8)
    warped[5:15, 10:30] = 1
    warped[8:12, 14:18] = 2
    return replace(make_result(), warped_labels=warped, flagged=flagged,
                   flags=("error_estimate",) if flagged else (), error_mm=1.25,
                   seg_confidence=0.9, target_ij=(15.5, 9.5), target_margin_mm=2.5)


def test_trust_fields_and_mri_labels_in_the_message():
    result = trusted_result(flagged=False)
    header, arrays = decode_parts([bytes(p) for p in encode(result)])
    np.testing.assert_array_equal(arrays["mri_labels"], result.warped_labels)
    assert header["v"] == 2 and header["flags"] == [] and header["error_mm"] == 1.25
    assert header["seg_confidence"] == 0.9 and header["target_margin_mm"] == 2.5
    assert header["target_ij"] == [15.5, 9.5]
    # the frame's ImageToReference is diag(0.2, 0.3, 1): column i -> x, row j -> y
    assert header["target_mm"] == pytest.approx([15.5 * 0.2, 9.5 * 0.3, 0.0])
    assert header["jump_mm"] is None  # NaN: no temporal filter


def test_flagged_message_carries_no_mri_labels_or_target():
    header, arrays = decode_parts([bytes(p) for p in encode(trusted_result(flagged=True))])
    assert header["flagged"] is True and header["flags"] == ["error_estimate"]
    assert not arrays["mri_labels"].any()
    assert header["target_mm"] is None and header["target_ij"] is None
    assert header["mri_to_image"] is None  # a flagged registration is not sent as truth


def test_a_result_that_cannot_be_encoded_is_counted_not_fatal(sink):
    bad = replace(make_result(), timings_ms={"total": "slow"})  # not a number: no JSON header
    sink.submit(bad)
    sink.close()  # the thread takes what is pending before it ends
    stats = sink.stats()
    assert stats["encode_errors"] == 1 and stats["submitted"] == 1 and stats["published"] == 0


def test_header_is_strict_json_without_nan():
    parts = encode(make_result(quality=float("nan")))
    header = json.loads(parts[1], parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert header["quality"] is None


def test_submit_never_blocks_without_subscribers(sink):
    results = [make_result(seq=seq % 7) for seq in range(500)]
    start = time.perf_counter()
    for result in results:
        sink.submit(result)
    assert time.perf_counter() - start < 2.0  # a blocking submit would show as seconds
    sink.close()
    stats = sink.stats()
    assert stats["published"] + stats["skipped"] + stats["drops"] == stats["submitted"] == 500


def test_bind_conflict_is_a_stream_error(sink):
    with pytest.raises(StreamError, match="cannot bind"):
        ZmqSink(sink.endpoint)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: p[:3], "3 parts"),
        (lambda p: [p[0], b"{not json", *p[2:]], "not JSON"),
        (lambda p: [p[0], p[1], bytes(p[2])[:-1], *p[3:]], "bytes for shape"),
        (lambda p: [p[0], p[1].replace(b'"uint8"', b'"object"', 1), *p[2:]], "dtype 'object'"),
        (lambda p: [p[0], b"[1]", *p[2:]], "JSON list"),
        (lambda p: [p[0], p[1], p[2], p[3], bytes(p[4])[:-1]], "mri_labels: .* bytes for shape"),
    ],
)
def test_decode_refuses_what_does_not_match_its_header(mutate, match):
    parts = [bytes(p) for p in encode(make_result())]
    with pytest.raises(InputError, match=match):
        decode(mutate(parts))


def test_header_says_how_far_the_image_based_refinement_moved_the_plane():
    off = json.loads(encode(make_result())[1])
    assert off["lc2_move_mm"] is None  # off, or no move applied: null, never NaN
    assert off["lc2_significance"] is None
    moved = make_result()
    moved.lc2_move_mm, moved.lc2_significance = 2.75, 1.875
    header = json.loads(encode(moved)[1])
    assert header["lc2_move_mm"] == 2.75 and header["lc2_significance"] == 1.875


def _raw_sub_peer(endpoint: str) -> socket.socket:
    """A subscriber speaking ZMTP 3.0 by hand (greeting and READY as a SUB), as an attacker
    would: pyzmq's SUB never sends a message that large."""

    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    peer = socket.create_connection((host, int(port)), timeout=WAIT_S)
    peer.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0")
                 + b"\x00" + b"\0" * 31)
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", 3) + b"SUB"
    peer.sendall(b"\x04" + bytes([len(body)]) + body)
    return peer


def test_a_subscriber_sending_a_huge_message_is_disconnected_and_others_are_served(
        sink, subscriber):
    """Red-team finding (session 32): libzmq builds a peer's message whole before it looks at
    it, so one 16 MB 'subscription' grew the publisher by 1.9 GB. The cap drops the peer at
    its header; a well-behaved subscriber is still served."""
    peer = _raw_sub_peer(sink.endpoint)
    size = 64 << 20  # declared; the peer is gone long before this much is sent
    peer.sendall(b"\x02" + struct.pack(">Q", size) + b"\x01")
    sent, closed = 1, False
    chunk = b"A" * (1 << 20)
    try:
        while sent < size:
            peer.sendall(chunk)
            sent += len(chunk)
    except OSError:  # reset or broken pipe: the publisher hung up
        closed = True
    finally:
        peer.close()
    assert closed, "the publisher took a 64 MB subscription"
    assert sent < 32 << 20  # it hung up early, not at the end
    header, _, _ = decode(receive(sink, subscriber, make_result(seq=11)))
    assert header["seq"] == 11


@pytest.mark.parametrize("allowed, served", [("127.0.0.1", True), ("10.255.255.1", False)])
def test_allow_lets_only_the_named_hosts_subscribe(allowed, served):
    sink = ZmqSink("tcp://127.0.0.1:*", allow=frozenset({allowed}))
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"regseg")
    sub.connect(sink.endpoint)
    try:
        if served:
            header, _, _ = decode(receive(sink, sub, make_result(seq=12)))
            assert header["seq"] == 12
        else:
            with pytest.raises(AssertionError, match="nothing received"):
                receive(sink, sub, make_result(seq=12))
    finally:
        sub.close()
        sink.close()


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5556", True), ("tcp://localhost:5556", True), ("tcp://[::1]:5556", True),
    ("ipc:///tmp/regseg", True), ("tcp://0.0.0.0:5556", False), ("tcp://10.0.0.5:5556", False),
    ("tcp://*:5556", False)])
def test_the_cli_warns_of_an_endpoint_beyond_loopback(endpoint, local):
    from regseg.stream.cli import _loopback_endpoint

    assert _loopback_endpoint(endpoint) is local
