"""The web view's server: the page, the session list and one WebSocket per browser, on aiohttp.

Why aiohttp: one well-kept library (aio-libs) serves the static page, a JSON list and the
WebSocket, and ``regseg-serve``'s control endpoint (GET/POST/DELETE with JSON bodies) runs on the
same event loop; ``websockets`` alone cannot take a POST. Request bodies and client messages are
size-limited (``client_max_size``, ``max_msg_size``), clients are counted and capped.

Newest frame wins at this end: each session has a :class:`WebChannel` holding only the newest
message; each connected browser has a sender that, once its last send has finished, sends
whatever is newest then. A slow browser skips frames (counted) and never holds up the pipeline,
another browser or another session. The page does the same at its end (``static/app.js``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from aiohttp import WSMsgType, web

from regseg.stream.igtl.wire import RateLimitedLog

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_CLIENTS = 32  # browsers at once, all sessions together
MAX_CONNECTIONS = 128  # HTTP connections at once, per app (browsers open several each)
START_TIMEOUT_S = 10.0


class WebChannel:
    """The newest web message of one session; :meth:`publish` from any thread never blocks."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self._loop = loop
        self._latest: bytes | None = None
        self._waiters: set[asyncio.Event] = set()
        self.closed = False
        self.published = 0
        self.sent = 0
        self.skipped = 0  # messages a browser never got because a newer one came first

    @property
    def clients(self) -> int:
        return len(self._waiters)

    def publish(self, message: bytes) -> None:
        """Make ``message`` the newest; browsers get it when their previous send is done."""
        if not self.closed:
            self._loop.call_soon_threadsafe(self._set, message)

    def _set(self, message: bytes | None) -> None:
        if message is None:
            self.closed = True
        else:
            self._latest = message
            self.published += 1
        for event in self._waiters:
            event.set()

    def close(self) -> None:
        """Disconnect this session's browsers (the session was removed)."""
        if not self.closed:
            self._loop.call_soon_threadsafe(self._set, None)

    async def stream_to(self, ws: web.WebSocketResponse) -> None:
        """Send the newest message each time a new one exists and the last send is done."""
        event = asyncio.Event()
        self._waiters.add(event)
        last = self.published - 1 if self._latest is not None else self.published
        if self._latest is not None:
            event.set()
        try:
            while True:
                await event.wait()
                event.clear()
                if self.closed:
                    return
                if self.published == last:
                    continue
                self.skipped += max(self.published - last - 1, 0)
                last = self.published
                await ws.send_bytes(self._latest)
                self.sent += 1
        finally:
            self._waiters.discard(event)

    def stats(self) -> dict:
        return {"clients": self.clients, "published": self.published, "sent": self.sent,
                "skipped": self.skipped}


def local_names() -> frozenset[str]:
    """This computer's names a browser on the network may use for it."""
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    names |= {f"{name.split('.')[0]}.local" for name in list(names) if name}
    return frozenset(name.lower() for name in names if name)


def known_host(host: str, names: frozenset[str]) -> bool:
    """``host`` (a Host header: NAME[:PORT] or [V6][:PORT]) is an IP address or one of
    ``names``. Refusing other names stops DNS rebinding: a page of evil.example whose name is
    made to resolve to this computer sends ``Host: evil.example``."""
    name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name.lower().rstrip(".") in names or name.lower().endswith(".localhost")


def host_guard(names: frozenset[str] | None = None):
    """aiohttp middleware: 421 for a request whose Host is not this computer (see
    :func:`known_host`); for the web view and ``regseg-serve``'s control endpoint."""
    names = local_names() if names is None else names

    @web.middleware
    async def guard(request: web.Request, handler):
        if not known_host(request.host, names):
            raise web.HTTPMisdirectedRequest(
                text=f"Host {request.host!r} is not a name of this computer; open it by its "
                "address (e.g. http://127.0.0.1:PORT/)")
        return await handler(request)
    return guard


def same_origin(request: web.Request) -> bool:
    """True without an Origin header (not a browser) or when it names this server's own
    host and port (the page we served), as the Host header gives them."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and rest.rstrip("/").lower() == request.host.lower()


class _Refuse(asyncio.Protocol):
    """A connection past the cap: closed at once, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


def _quiet_handler(limited: RateLimitedLog):
    """The loop's exception handler: one line per kind, rate-limited. asyncio's default logs
    a traceback per failed accept; out of file handles that was 180 MB of stderr in 3 min."""
    def handle(_loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        what = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        limited.warning(context.get("message", "error"),
                        f"web server: {context.get('message', 'error')} {what}".strip())
    return handle


class AppLoop:
    """An asyncio event loop on a daemon thread that runs aiohttp applications.

    The web view and ``regseg-serve``'s control endpoint share one: each app gets its own
    (host, port). Safe from any thread.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="web-loop",
                                        daemon=True)
        self._thread.start()
        self._runners: list[tuple[asyncio.AbstractServer, web.AppRunner]] = []
        self.max_connections = MAX_CONNECTIONS
        self.connections_refused = 0  # HTTP connections closed at once: MAX_CONNECTIONS open
        self.loop.set_exception_handler(_quiet_handler(RateLimitedLog(log)))

    def add_app(self, app: web.Application, host: str, port: int) -> tuple[str, int]:
        """Run ``app`` at (host, port); returns the bound address.

        Raises:
            OSError: the address cannot be bound.
        """
        future = asyncio.run_coroutine_threadsafe(self._start(app, host, port), self.loop)
        return future.result(START_TIMEOUT_S)

    async def _start(self, app: web.Application, host: str, port: int) -> tuple[str, int]:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        handlers = runner.server  # aiohttp's protocol factory; it tracks open connections

        def protocol() -> asyncio.BaseProtocol:
            # Capped: idle or half-sent requests must not use up the process's file handles
            # (a red-team run held 1,100 and starved every other port).
            if len(handlers.connections) >= self.max_connections:
                self.connections_refused += 1
                return _Refuse()
            return handlers()

        try:
            server = await self.loop.create_server(protocol, host, port, reuse_address=False)
        except BaseException:
            await runner.cleanup()
            raise
        self._runners.append((server, runner))
        return server.sockets[0].getsockname()[0], server.sockets[0].getsockname()[1]

    def close(self, timeout: float = 5.0) -> None:
        """Stop every app and the loop."""
        async def cleanup() -> None:
            for server, runner in self._runners:
                server.close()
                await runner.cleanup()

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(timeout)
            except Exception as exc:  # noqa: BLE001 - closing must not raise
                log.warning("web server: clean-up raised %r", exc)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


class WebServer:
    """Serves the page (``/``), the session list (``/api/sessions``) and ``/ws/{session}``.

    Everything here is safe from any thread.

    Args:
        host, port: where to listen (port 0: a free one, see ``.port``).
        sessions: returns the session list the page shows (dicts with at least ``name``);
            default: the channels' names.
        max_clients: browsers at once, all sessions together.
        app_loop: the AppLoop to run on (default: a new one, closed with this server).
    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 sessions: Callable[[], list[dict]] | None = None,
                 max_clients: int = MAX_CLIENTS, app_loop: AppLoop | None = None) -> None:
        self._sessions = sessions
        self.max_clients = max_clients
        self.clients_refused = 0
        self.origins_refused = 0  # WebSockets refused: a page of another site asked
        self._clients = 0
        self._channels: dict[str, WebChannel] = {}
        self._lock = threading.Lock()
        self._own_loop = app_loop is None
        self.app_loop = app_loop if app_loop is not None else AppLoop()
        self._loop = self.app_loop.loop
        try:
            self.host, self.port = self.app_loop.add_app(self._app(), host, port)
        except BaseException:
            if self._own_loop:
                self.app_loop.close()
            raise

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def channel(self, name: str) -> WebChannel:
        """The channel of session ``name`` (made on first use)."""
        with self._lock:
            if name not in self._channels:
                self._channels[name] = WebChannel(name, self._loop)
            return self._channels[name]

    def remove(self, name: str) -> None:
        """Forget session ``name``; its browsers are disconnected."""
        with self._lock:
            channel = self._channels.pop(name, None)
        if channel is not None:
            channel.close()

    def stats(self) -> dict:
        with self._lock:
            channels = dict(self._channels)
        return {"url": self.url, "clients": self._clients,
                "clients_refused": self.clients_refused,
                "connections_refused": self.app_loop.connections_refused,
                "origins_refused": self.origins_refused,
                "sessions": {name: c.stats() for name, c in channels.items()}}

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect every browser; stop the server's loop if it is its own."""
        with self._lock:
            channels = list(self._channels.values())
        for channel in channels:
            channel.close()
        if self._own_loop:
            self.app_loop.close(timeout)

    # ------------------------------------------------------------------ handlers (on the loop)
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 10, middlewares=[host_guard()])
        app.router.add_get("/", self._index)
        app.router.add_get("/api/sessions", self._list)
        app.router.add_get("/ws/{name}", self._ws)
        app.router.add_static("/static/", STATIC)
        return app

    async def _index(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    def session_list(self) -> list[dict]:
        if self._sessions is not None:
            return self._sessions()
        with self._lock:
            return [{"name": name} for name in self._channels]

    async def _list(self, _request: web.Request) -> web.Response:
        sessions = await asyncio.get_running_loop().run_in_executor(None, self.session_list)
        return web.json_response({"sessions": sessions},
                                 headers={"Cache-Control": "no-cache"})

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        with self._lock:
            channel = self._channels.get(name)
        if channel is None:
            raise web.HTTPNotFound(text=f"no session {name!r}; see /api/sessions")
        if not same_origin(request):
            # A browser sends Origin with every WebSocket: another site's page (open in a browser
            # that reaches this port) must not watch the patient's images. Tools send none.
            self.origins_refused += 1
            raise web.HTTPForbidden(text=f"Origin {request.headers['Origin']!r} is not this "
                                    "server's page")
        if self._clients >= self.max_clients:
            self.clients_refused += 1
            raise web.HTTPServiceUnavailable(text=f"{self.max_clients} browsers already")
        ws = web.WebSocketResponse(heartbeat=10.0, max_msg_size=4096)
        await ws.prepare(request)
        self._clients += 1
        sender = asyncio.ensure_future(channel.stream_to(ws))
        # the sender ends when the session goes or a send fails: then close, which ends the read
        sender.add_done_callback(lambda _: asyncio.ensure_future(ws.close()))
        try:
            async for msg in ws:  # the page sends nothing; reading sees pings and the close
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._clients -= 1
            if not sender.done():
                sender.cancel()
            await ws.close()
        return ws
