"""regseg against the OpenIGTLink reference implementation (Debian's 1.11 example programs).

Both directions: the reference ``ImagerServer`` feeds regseg, and the reference receivers
(``ReceiveClient``, ``ReceiveServer``, ``PolyDataClient``) parse what regseg sends. They print a
message's fields only after ``Unpack(1)`` reports a valid CRC, so a printed field is a parsed
message with a good CRC. OpenIGTLink 1.11 speaks header v1 only: what it makes of a v2 header is
tested too (it loses step), which is why regseg can send v1 (``--igtl-header-version 1``).
"""

from __future__ import annotations

import re
import socket
import threading
import time

import numpy as np
import pytest

from regseg.stream.igtl import server as igtl_server
from regseg.stream.igtl.polydata import label_outlines
from regseg.stream.igtl.server import IgtlServer
from regseg.stream.igtl.sink import IgtlSink, pack_result
from regseg.stream.igtl.source import IgtlSource
from regseg.types import Frame, Result

WAIT_S = 10.0
TS = 1_700_000_000.25
CONTOURS = ("ProstateContour", "LesionContour")


def connect_when_listening(port: int, timeout_s: float = WAIT_S) -> socket.socket:
    """Connect to a reference program's server as soon as it listens (a child process has no
    other readiness signal than its port; retried every 20 ms, bounded by timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1.0)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def make_result(seq: int, h: int = 30, w: int = 40, flagged: bool = False) -> Result:
    pose = np.diag([0.25, 0.5, 1.0, 1.0])
    pose[:3, 3] = [10.0, -20.0, 5.0]
    frame = Frame(seq=seq, acquired_ns=0, pixels=np.zeros((h, w), np.uint8),
                  spacing_mm=(0.5, 0.25), image_to_reference=pose, source_ts=TS + seq)
    labels = np.zeros((h, w), np.uint8)
    labels[5:20, 8:30] = 1
    labels[9:14, 12:18] = 2
    mri_to_image = np.eye(4)
    mri_to_image[:3, 3] = [1.5, -2.25, 3.0 + seq]
    overlay = np.random.default_rng(seq).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Result(frame=frame, mri_to_image=mri_to_image, warped_labels=labels, labels=labels,
                  overlay=overlay, quality=0.9, flagged=flagged)


def device_names(text: str) -> list[str]:
    return re.findall(r"Device Name\s*:\s*(\S+)", text)


def sent(messages: list[bytes], kind: bytes) -> list[str]:
    """Device names of the ``kind`` messages among packed ``messages``, in order: what a
    receiver must print (the set of outputs grows; the tests follow what the sink sends)."""
    return [m[14:34].rstrip(b"\0").decode() for m in messages if m[2:14].rstrip(b"\0") == kind]


def test_imager_server_feeds_regseg_pixel_exact(igtl_examples, run_program, free_port):
    port = free_port()
    raw = [np.fromfile(igtl_examples / "img" / f"igtlTestImage{k}.raw", np.uint8)
           .reshape(256, 256) for k in range(1, 6)]
    with run_program([igtl_examples / "ImagerServer", port, 50, igtl_examples / "img"]):
        source = IgtlSource("127.0.0.1", port, backoff_s=0.02, backoff_max_s=0.1)
        source.start()  # retried with backoff until the reference server listens
        frames = []
        try:
            while len(frames) < 6 and (frame := source.slot.get(timeout=WAIT_S)) is not None:
                frames.append(frame)
        finally:
            source.stop()
    assert len(frames) == 6
    matched = []
    for frame in frames:
        assert frame.device_name == "ImagerClient" and frame.pixels.shape == (256, 256)
        assert frame.spacing_mm == pytest.approx((1.0, 1.0))
        # ImagerServer's matrix flips j: column j of image_to_reference points along -y (RAS).
        np.testing.assert_allclose(np.abs(frame.image_to_reference[:3, :2]),
                                   [[1, 0], [0, 1], [0, 0]], atol=1e-6)
        matched.append([k for k, image in enumerate(raw) if np.array_equal(frame.pixels, image)])
    assert all(len(m) == 1 for m in matched), "every frame is one test image, bit for bit"
    assert source.stats()["wire"]["bad_crc"] == 0 and source.stats()["bad_frames"] == 0


def test_imager_server_feeds_regseg_stream_and_receive_client_parses_its_output(
        igtl_examples, run_program, tmp_path, monkeypatch, free_port):
    """The whole chain with the reference programs at both ends:
    ImagerServer -> regseg-stream (--igtl-header-version 1) -> ReceiveClient."""
    from regseg.models.checkpoint import save_checkpoint
    from regseg.models.registry import build_config, build_model, default_weights_path
    from regseg.sim.phantom import make_phantom, write_phantom
    from regseg.stream.cli import main

    weights = default_weights_path("alignsegnet")
    if not weights.exists():  # the chain is under test, not accuracy
        weights = save_checkpoint(tmp_path / "untrained.pt", "alignsegnet",
                                  build_model("alignsegnet"), build_config("alignsegnet"))
    mri_path, labels_path = write_phantom(make_phantom(0), tmp_path)
    imager_port, serve_port = free_port(), free_port()
    listening = threading.Event()
    servers: list[IgtlServer] = []
    receiver_connected = threading.Event()

    class WatchedServer(IgtlServer):
        """regseg's own server, announcing itself and waiting for the reference receiver."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)
            listening.set()
            receiver_connected.wait(WAIT_S)

    monkeypatch.setattr(igtl_server, "IgtlServer", WatchedServer)
    started: dict = {}

    def start_receiver() -> None:  # regseg-stream holds the main thread (signals need it)
        if listening.wait(120):
            # Keep the context manager: dropping it would close its generator (and the program).
            started["cm"] = run_program([igtl_examples / "ReceiveClient", "127.0.0.1", serve_port])
            started["client"] = started["cm"].__enter__()
            servers[0].wait_for_clients(1, WAIT_S)
        receiver_connected.set()

    receiver = threading.Thread(target=start_receiver, daemon=True)
    argv = ["--mri", str(mri_path), "--mri-labels", str(labels_path), "--weights", str(weights),
            "--source", f"igtl://127.0.0.1:{imager_port}", "--serve",
            f"igtl://127.0.0.1:{serve_port}", "--zmq", "none", "--igtl-header-version", "1",
            "--device", "cpu", "--threads", "1", "--max-frames", "3", "--quiet"]
    with run_program([igtl_examples / "ImagerServer", imager_port, 20, igtl_examples / "img"]):
        receiver.start()
        try:
            code = main(argv)
        finally:
            listening.set()
            receiver.join(WAIT_S)
        assert code == 0
        client = started["client"]
        try:
            assert servers[0].stats()["clients_connected"] == 1, client.output()
            # The last result's outlines follow its Labels: wait for them before closing.
            assert client.wait_for_output(lambda t: device_names(t).count("Labels") >= 3
                                          and t.count("Receiving : POLYDATA") >= 6, WAIT_S)
        finally:
            for server in servers:
                server.close()
    text = client.output()
    names = device_names(text)
    assert names.count("Overlay") >= 3 and names.count("Labels") >= 3
    # POLYDATA is not known to ReceiveClient: skipped by its BODY_SIZE, the next IMAGE still
    # parses, so our sizes are right.
    assert text.count("Receiving : POLYDATA") >= 6


@pytest.mark.parametrize("contours", [True, False])
def test_receive_client_parses_every_message_regseg_sends_with_header_v1(
        igtl_examples, run_program, contours):
    server = IgtlServer()
    sink = IgtlSink(server, header_version=1, contour_devices=CONTOURS if contours else None)
    try:
        with run_program([igtl_examples / "ReceiveClient", "127.0.0.1", server.port]) as client:
            assert server.wait_for_clients(1, WAIT_S)
            for seq in range(3):
                sink.submit(make_result(seq))
                # One at a time: the sink keeps only the newest result for a slow client.
                assert client.wait_for_output(
                    lambda t, n=seq + 1: t.count("Receiving TRANSFORM") >= n, WAIT_S)
            sink.close()
            server.close()  # ReceiveClient exits 0 when the connection closes
            assert client.wait_for_output(lambda t: False, WAIT_S) is False
            code = client.stop()
        err, out = client.output(), client.output("stdout")
    finally:
        sink.close()
        server.close()
    assert code == 0, err
    one = pack_result(make_result(0), header_version=1,
                      contour_devices=CONTOURS if contours else None)
    images = sent(one, b"IMAGE")
    assert images[:2] == ["Overlay", "Labels"] and len(sent(one, b"TRANSFORM")) == 1
    assert device_names(err) == images * 3
    assert err.count("Dimensions            : (40, 30, 1)") == 3 * len(images)
    assert err.count("Spacing               : (0.25, 0.5, 1)") == 3 * len(images)
    assert err.count("Receiving : POLYDATA") == 3 * len(sent(one, b"POLYDATA"))
    assert len(sent(one, b"POLYDATA")) >= (2 if contours else 0)
    assert "Time stamp: 1700000002.250000000" in err
    # PrintMatrix (stdout) runs only after the TRANSFORM's CRC checked out: our translations.
    for seq in range(3):
        assert f"1, 0, 0, 1.5\n0, 1, 0, -2.25\n0, 0, 1, {3 + seq}\n0, 0, 0, 1\n" in out, out


def test_a_v2_header_is_lost_on_the_1_11_library_so_we_send_v1_to_it(igtl_examples,
                                                                       run_program):
    server = IgtlServer()
    try:
        with run_program([igtl_examples / "ReceiveClient", "127.0.0.1", server.port]) as client:
            assert server.wait_for_clients(1, WAIT_S)
            server.broadcast(pack_result(make_result(0), header_version=2))
            assert client.wait_for_output(lambda t: t.count("Time stamp") >= 3, WAIT_S)
            err = client.output()
    finally:
        server.close()
    # OpenIGTLink 1.11 unpacks a header only when V == 1: the fields stay empty, BODY_SIZE reads
    # as 0, and it goes on reading pixels as headers. Nothing parses.
    assert device_names(err) == [] and "Receiving : \n" in err


def test_receive_server_accepts_what_regseg_sends(igtl_examples, run_program, free_port):
    port = free_port()
    messages = [m for seq in range(2)
                for m in pack_result(make_result(seq), header_version=1, contour_devices=CONTOURS)]
    with run_program([igtl_examples / "ReceiveServer", port]) as receiver:
        with connect_when_listening(port) as sock:
            sock.sendall(b"".join(messages))
            assert receiver.wait_for_output(lambda t: t.count("Receiving TRANSFORM") >= 2,
                                            WAIT_S)
        err = receiver.output()
    one = pack_result(make_result(0), header_version=1, contour_devices=CONTOURS)
    assert device_names(err) == sent(one, b"IMAGE") * 2
    assert err.count("Receiving : POLYDATA") == 2 * len(sent(one, b"POLYDATA"))


def test_polydata_client_parses_regseg_contours(igtl_examples, run_program):
    mask = np.zeros((30, 40), bool)
    mask[5:20, 8:30] = True
    image_to_reference = np.diag([0.25, 0.5, 1.0, 1.0])
    image_to_reference[:3, 3] = [10.0, -20.0, 5.0]
    expected = label_outlines(mask, image_to_reference)
    result = make_result(0)
    server = IgtlServer()
    try:
        with run_program([igtl_examples / "PolyDataClient", "127.0.0.1", server.port]) as client:
            assert server.wait_for_clients(1, WAIT_S)
            messages = pack_result(result, header_version=1, contour_devices=CONTOURS)
            server.broadcast([m for m in messages if b"ProstateContour" in m[14:34]])
            assert client.wait_for_output(lambda t: "------ Lines ------" in t
                                          and "cell[0]" in t, WAIT_S)
            text = client.output()
            queries = server.stats()["received"]["ignored"]
    finally:
        server.close()
    points = [tuple(float(v) for v in m) for m in
              re.findall(r"point\[\d+\] = \(([-\d.e+]+), ([-\d.e+]+), ([-\d.e+]+)\)", text)]
    np.testing.assert_allclose(points, expected.points, atol=1e-4)
    assert "Receiving POLYDATA data type." in text
    # The example prints a cell's first index twice: "(n, i0, i0, i1, ...)"; the rest is ours.
    cell = [int(v) for v in re.search(r"cell\[0\] = \(([\d, ]+)\)", text).group(1).split(",")]
    assert cell[1:] == list(expected.lines[0])
    assert queries >= 1  # its GET_POLYDATA request, skipped by size (we only broadcast)
