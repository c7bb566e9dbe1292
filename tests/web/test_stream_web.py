"""``regseg-stream --web``: the live demo's overlays reach a page in a real headless browser."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest


@pytest.mark.slow
def test_regseg_stream_web_view(browsers, free_port):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "regseg.stream.cli", "--demo", "--fps", "5", "--backend", "eager",
         "--deformable", "off", "--serve", "none", "--zmq", "none", "--quiet", "--device", "cpu",
         "--web", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("web view" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        page = browsers()
        page.get(f"http://127.0.0.1:{port}/")  # no ?session=: the page takes the only one
        deadline = time.monotonic() + 120
        while True:
            text = page.find_element("id", "frames").text
            if text.isdigit() and int(text) >= 3:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        assert page.find_element("id", "session-name").text == "live"
        canvas = page.find_element("id", "overlay")
        assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("256", "256")
        assert page.find_element("id", "state").text in ("live", "flagged")
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        reader.join(5)
    assert proc.returncode == 130, "".join(lines)
    assert "end-to-end" in "".join(lines)  # the usual summary after a clean end
