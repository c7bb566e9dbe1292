"""WebSink: a session's Results to its browsers, as JPEG over the web view's WebSocket."""

from __future__ import annotations

import logging

from regseg.stream.sink_thread import SinkThread
from regseg.stream.web.message import JPEG_QUALITY, result_message
from regseg.stream.web.server import WebChannel, WebServer
from regseg.types import Result

log = logging.getLogger(__name__)


class WebSink:
    """Encodes the newest Result (JPEG, on this sink's own thread) and publishes it to a channel.

    Never blocks the pipeline: ``submit`` hands over through a :class:`SinkThread` (a backlog is
    dropped and counted). Nothing is encoded while no browser watches the session.
    ``server``: a WebServer this sink owns and closes (``regseg-stream --web``).
    """

    def __init__(self, channel: WebChannel, *, quality: int = JPEG_QUALITY,
                 server: WebServer | None = None) -> None:
        self.channel = channel
        self.server = server  # closed with this sink (regseg-stream's one-session view)
        self.quality = quality
        self.encoded = 0
        self._thread = SinkThread(self._encode, self._send, name=f"web-sink-{channel.name}",
                                  logger=log)

    def submit(self, result: Result) -> None:
        self._thread.submit(result)

    def close(self, timeout: float = 2.0) -> None:
        self._thread.close(timeout)
        if self.server is not None:
            self.server.close(timeout)

    def stats(self) -> dict:
        return {"encoded": self.encoded, "skipped": self._thread.skipped,
                "encode_errors": self._thread.encode_errors, **self.channel.stats()}

    def _encode(self, result: Result) -> bytes | None:
        if self.channel.clients == 0:
            return None
        self.encoded += 1
        return result_message(result, self.channel.name, self.quality)

    def _send(self, _result: Result, message: bytes | None) -> None:
        if message is not None:
            self.channel.publish(message)


def open_web_sink(host: str, port: int, session: str = "live") -> WebSink:
    """A web view of one session at (host, port) with a sink that owns its server
    (``regseg-stream --web``); the page lists the one session.

    Raises:
        OSError: the address cannot be bound.
    """
    server = WebServer(host, port)
    return WebSink(server.channel(session), server=server)
