"""The web view in a real headless browser: frames arrive, the page counts and times them, and
the overlay it draws has the pixels we sent."""

from __future__ import annotations

import io
import re
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from regseg.clock import now_ns
from regseg.stream.web.message import unpack
from regseg.stream.web.server import WebServer
from regseg.stream.web.sink import WebSink

HW = (240, 320)


def pattern(seq: int, flagged: bool = False) -> SimpleNamespace:
    """A Result-like object: left half red, right half blue, a white bar whose row moves."""
    rgb = np.zeros((*HW, 3), np.uint8)
    rgb[:, : HW[1] // 2] = (255, 0, 0)
    rgb[:, HW[1] // 2:] = (0, 0, 255)
    row = 10 + (seq * 3) % (HW[0] - 20)
    rgb[row:row + 4] = 255
    frame = SimpleNamespace(seq=seq, acquired_ns=now_ns(), image_to_reference=np.eye(4))
    return SimpleNamespace(frame=frame, overlay=rgb, flagged=flagged,
                           flags=("error_estimate",) if flagged else (), error_mm=1.25,
                           quality=0.9)


class Feeder:
    """Submits pattern Results to a WebSink at ``fps`` until stopped."""

    def __init__(self, sink: WebSink, fps: float = 30.0) -> None:
        self.sink, self.period = sink, 1.0 / fps
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(max(0.0, t0 + self.sent * self.period - time.monotonic())):
            self.sink.submit(pattern(self.sent))
            self.sent += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)  # polling a browser's DOM: there is no event to wait on from here
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def number(driver, element_id: str) -> float:
    text = driver.find_element("id", element_id).text
    return float(text) if re.fullmatch(r"-?\d+(\.\d+)?", text) else float("nan")


def test_page_shows_newest_frames_latency_and_overlay(browsers, tmp_path):
    from PIL import Image

    server = WebServer("127.0.0.1", 0)
    sink = WebSink(server.channel("room1"))
    feeder = Feeder(sink)
    try:
        driver = browsers()
        driver.get(f"{server.url}?session=room1")
        wait_for(lambda: number(driver, "frames") >= 30, 30, "30 frames drawn")
        frames = number(driver, "frames")
        p50, p99 = number(driver, "lat-p50"), number(driver, "lat-p99")
        view_p50 = number(driver, "view-p50")
        fps = number(driver, "fps")
        assert 0 <= p50 <= p99 < 1000, (p50, p99)
        assert 0 <= view_p50 < 1000, view_p50
        assert fps > 5, fps
        # the page draws the newest: its frame number is recent, and frames keep coming
        seq = number(driver, "seq")
        assert feeder.sent - seq < 30, (feeder.sent, seq)
        assert driver.find_element("id", "session-name").text == "room1"
        assert driver.find_element("id", "state").text == "live"
        assert "room1" in driver.find_element("id", "session-list").text
        png = driver.find_element("id", "overlay").screenshot_as_png
        (tmp_path / "overlay.png").write_bytes(png)
        shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        h, w = shot.shape[:2]
        left = shot[h // 2 - 5:h // 2 + 5, w // 8:w // 4].reshape(-1, 3).mean(0)
        right = shot[h // 2 - 5:h // 2 + 5, 3 * w // 4:7 * w // 8].reshape(-1, 3).mean(0)
        assert left[0] > 200 and left[2] < 60, left  # red, through JPEG and the canvas
        assert right[2] > 200 and right[0] < 60, right  # blue
        assert number(driver, "frames") >= frames
        assert server.stats()["sessions"]["room1"]["sent"] >= frames
    finally:
        feeder.close()
        sink.close()
        server.close()


def test_stale_then_live_and_flagged(browsers):
    server = WebServer("127.0.0.1", 0)
    sink = WebSink(server.channel("s"))
    try:
        driver = browsers()
        driver.get(f"{server.url}?session=s")
        wait_for(lambda: server.channel("s").clients == 1, 20, "the page's WebSocket")
        sink.submit(pattern(1, flagged=True))
        wait_for(lambda: number(driver, "frames") >= 1, 20, "one frame")
        assert "UNVERIFIED" in driver.find_element("id", "flags").text
        wait_for(lambda: driver.find_element("id", "state").text.startswith("STALE"), 10,
                 "the STALE badge after 1 s without frames")
    finally:
        sink.close()
        server.close()


def test_server_errors_and_message_round_trip():
    import asyncio

    import aiohttp

    server = WebServer("127.0.0.1", 0)
    sink = WebSink(server.channel("a"))

    async def client() -> tuple[int, int, dict, bytes]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}ws/nope") as reply:
                missing = reply.status
            async with http.get(f"{server.url}static/../server.py") as reply:
                escape = reply.status
            async with http.ws_connect(f"{server.url}ws/a") as ws:
                while server.channel("a").clients == 0:
                    await asyncio.sleep(0.01)
                sink.submit(pattern(7))
                msg = await asyncio.wait_for(ws.receive_bytes(), 10)
            return missing, escape, *unpack(msg)

    try:
        missing, escape, header, jpeg = asyncio.run(client())
        assert missing == 404
        assert escape in (403, 404)
        assert header["session"] == "a" and header["seq"] == 7 and header["hw"] == list(HW)
        assert jpeg[:2] == b"\xff\xd8"
        with pytest.raises(OSError):
            WebServer("127.0.0.1", server.port)
    finally:
        sink.close()
        server.close()


def test_idle_connections_past_the_cap_are_closed_and_the_page_still_serves():
    """Red-team finding (session 32): 1,100 half-sent requests held 1,100 file handles, which
    starved every other port of the process. Past the cap a connection is closed at once; once
    the idle ones go, the page serves again."""
    import socket
    import urllib.request

    server = WebServer("127.0.0.1", 0)
    server.app_loop.max_connections = 8
    idle = []
    try:
        for _ in range(8):  # the cap's worth of half-sent requests
            sock = socket.create_connection((server.host, server.port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # no blank line: never ends
            idle.append(sock)
        wait_for(lambda: len(server.app_loop._runners[0][1].server.connections) == 8, 5,
                 "the server to hold 8 connections")
        extra = socket.create_connection((server.host, server.port), timeout=5)
        try:  # closed by the server at once (a reset or an end of file), nothing sent
            assert extra.recv(1) == b""
        except ConnectionResetError:
            pass
        extra.close()
        assert server.stats()["connections_refused"] >= 1
        for sock in idle:
            sock.close()
        wait_for(lambda: not server.app_loop._runners[0][1].server.connections, 5,
                 "the idle connections to go")
        with urllib.request.urlopen(server.url, timeout=5) as reply:
            assert reply.status == 200
    finally:
        for sock in idle:
            sock.close()
        server.close()


def test_a_page_of_another_site_cannot_watch_the_overlay():
    """A browser sends Origin with every WebSocket; another site's page open in a browser that
    reaches --web was let in (red-team note, session 32). Now 403; our own page and tools
    without an Origin still connect."""
    import asyncio

    import aiohttp

    server = WebServer("127.0.0.1", 0)
    server.channel("a")

    async def status(origin: str | None) -> int:
        headers = {"Origin": origin} if origin else {}
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(f"{server.url}ws/a", headers=headers) as ws:
                    await ws.close()
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    try:
        own = f"http://{server.host}:{server.port}"
        assert asyncio.run(status("http://evil.example")) == 403
        assert asyncio.run(status(f"http://{server.host}:{server.port + 1}")) == 403
        assert asyncio.run(status(own)) == 101
        assert asyncio.run(status(None)) == 101
        assert server.stats()["origins_refused"] == 2
    finally:
        server.close()


def test_a_request_for_another_host_name_is_refused_against_dns_rebinding():
    """A page of evil.example whose name is made to resolve to this computer is same-origin with
    itself, so the Origin check passes; its Host header still says evil.example. 421 for such
    names, while addresses, localhost and this computer's own names are served."""
    import urllib.error
    import urllib.request

    from regseg.stream.web.server import known_host, local_names

    server = WebServer("127.0.0.1", 0)

    def get(host: str) -> int:
        req = urllib.request.Request(f"{server.url}api/sessions", headers={"Host": host})
        try:
            with urllib.request.urlopen(req, timeout=5) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert get(f"evil.example:{server.port}") == 421
        assert get(f"127.0.0.1.nip.io:{server.port}") == 421
        assert get(f"127.0.0.1:{server.port}") == 200
        assert get(f"localhost:{server.port}") == 200
    finally:
        server.close()
    names = local_names()
    assert "localhost" in names
    for host in ("10.0.0.5:8080", "[::1]:8080", "[fe80::1]", "LOCALHOST:1", "x.localhost"):
        assert known_host(host, names), host
    for host in ("evil.example", "evil.example:8080", "", ":8080", "10.0.0.5.evil.example"):
        assert not known_host(host, names), host
