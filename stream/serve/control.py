"""The control endpoint of ``regseg-serve``: HTTP + JSON on 127.0.0.1 by default.

- ``GET /sessions``: every session with its live stats (state, fps, latency p50/p99, frames,
  skipped, flagged, failed), and the shared engines' batching stats.
- ``GET /sessions/{name}``: one session: live stats and its full summary.
- ``POST /sessions``: add a session; the body is one session table as JSON (the config file's
  ``[[session]]`` keys). 201 with its live stats; 400 with the error (which key, what value,
  what was expected); 409 when the name or a port is taken; 415 unless the body is sent as
  ``Content-Type: application/json`` (a web page cannot send that cross-site without a CORS
  preflight, which this endpoint never grants).
- ``DELETE /sessions/{name}``: stop and remove it; 200 with its summary; 404 if unknown.

Bodies are limited to 64 kB. Building a session (loading its case) runs off the event loop, so
the page and the other requests go on meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import math

from aiohttp import web

from regseg.errors import InputError, RegsegError
from regseg.stream.serve.server import ServeSessions, SessionExists
from regseg.stream.web.server import host_guard


def _clean(value):
    """JSON has no NaN: None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(_clean(data), status=status,
                             dumps=lambda d: json.dumps(d, allow_nan=False))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def control_app(sessions: ServeSessions) -> web.Application:
    """The aiohttp application of the control endpoint over ``sessions``."""

    async def in_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def list_sessions(_request: web.Request) -> web.Response:
        live = await in_thread(sessions.live)
        return _json({"sessions": live, "engines": sessions.engines.stats()})

    async def get_session(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            session = sessions.get(name)
        except KeyError:
            return _error(404, f"no session {name!r}")
        return _json({**session.live(), "summary": await in_thread(session.summary)})

    async def add_session(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            # A web page can POST text/plain to any address without asking (no CORS preflight);
            # application/json needs the preflight this endpoint never grants. So a page open
            # in a browser on this computer cannot add sessions.
            return _error(415, f"POST /sessions: Content-Type {request.content_type!r}; "
                          "application/json expected")
        try:
            table = await request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"POST /sessions: the body is not JSON ({exc}); one session "
                          "table is expected, e.g. {\"name\": \"room2\", \"source\": \"sim://2\"}")
        try:
            spec = await in_thread(sessions.check, table, "POST /sessions")
            session = await in_thread(sessions.add, spec)
        except SessionExists as exc:
            return _error(409, str(exc))
        except InputError as exc:
            return _error(400, str(exc))
        except (RegsegError, OSError) as exc:
            return _error(500, f"POST /sessions: the session could not start: {exc}")
        return _json(session.live(), 201)

    async def remove_session(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            summary = await in_thread(sessions.remove, name)
        except KeyError:
            return _error(404, f"no session {name!r}")
        return _json(summary)

    app = web.Application(client_max_size=64 << 10, middlewares=[host_guard()])
    app.router.add_get("/sessions", list_sessions)
    app.router.add_get("/sessions/{name}", get_session)
    app.router.add_post("/sessions", add_session)
    app.router.add_delete("/sessions/{name}", remove_session)
    return app
