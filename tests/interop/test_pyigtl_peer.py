"""pyigtl as a peer, both header versions: PLUS-like sender, Slicer-like receiver and sender."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pyigtl
import pytest

from regseg.stream.igtl.registration import RegistrationListener
from regseg.stream.igtl.server import IgtlServer
from regseg.stream.igtl.sink import IgtlSink
from regseg.stream.igtl.source import IgtlSource
from regseg.stream.pipeline import Pipeline
from regseg.stream.slot import LatestSlot
from regseg.types import Frame, Result

WAIT_S = 5.0
TS = 1_700_000_000.5


class KeepAllSlot(LatestSlot):
    """A hand-off that also keeps every frame put, for tests that check each one."""

    def __init__(self) -> None:
        super().__init__()
        self.all: list[Frame] = []

    def put(self, item: Frame) -> None:
        self.all.append(item)
        super().put(item)


def pose(shift: float) -> np.ndarray:
    m = np.diag([0.2, 0.3, 1.0, 1.0])
    m[:3, 3] = [shift, 2.0, 3.0]
    return m


def send(server, message, header_version: int, metadata: dict | None = None) -> None:
    message.header_version = header_version
    message.metadata = metadata or {}
    server.send_message(message, wait=True)


@pytest.mark.parametrize("header_version", [1, 2])
def test_plus_style_stream_from_pyigtl(pyigtl_server, header_version):
    """Image_Reference with ImageToReference (separate TRANSFORM and embedded), PLUS metadata."""
    source = IgtlSource("127.0.0.1", pyigtl_server.port, KeepAllSlot())
    source.start()
    try:
        assert source.connected.wait(WAIT_S)
        pixels = np.arange(12 * 20, dtype=np.uint8).reshape(1, 12, 20)
        # Frame 1: its own pose arrives after it (PLUS sends in client-info order).
        send(pyigtl_server, pyigtl.ImageMessage(pixels, pose(9.0), "ras", TS + 1,
                                                "Image_Reference"), header_version)
        send(pyigtl_server, pyigtl.TransformMessage(pose(1.0), TS + 1, "ImageToReference"),
             header_version, {"TransformStatus": "OK", "TransformValid": "true"})
        # Frame 2: pose first; with v2 PLUS flags it invalid: the frame must go out untracked.
        send(pyigtl_server, pyigtl.TransformMessage(pose(2.0), TS + 2, "ImageToReference"),
             header_version, {"TransformStatus": "INVALID", "TransformValid": "false"})
        send(pyigtl_server, pyigtl.ImageMessage(pixels, pose(9.0), "ras", TS + 2,
                                                "Image_Reference"), header_version)
        while (frame := source.slot.get(timeout=WAIT_S)) is not None and frame.source_ts != TS + 2:
            pass
    finally:
        source.stop()
    first, second = source.slot.all
    np.testing.assert_array_equal(first.pixels, pixels[0])
    # The first pose came after its image, before anything was learnt: the embedded matrix.
    np.testing.assert_allclose(first.image_to_reference, pose(9.0), atol=1e-6)
    if header_version == 2:
        assert second.image_to_reference is None  # PLUS said INVALID (metadata needs v2)
        assert source.stats()["invalid_poses"] == 1
    else:
        np.testing.assert_allclose(second.image_to_reference, pose(2.0), atol=1e-6)
    assert source.stats()["wire"]["bad_crc"] == 0


def make_result() -> Result:
    frame = Frame(seq=4, acquired_ns=0, pixels=np.zeros((20, 30), np.uint8),
                  spacing_mm=(0.3, 0.2), image_to_reference=pose(0.0), source_ts=TS)
    labels = np.zeros((20, 30), np.uint8)
    labels[4:15, 5:25] = 1
    return Result(frame=frame, mri_to_image=pose(5.0), warped_labels=labels, labels=labels,
                  overlay=np.full((20, 30, 3), 50, np.uint8), quality=0.8, flagged=False)


@pytest.mark.parametrize("header_version", [1, 2])
def test_pyigtl_client_receives_what_the_sink_sends(header_version):
    server = IgtlServer()
    client = pyigtl.OpenIGTLinkClient("127.0.0.1", server.port)
    sink = IgtlSink(server, header_version=header_version,
                    contour_devices=("ProstateContour", "LesionContour"))
    try:
        assert server.wait_for_clients(1, WAIT_S)
        sink.submit(make_result())
        labels = client.wait_for_message("Labels", timeout=WAIT_S)
        transform = client.wait_for_message("MRIToImage", timeout=WAIT_S)
    finally:
        sink.close()
        client.stop()
        server.close()
    assert labels.header_version == header_version
    np.testing.assert_array_equal(labels.image[0], make_result().labels)
    np.testing.assert_allclose(transform.matrix, pose(5.0), atol=1e-6)
    # POLYDATA went between them: pyigtl skips it by size and stays in step.
    if header_version == 2:
        assert transform.metadata["TransformStatus"] == "OK" and labels.metadata["Seq"] == "4"
    else:
        assert transform.metadata == {} and labels.metadata == {}


class _StubEngine:
    device = "cpu"


@pytest.mark.parametrize(("header_version", "name"), [(1, "MRIToReference"),
                                                      (2, "MRIToReference"),
                                                      (2, "ReferenceToMRI")])
def test_slicer_sends_the_initial_registration_and_the_next_frame_uses_it(header_version, name):
    pipeline = Pipeline(SimpleNamespace(), _StubEngine())  # plane() needs neither
    listener = RegistrationListener(allowed_hosts={"127.0.0.1"})
    listener.bind(pipeline.set_reference_to_mri)
    applied = threading.Event()
    server = IgtlServer(on_message=lambda msg, peer: (listener(msg, peer), applied.set()))
    slicer = pyigtl.OpenIGTLinkClient("127.0.0.1", server.port)
    mri_to_reference = np.eye(4)
    mri_to_reference[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    mri_to_reference[:3, 3] = [10.0, -5.0, 2.0]
    matrix = mri_to_reference if name == "MRIToReference" else np.linalg.inv(mri_to_reference)
    try:
        assert server.wait_for_clients(1, WAIT_S)
        message = pyigtl.TransformMessage(matrix, TS, name)
        message.header_version = header_version
        slicer.send_message(message, wait=True)
        assert applied.wait(WAIT_S)
    finally:
        slicer.stop()
        server.close()
    frame = Frame(seq=0, acquired_ns=0, pixels=np.zeros((4, 4), np.uint8), spacing_mm=(1, 1),
                  image_to_reference=np.eye(4))
    np.testing.assert_allclose(pipeline.plane(frame), np.linalg.inv(mri_to_reference),
                               atol=1e-6)
    assert listener.stats()["applied"] == 1


def test_a_registration_that_is_not_an_affine_is_refused():
    received = []
    listener = RegistrationListener(received.append, allowed_hosts={"10.0.0.2"})
    singular = pyigtl.TransformMessage(np.diag([0.0, 1.0, 1.0, 1.0]), TS, "MRIToReference")
    listener(singular, "10.0.0.2:1")
    listener(pyigtl.TransformMessage(np.eye(4), TS, "SomethingElse"), "10.0.0.2:1")
    assert received == [] and listener.stats()["refused_by_reason"]["bad_matrix"] == 1
    listener(pyigtl.TransformMessage(np.eye(4), TS, "ReferenceToMRI"), "10.0.0.2:1")
    assert len(received) == 1


def test_a_registration_before_the_pipeline_exists_is_kept_until_bound():
    listener = RegistrationListener(allowed_hosts={"10.0.0.2"})
    shift = np.eye(4)
    shift[:3, 3] = [7.0, 2.0, 3.0]
    listener(pyigtl.TransformMessage(shift, TS, "ReferenceToMRI"), "10.0.0.2:1")
    received = []
    listener.bind(received.append)
    np.testing.assert_allclose(received[0], shift, atol=1e-6)
