"""IgtlServer and IgtlSink: what OpenIGTLink clients receive, and that no client can hold us up."""

import socket
import threading
import time
from dataclasses import replace

import numpy as np
import pyigtl
import pytest

from regseg.errors import InputError
from regseg.stream.igtl.codec import HEADER_SIZE, pack_image, pack_transform
from regseg.stream.igtl.server import IgtlServer
from regseg.stream.igtl.sink import IgtlSink, output_to_reference, pack_result
from regseg.stream.igtl.wire import MessageReader
from regseg.types import Frame, Result

TS = 1_700_000_000.75
WAIT_S = 5.0


def make_result(h=32, w=48, tracked=True, flagged=False, seq=5) -> Result:
    pose = np.eye(4)
    pose[:3, :3] = [[0, -0.3, 0], [0.2, 0, 0], [0, 0, 1]]  # col 0.2 mm, row 0.3 mm
    pose[:3, 3] = [1.0, 2.0, 3.0]
    frame = Frame(seq=seq, acquired_ns=1, pixels=np.zeros((h, w), np.uint8),
                  spacing_mm=(0.3, 0.2), image_to_reference=pose if tracked else None,
                  source_ts=TS)
    rng = np.random.default_rng(seq)
    mri_to_image = np.eye(4)
    mri_to_image[:3, 3] = [4.0, 5.0, 6.0]
    return Result(frame=frame, mri_to_image=mri_to_image,
                  warped_labels=np.zeros((h, w), np.uint8),
                  labels=rng.integers(0, 3, (h, w), dtype=np.uint8),
                  overlay=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                  quality=0.9, flagged=flagged, timings_ms={"total": 3.0})


def leftover_threads() -> list[str]:
    names = ("igtl-", "zmq-sink", "sim-igtl")
    return [t.name for t in threading.enumerate() if t.name.startswith(names)]


@pytest.fixture
def server():
    srv = IgtlServer()
    yield srv
    srv.close()
    assert not leftover_threads()


@pytest.fixture
def pyigtl_client(server):
    client = pyigtl.OpenIGTLinkClient("127.0.0.1", server.port)
    assert server.wait_for_clients(1, WAIT_S)
    yield client
    client.stop()


def test_pyigtl_client_receives_overlay_labels_and_transform(server, pyigtl_client):
    sink = IgtlSink(server)
    result = make_result()
    sink.submit(result)
    overlay = pyigtl_client.wait_for_message("Overlay", timeout=WAIT_S)
    labels = pyigtl_client.wait_for_message("Labels", timeout=WAIT_S)
    transform = pyigtl_client.wait_for_message("MRIToImage", timeout=WAIT_S)
    sink.close()
    assert overlay.image.shape == (1, 32, 48, 3)
    np.testing.assert_array_equal(overlay.image[0], result.overlay)
    assert labels.image.shape == (1, 32, 48) and labels.image.dtype == np.uint8
    np.testing.assert_array_equal(labels.image[0], result.labels)
    for image in (overlay, labels):
        assert image.world_coordinate_system == "ras" and image.timestamp == TS
        np.testing.assert_allclose(image.ijk_to_world_matrix, result.frame.image_to_reference,
                                   atol=1e-6)
        assert image.metadata == {"Seq": "5", "Quality": "0.9000", "Flagged": "false",
                                  "Flags": "", "ErrorMm": "nan", "SegConfidence": "nan"}
    np.testing.assert_allclose(transform.matrix, result.mri_to_image, atol=1e-6)
    assert transform.timestamp == TS and transform.metadata["TransformStatus"] == "OK"
    stats = sink.stats()
    # Overlay, Labels, MRILabels, TargetContour, MRIToImage
    assert stats["published"] == 1 and stats["server"]["messages_sent"] == 5


def test_untracked_frame_is_placed_by_its_spacing():
    result = make_result(tracked=False)
    expected = np.diag([0.2, 0.3, 1.0, 1.0])  # (i = column, j = row)
    np.testing.assert_allclose(output_to_reference(result.frame, (32, 48)), expected)


def test_half_resolution_output_covers_the_same_area():
    frame = make_result(h=32, w=48).frame
    half = output_to_reference(frame, (16, 24))
    # Output pixel (0, 0) covers frame pixels 0..1: its centre is at frame (0.5, 0.5).
    np.testing.assert_allclose(half @ [0, 0, 0, 1], frame.image_to_reference @ [0.5, 0.5, 0, 1])
    np.testing.assert_allclose(half @ [23, 15, 0, 1],
                               frame.image_to_reference @ [46.5, 30.5, 0, 1])


def test_flagged_registration_is_not_published_as_a_transform():
    messages = pack_result(make_result(flagged=True))
    assert [m[14:34].rstrip(b"\0") for m in messages] == [b"Overlay", b"Labels", b"MRILabels",
                                                           b"TargetContour"]
    messages = pack_result(make_result(flagged=True), send_flagged_transform=True)
    assert messages[-1][2:14].rstrip(b"\0") == b"TRANSFORM"
    assert b"INVALID" in messages[-1]


def test_untimed_frame_gets_the_wall_clock():
    result = make_result()
    result.frame = replace(result.frame, source_ts=0.0)
    before = time.time()
    data = pack_result(result)[0]
    timestamp = pyigtl.MessageBase.parse_header(data[:HEADER_SIZE])["timestamp"]
    assert before - 1e-6 <= timestamp <= time.time() + 1e-6


def test_a_client_that_never_reads_does_not_slow_broadcast_or_others(server):
    stalled = socket.create_connection(("127.0.0.1", server.port))  # never reads
    fast = socket.create_connection(("127.0.0.1", server.port))
    fast.settimeout(WAIT_S)
    assert server.wait_for_clients(2, WAIT_S)
    got_last = threading.Event()

    def read_fast():
        reader = MessageReader(fast)
        while (msg := reader.read()) is not None:
            if msg.device_name == "Last":
                got_last.set()
                return

    reader_thread = threading.Thread(target=read_fast)
    reader_thread.start()
    frame = pack_image(np.zeros((1000, 1000), np.uint8), np.eye(4), "Big", TS)  # 1 MB
    worst = 0.0
    for _ in range(60):  # 60 MB: far more than the stalled client's socket buffers hold
        start = time.perf_counter()
        server.broadcast([frame])
        worst = max(worst, time.perf_counter() - start)
    server.broadcast([pack_transform(np.eye(4), "Last", TS)])
    assert got_last.wait(WAIT_S)
    reader_thread.join(WAIT_S)
    assert worst < 0.5  # blocking on the stalled client would be for ever; typically < 1 ms
    assert server.stats()["drops"] > 0
    start = time.perf_counter()
    server.close()  # the stalled client's writer is blocked in sendall: close must still be quick
    assert time.perf_counter() - start < 2.0
    assert not leftover_threads()
    stalled.close()
    fast.close()


def test_messages_from_clients_reach_the_callback():
    received = []
    arrived = threading.Event()

    def on_message(message, peer):
        received.append((message.device_name, peer))
        arrived.set()

    with IgtlServer(on_message=on_message) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.sendall(pack_transform(np.eye(4), "MRIToReference", TS))
            assert arrived.wait(WAIT_S)
    assert received[0][0] == "MRIToReference" and received[0][1].startswith("127.0.0.1:")
    assert server.stats()["received"]["messages"] == 1


def test_disconnected_clients_are_removed(server):
    client = socket.create_connection(("127.0.0.1", server.port))
    assert server.wait_for_clients(1, WAIT_S)
    client.close()
    with server._lock:
        assert server._lock.wait_for(lambda: server.clients_connected == 0, timeout=WAIT_S)
    assert server.stats()["clients_accepted"] == 1


def test_sink_never_blocks_and_accounts_for_every_result(server):
    stalled = socket.create_connection(("127.0.0.1", server.port))
    assert server.wait_for_clients(1, WAIT_S)
    results = [make_result(h=240, w=320, seq=seq % 4) for seq in range(200)]
    sink = IgtlSink(server)
    try:
        start = time.perf_counter()
        for result in results:
            sink.submit(result)
        # Blocking would mean waiting on the stalled client for ever: any bound proves the point.
        assert time.perf_counter() - start < 2.0
    finally:
        sink.close()
    stats = sink.stats()
    assert stats["published"] + stats["skipped"] == stats["submitted"] == 200
    assert stats["pack_errors"] == 0
    stalled.close()


def test_bad_outputs_fail_when_the_sink_is_made(server):
    with pytest.raises(InputError, match="'ProstateContourOfTheGland'"):
        IgtlSink(server, contour_devices=("ProstateContourOfTheGland", "LesionContour"))
    with pytest.raises(InputError, match="header_version 3"):
        IgtlSink(server, header_version=3)  # no sink thread is left: the fixture checks


def test_metadata_carries_the_image_based_refinements_move_only_when_it_moved():
    from regseg.stream.igtl.sink import trust_metadata

    result = make_result()
    assert "Lc2MoveMm" not in trust_metadata(result)  # off, or no move applied
    assert "Lc2Significance" not in trust_metadata(result)  # off, or not computed
    moved = replace(result, lc2_move_mm=1.25)
    assert trust_metadata(moved)["Lc2MoveMm"] == "1.250"
    refused = replace(result, lc2_significance=1.2)  # computed, below 1.5: no move applied
    assert trust_metadata(refused)["Lc2Significance"] == "1.200"
    assert "Lc2MoveMm" not in trust_metadata(refused)
    # the labels' source is said when they are not the network's own (--seg-prior, withheld)
    assert "LabelsSource" not in trust_metadata(result)
    pooled = replace(result, labels_source="network+mri")
    assert trust_metadata(pooled)["LabelsSource"] == "network+mri"


def test_the_consensus_suggestion_goes_out_as_the_transform_an_operator_would_send_back():
    """SuggestedMRIToRef (MRIToReference convention: the inverse of the suggested
    reference_to_mri) goes out only when the consensus holds, before MRIToImage; regseg itself
    applies nothing (tests/stream/test_consensus.py)."""
    from pyigtl.messages import MessageBase

    assert "SuggestedMRIToRef" not in [m[14:34].rstrip(b"\0").decode()
                                       for m in pack_result(make_result())]
    suggested = np.eye(4)
    suggested[:3, 3] = [2.0, -1.0, 3.5]  # a shift of the MRI: Reference -> MRI
    result = replace(make_result(), suggested_reference_to_mri=suggested)
    messages = pack_result(result)
    names = [m[14:34].rstrip(b"\0").decode() for m in messages]
    assert names[-2:] == ["SuggestedMRIToRef", "MRIToImage"]
    data = messages[-2]
    fields = MessageBase.parse_header(data[:HEADER_SIZE])
    msg = MessageBase.create_message(fields["message_type"])
    msg.unpack(fields, data[HEADER_SIZE:])
    np.testing.assert_allclose(msg.matrix, np.linalg.inv(suggested), atol=1e-6)
    assert pack_result(result, suggestion_device=None)[-2][14:34].rstrip(b"\0") != \
        b"SuggestedMRIToRef"
