"""An OpenIGTLink TCP server for our outputs: any number of clients, none able to slow the others.

Each client gets a writer thread with a small outbox that keeps only the newest broadcasts (3D
Slicer keeps only the latest message per device anyway), and a reader thread that hands what the
client sends us (e.g. Slicer's MRIToReference) to a callback. A client whose socket accepts nothing
for ``send_timeout_s`` (a hung viewer, a half-open connection) is dropped, so its thread and
buffers do not stay with us for ever; it can connect again.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence

from pyigtl.messages import MessageBase

from regseg.stream.igtl.wire import DEFAULT_MAX_BODY_BYTES, MessageReader, RateLimitedLog, WireStats

log = logging.getLogger(__name__)

#: Called from a client's reader thread with each message the client sent and its "host:port".
OnMessage = Callable[[MessageBase, str], None]


class _Client:
    """One connection: a writer thread draining a bounded outbox, a reader feeding on_message.

    The reader thread owns the socket: when it ends (peer closed, error, or shutdown) it stops the
    writer, closes the socket and removes the client from the server.
    """

    def __init__(self, server: IgtlServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.outbox: deque[tuple[bytes, ...]] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.sent = 0
        self.wire = WireStats()
        self.writer = threading.Thread(target=self._write, name=f"igtl-send-{peer}", daemon=True)
        self.reader = threading.Thread(target=self._read, name=f"igtl-recv-{peer}", daemon=True)

    def enqueue(self, group: tuple[bytes, ...], limit: int) -> int:
        """Queue one broadcast; returns how many older messages were dropped to keep ``limit``."""
        dropped = 0
        with self.cond:
            if self.closed:
                return 0
            while len(self.outbox) >= limit:
                dropped += len(self.outbox.popleft())
            self.outbox.append(group)
            self.cond.notify()
        return dropped

    def shutdown(self) -> None:
        """Stop both threads: shutdown() wakes a blocked sendall() and recv_into() at once."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.outbox or self.closed)
                    if self.closed:
                        return
                    group = self.outbox.popleft()
                for data in group:
                    self.sock.sendall(data)
                    self.sent += 1
        except OSError as exc:
            if not self.closed:
                self.server._count_send_failure(isinstance(exc, TimeoutError))
                self.server._log.warning("send", f"OpenIGTLink client {self.peer}: send failed "
                                         f"({exc!r}); dropping the client")
        finally:
            self.shutdown()

    def _read(self) -> None:
        reader = MessageReader(self.sock, stats=self.wire,
                               max_body_bytes=self.server.max_body_bytes)
        try:
            while not self.closed:
                message = reader.read()
                if message is not None and self.server.on_message is not None:
                    try:
                        self.server.on_message(message, self.peer)
                    except Exception as exc:  # a faulty callback must not drop the client
                        self.server._log.warning("callback", f"on_message raised: {exc!r}")
        except OSError as exc:  # StreamError included: peer closed or out of step
            if not self.closed:
                log.info("OpenIGTLink client %s disconnected: %s", self.peer, exc)
        finally:
            self.shutdown()
            self.writer.join()
            self.sock.close()
            self.server._remove(self)


class IgtlServer:
    """Listens on ``host:port`` from construction until ``close()``; ``port=0`` picks a free port.

    Args:
        host: interface to bind; 127.0.0.1 unless the server must be reachable from elsewhere.
        port: TCP port (18944 is OpenIGTLink's usual one); 0 lets the OS choose, see ``.port``.
        outbox_size: broadcasts kept per client while it is behind; older ones are dropped.
        on_message: called with (message, "host:port") for each message a client sends us.
        max_body_bytes: body-size limit for messages clients send us.
        send_timeout_s: a client that takes longer than this to accept one broadcast message is
            dropped (None: never). Also bounds each blocking receive, which only loops again.
        send_buffer_bytes: SO_SNDBUF per client (None: the OS default, auto-tuned to megabytes
            on Linux). What a slow client has not read yet waits there, older than anything in
            its outbox: a small buffer keeps what it sees recent (see tests/interop).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        outbox_size: int = 2,
        on_message: OnMessage | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        send_timeout_s: float | None = 10.0,
        send_buffer_bytes: int | None = None,
    ) -> None:
        if outbox_size < 1:
            raise ValueError(f"outbox_size {outbox_size}; at least 1 expected")
        self.outbox_size = outbox_size
        self.on_message = on_message
        self.max_body_bytes = max_body_bytes
        self.send_timeout_s = send_timeout_s
        self.send_buffer_bytes = send_buffer_bytes
        self.send_failures = 0  # clients dropped because a send failed (timeouts included)
        self.send_timeouts = 0  # ... because a send did not finish within send_timeout_s
        self._lock = threading.Condition()
        self._clients: list[_Client] = []
        self._closing = False
        self._accepted = 0
        self._sent_closed = 0  # messages sent by clients already gone
        self._wire_closed = WireStats()
        self.drops = 0
        self._log = RateLimitedLog(log)
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept, name=f"igtl-accept-{self.port}",
                                          daemon=True)
        self._acceptor.start()
        log.info("OpenIGTLink server listening on %s:%d", self.host, self.port)

    def __enter__(self) -> IgtlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def broadcast(self, messages: Sequence[bytes]) -> int:
        """Queue packed messages for every client; never blocks. Returns the number of clients.

        The messages travel together: when a client is behind, whole older broadcasts are dropped
        (counted in ``drops``, per message), so it never receives half of one.
        """
        group = tuple(messages)
        with self._lock:
            clients = list(self._clients)
        dropped = sum(client.enqueue(group, self.outbox_size) for client in clients)
        if dropped:
            with self._lock:
                self.drops += dropped
        return len(clients)

    @property
    def clients_connected(self) -> int:
        return len(self._clients)

    def wait_for_clients(self, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until at least ``count`` clients are connected; False on timeout or close."""
        with self._lock:
            return self._lock.wait_for(
                lambda: len(self._clients) >= count or self._closing, timeout=timeout
            ) and not self._closing

    def stats(self) -> dict:
        """Counters: clients_connected, clients_accepted, messages_sent, drops, and wire counters
        of what clients sent us."""
        with self._lock:
            clients = list(self._clients)
            sent = self._sent_closed + sum(c.sent for c in clients)
            wire = WireStats()
            wire.add(self._wire_closed)
            for client in clients:
                wire.add(client.wire)
            return {
                "clients_connected": len(clients),
                "clients_accepted": self._accepted,
                "messages_sent": sent,
                "drops": self.drops,
                "send_failures": self.send_failures,
                "send_timeouts": self.send_timeouts,
                "received": wire.as_dict(),
            }

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting, disconnect every client, join every thread (``timeout`` s each)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._lock.notify_all()
            clients = list(self._clients)
        try:
            # Wakes the blocked accept() (Linux returns EINVAL); close() alone would not.
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._acceptor.join(timeout)
        for client in clients:
            client.shutdown()
        for client in clients:
            client.reader.join(timeout)
            if client.reader.is_alive():
                log.warning("OpenIGTLink client %s thread did not stop in %.1f s",
                            client.peer, timeout)

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except OSError:
                return  # listener shut down by close()
            # Small messages (TRANSFORM) must not wait for Nagle's algorithm to fill a segment.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.settimeout(self.send_timeout_s)
            if self.send_buffer_bytes:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
            client = _Client(self, sock, f"{address[0]}:{address[1]}")
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                self._clients.append(client)
                self._accepted += 1
                # Started under the lock, so close() never joins a thread that has not started.
                client.writer.start()
                client.reader.start()
                self._lock.notify_all()
            log.info("OpenIGTLink client %s connected", client.peer)

    def _count_send_failure(self, timed_out: bool) -> None:
        with self._lock:
            self.send_failures += 1
            self.send_timeouts += int(timed_out)

    def _remove(self, client: _Client) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
                self._sent_closed += client.sent
                self._wire_closed.add(client.wire)
            self._lock.notify_all()
