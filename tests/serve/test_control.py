"""regseg-serve's control endpoint over live sessions: add, list, remove; and a session whose
source dies leaves the others running."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
import torch

from regseg.errors import InputError
from regseg.sim.phantom import make_phantom, write_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.igtl.sim_server import SimIgtlServer
from regseg.stream.serve.config import ServeConfig
from regseg.stream.serve.control import control_app
from regseg.stream.serve.server import ServeSessions
from regseg.stream.serve.session import RECENT_S
from regseg.stream.web.server import AppLoop

FAST = {"deformable": "off", "refine-iterations": 1, "temporal-filter": "off"}


def request(method: str, url: str, body=None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes)
                                      else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s: {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_control_add_list_remove_and_a_dead_source(tmp_path):
    phantom = make_phantom(0)
    mri, labels = write_phantom(phantom, tmp_path)
    sender = SimIgtlServer(SimulatedScanner(phantom, seed=0), port=0, fps=6.0, max_frames=6)
    config = ServeConfig(engine={"device": "cpu", "backend": "eager"}, control=None)
    options = {"backend": "eager", "device": torch.device("cpu"), "threads": 1}
    sessions = ServeSessions(config, options)
    app_loop = AppLoop()
    host, port = app_loop.add_app(control_app(sessions), "127.0.0.1", 0)
    base = f"http://{host}:{port}/sessions"
    sender.start()
    try:
        status, a = request("POST", base, {"name": "a", "source": f"igtl://127.0.0.1:{sender.port}",
                                           "mri": str(mri), "mri-labels": str(labels), **FAST})
        assert status == 201, a
        assert a["name"] == "a" and a["state"] == "running"
        status, b = request("POST", base, {"name": "b", "source": "sim://1", "fps": 4,
                                           "estimate-check": "off", "stage-threads": 2,
                                           **FAST})
        assert status == 201, b
        # bad requests: named, nothing started
        status, err = request("POST", base, b"{not json")
        assert status == 400 and "not JSON" in err["error"]
        status, err = request("POST", base, {"name": "b", "source": "sim://3"})
        assert status == 409 and "'b' exists already" in err["error"]
        status, err = request("POST", base, {"name": "c", "source": "sim://3", "colour": 1})
        assert status == 400 and "unknown key 'colour'" in err["error"]
        status, err = request("POST", base, ["a list"])
        assert status == 400 and "a table of keys expected" in err["error"]
        assert request("DELETE", f"{base}/nope")[0] == 404
        assert request("GET", f"{base}/nope")[0] == 404

        def frames(name: str) -> int:
            return sessions.get(name).stats.frames

        # a's scanner sends 6 frames and stops: its source is dead from then on
        wait_for(lambda: sender.done.is_set() and frames("a") >= 2, 120, "a's frames")
        time.sleep(1.0)  # a's last frame through the pipeline
        # each session's own options: a the default --estimate-check (inform), b off
        assert sessions.get("a").pipeline.quality.self_check is not None
        assert sessions.get("b").pipeline.quality.self_check is None
        # ... the default --stage-threads (1) and 2
        assert sessions.get("a").pipeline.stage_threads is None
        assert sessions.get("b").pipeline.stage_threads is not None
        a_frames, b_frames = frames("a"), frames("b")
        wait_for(lambda: frames("b") >= b_frames + 3, 120, "b going on after a's source died")
        assert frames("a") == a_frames
        # the live fps is over the last RECENT_S s: once they pass without a result it is 0
        wait_for(lambda: sessions.get("a").recent_fps() == 0.0, RECENT_S + 10,
                 "a's live fps falling to 0 after its source died")
        status, listed = request("GET", base)
        assert status == 200
        live = {s["name"]: s for s in listed["sessions"]}
        assert set(live) == {"a", "b"}
        assert live["b"]["state"] == "running" and live["b"]["fps"] > 0
        assert live["a"]["frames"] == a_frames and live["a"]["fps"] == 0
        assert listed["engines"]["full"]["frames"] >= a_frames + b_frames
        status, one = request("GET", f"{base}/b")
        assert status == 200 and one["summary"]["frames"] >= b_frames + 3
        status, summary = request("DELETE", f"{base}/b")
        assert status == 200 and summary["state"] == "stopped" and summary["frames"] > 0
        assert [s["name"] for s in request("GET", base)[1]["sessions"]] == ["a"]
    finally:
        sender.stop()
        sessions.close()
        app_loop.close()


def test_a_post_that_is_not_json_by_content_type_is_refused_before_anything_runs():
    """A web page can send text/plain (or a form) to any address without a CORS preflight, so a
    page open in a browser on this computer could add sessions (red-team finding, session 32).
    Refused with 415 before the table is even read; the same body as JSON reaches the sessions."""
    class Sessions:
        checked: list = []

        def check(self, table, where):
            self.checked.append(table)
            raise InputError(f"{where}: checked")

    sessions = Sessions()
    app_loop = AppLoop()
    try:
        host, port = app_loop.add_app(control_app(sessions), "127.0.0.1", 0)
        url = f"http://{host}:{port}/sessions"
        body = json.dumps({"name": "x", "source": "sim://1"}).encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            req = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": content_type})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=10)
            assert refused.value.code == 415
            assert "application/json expected" in json.load(refused.value)["error"]
        assert sessions.checked == []
        status, err = request("POST", url, {"name": "x", "source": "sim://1"})
        assert status == 400 and err["error"] == "POST /sessions: checked"
        assert sessions.checked == [{"name": "x", "source": "sim://1"}]
        rebound = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Host": f"evil.example:{port}"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # DNS rebinding: see tests/web
            urllib.request.urlopen(rebound, timeout=10)
        assert refused.value.code == 421 and len(sessions.checked) == 1
    finally:
        app_loop.close()
