"""Hostile clients on our OpenIGTLink server cannot starve the pipeline (issue 9).

A stand-in for the pipeline (CPU work per frame, each Result published through a real IgtlSink to a
Slicer-like viewer that reads everything) runs with and without an attack on the same server:
200 idle connections, 16 that claim a 64 MiB body in a 58-byte header and send nothing more, one
that never reads, and two that send 62 MB IMAGEs without pause. On commit a1b0414 (a reader and a
writer thread per client, every type decoded, any body up to 64 MiB buffered) this attack made
~400 threads and took the stand-in's fps down (numbers in the README); now it must keep >= 80 % of
its fps, with the server's threads and our memory bounded. 200 connections, not 1,000: on the
2-core CI machine that is enough to show the effect and keeps the test to a few seconds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from regseg.stream.igtl.codec import HEADER, pack_image
from regseg.stream.igtl.server import IgtlServer
from regseg.stream.igtl.sink import IgtlSink
from regseg.stream.igtl.wire import MessageReader
from regseg.types import Frame, Result

WAIT_S = 10.0
IDLE = 200
CLAIMERS = 16
BIG_SENDERS = 2
BIG_IMAGE_HW = (7900, 7900)  # 62 MB, as in the issue
FRAMES = 40  # per measured phase
ATTEMPTS = 3
H, W = 240, 320


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_result(seq: int) -> Result:
    frame = Frame(seq=seq, acquired_ns=0, pixels=np.zeros((H, W), np.uint8), spacing_mm=(0.2, 0.2),
                  image_to_reference=np.diag([0.2, 0.2, 1.0, 1.0]), source_ts=1e9 + seq)
    labels = np.zeros((H, W), np.uint8)
    labels[60:180, 80:240] = 1
    return Result(frame=frame, mri_to_image=np.eye(4), warped_labels=labels, labels=labels,
                  overlay=np.full((H, W, 3), seq % 256, np.uint8), quality=0.9, flagged=False)


def frame_work(rng: np.random.Generator) -> None:
    """~10 ms of pipeline-like CPU work: array maths (drops the GIL), Python glue (holds it)."""
    image = rng.random((256, 256), dtype=np.float32)
    for _ in range(3):
        image = np.abs(np.fft.ifft2(np.fft.fft2(image))).astype(np.float32)
    total = 0.0
    for row in image[::4]:  # per-row Python work, as the glue between stages is
        total += float(row[0])


def measure_fps(sink: IgtlSink, frames: int, seq0: int) -> float:
    """1 / the median frame time: a sustained slowdown shows, a burst of another process's work
    on the shared CI machine does not."""
    rng = np.random.default_rng(seq0)
    times = []
    for seq in range(seq0, seq0 + frames):
        start = time.perf_counter()
        frame_work(rng)
        sink.submit(make_result(seq))
        times.append(time.perf_counter() - start)
    return 1.0 / float(np.median(times))


class Viewer:
    """Slicer stand-in: reads every message; counts Labels images."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(0.5)
        self.labels = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-viewer")
        self._thread.start()

    def _run(self) -> None:
        reader = MessageReader(self.sock, verify_crc=False)
        try:
            while not self._stop.is_set():
                message = reader.read()
                if message is not None and message.device_name == "Labels":
                    self.labels += 1
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        self.sock.close()


class Attack:
    """The hostile clients; ``close()`` ends them all."""

    def __init__(self, port: int, big: bytes) -> None:
        self.stop = threading.Event()
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.never_reads = self._connect(port)
        claim = HEADER.pack(1, b"IMAGE", b"Claim", 0, 0, 64 << 20, 0)  # 64 MiB body, never sent
        for _ in range(BIG_SENDERS):
            thread = threading.Thread(target=self._flood, args=(self._connect(port), big),
                                      daemon=True, name="test-flood")
            thread.start()
            self.threads.append(thread)
        for _ in range(CLAIMERS):
            try:
                self._connect(port).sendall(claim)
            except OSError:
                pass  # refused by a capped server
        for _ in range(IDLE):
            self._connect(port)

    def _connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port))
        self.socks.append(sock)
        return sock

    def _flood(self, sock: socket.socket, message: bytes) -> None:
        sock.settimeout(0.2)
        view, sent = memoryview(message), 0
        try:
            while not self.stop.is_set():
                try:
                    sent += sock.send(view[sent % len(message):])
                except TimeoutError:
                    continue  # the server reads slowly or not at all: try again
        except OSError:
            pass  # dropped by the server

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT_S)
        for sock in self.socks:
            sock.close()


def run_attack(make_server: Callable[[], object], frames: int = FRAMES) -> dict:
    """fps of the stand-in before, during and after the attack, and what the attack cost."""
    server = make_server()
    viewer = Viewer(server.port)
    assert server.wait_for_clients(1, WAIT_S)
    sink = IgtlSink(server)
    big = pack_image(np.zeros(BIG_IMAGE_HW, np.uint8), np.eye(4), "Big", 1e9, header_version=1)
    try:
        measure_fps(sink, 10, 0)  # warm-up
        before = measure_fps(sink, frames, 1000)
        rss0, threads0 = rss_bytes(), threading.active_count()  # the test's 62 MB already in
        attack = Attack(server.port, big)
        during = measure_fps(sink, frames, 2000)
        result = {
            "threads_added": threading.active_count() - threads0 - BIG_SENDERS,
            "server_threads": sum(t.name.startswith("igtl-") for t in threading.enumerate()),
            "rss_added_mb": (rss_bytes() - rss0) / 2**20,
            "server": server.stats(),
        }
        attack.close()
        after = measure_fps(sink, frames, 3000)
    finally:
        sink.close()
        viewer.close()
        server.close()
    result.update(fps_before=before, fps_during=during, fps_after=after,
                  ratio=during / ((before + after) / 2), viewer_labels=viewer.labels)
    return result


def test_hostile_clients_cost_under_20_percent_of_the_fps_and_bounded_threads_and_memory():
    # The CI machine is shared: another job can slow one phase by 20 % on its own. Up to
    # ATTEMPTS runs, the first that keeps 80 % passes; every run must bound threads and memory.
    # This cannot rescue a server the attack does slow: a1b0414 kept 16-25 % in every run.
    ratios = []
    for _ in range(ATTEMPTS):
        result = run_attack(IgtlServer)
        server = result["server"]
        ratios.append(round(result["ratio"], 2))
        print(f"\nhostile clients ({IDLE} idle, {CLAIMERS} claiming 64 MiB, 1 not reading, "
              f"{BIG_SENDERS} sending 62 MB IMAGEs): fps {result['fps_before']:.1f} before, "
              f"{result['fps_during']:.1f} during, {result['fps_after']:.1f} after "
              f"(ratio {result['ratio']:.2f}); threads +{result['threads_added']}, "
              f"RSS +{result['rss_added_mb']:.0f} MiB; refused {server['clients_refused']}, "
              f"received {server['received']}")
        assert result["server_threads"] <= 2  # the I/O thread and the sink's thread
        assert result["threads_added"] <= 1
        assert result["rss_added_mb"] < 64
        assert server["clients_refused"] >= (IDLE + CLAIMERS + BIG_SENDERS + 1
                                             - server["max_clients"])
        assert result["viewer_labels"] > 0
        if result["ratio"] >= 0.8:
            break
    assert ratios[-1] >= 0.8, ratios


def test_a_client_that_claims_a_huge_body_costs_nothing_and_one_sending_junk_is_throttled():
    """Limits per client with room under the cap: oversize skipped by size, never buffered;
    a flood held to the receive rate (TCP pushes back on the sender)."""
    with IgtlServer(recv_bytes_per_s=256 << 10) as server:
        rss0 = rss_bytes()
        claimers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        for sock in claimers:
            sock.sendall(HEADER.pack(1, b"IMAGE", b"Claim", 0, 0, 64 << 20, 0) + b"\0" * 1000)
        flood = socket.create_connection(("127.0.0.1", server.port))
        flood.settimeout(1.0)
        junk = HEADER.pack(1, b"NDARRAY", b"Junk", 0, 0, 32 << 10, 0) + b"\0" * (32 << 10)
        start = time.perf_counter()
        sent = 0
        try:
            while time.perf_counter() - start < 1.0:
                sent += flood.send(junk)
        except TimeoutError:
            pass  # the server stopped reading us: the rate limit at work
        assert server.wait_until(lambda s: s["received"]["oversize"] >= 4, WAIT_S)
        stats = server.stats()
        elapsed = time.perf_counter() - start
        for sock in [*claimers, flood]:
            sock.close()
    received = stats["received"]
    assert received["oversize"] == 4 and received["messages"] == 0
    assert rss_bytes() - rss0 < 16 << 20  # 4 x 64 MiB claimed, nothing allocated for it
    # Whatever the kernel buffers hold, what the server read is bounded by its rate: a burst of
    # one second's worth, then the rate, with at most one message's header and body over.
    assert received["bytes"] < (256 << 10) * (elapsed + 1) + (64 << 10) + 4 * 1058
    assert stats["throttled"] >= 1


def test_clients_sending_garbage_cost_only_their_own_connection():
    """Random bytes, random headers with random bodies, valid headers of every kind we skip: the
    server drops or skips each, and a viewer connected throughout still gets every broadcast."""
    rng = np.random.default_rng(7)
    with IgtlServer(max_clients=64) as server:
        viewer = socket.create_connection(("127.0.0.1", server.port))
        viewer.settimeout(WAIT_S)
        assert server.wait_for_clients(1, WAIT_S)
        for i in range(40):
            kind = [b"TRANSFORM", b"STATUS", b"IMAGE", b"STT_IMAGE", b"X\xff\xfe"][i % 5]
            body = rng.bytes(int(rng.integers(0, 2000)))
            junk = [rng.bytes(int(rng.integers(1, 3000))),
                    HEADER.pack(int(rng.integers(1, 3)), kind, rng.bytes(20), 0, 0, len(body),
                                int(rng.integers(0, 2**63))) + body][i % 2]
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(junk)
        assert server.wait_until(lambda s: s["clients_accepted"] == 41
                                 and s["clients_connected"] == 1, WAIT_S)
        marker = pack_image(np.zeros((4, 4), np.uint8), np.eye(4), "Marker", 1e9)
        server.broadcast([marker])
        reader = MessageReader(viewer)
        assert reader.read().device_name == "Marker"
        assert server._thread.is_alive()
        viewer.close()
