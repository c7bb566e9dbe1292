"""An OpenIGTLink TCP server for our outputs: a few clients, none able to slow or starve the rest.

One I/O thread serves every client through a selector (no thread per client: 1,000 idle
connections once made ~1,600 threads and halved the pipeline's fps, issue 9). Per client:
- an outbox that keeps only the newest broadcasts (Slicer keeps only the latest message per
  device anyway), bounded in count and bytes; older ones are dropped and counted;
- a send timeout: a client that takes no byte for ``send_timeout_s`` while we have data for it (a
  hung viewer, a half-open connection) is disconnected, so its buffers do not stay with us;
- what it may send us: only the ``accept`` types, decoded (TRANSFORM: a registration from
  Slicer), and the ``ignore`` types (STATUS, STT_/STP_/GET_ queries) skipped unread; every body
  above ``max_body_bytes`` and every other type is read and discarded by its size, never
  buffered, and counted; a receive rate limit keeps a client flooding us from taking a core.
At most ``max_clients`` at once: a further connection gets a STATUS saying why and is closed.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections.abc import Callable, Sequence

from pyigtl.messages import MessageBase

from regseg.clock import now_ns
from regseg.stream.igtl.peer import (
    DEFAULT_CLIENT_BODY_BYTES,
    DEFAULT_RECV_BYTES_PER_S,
    ClientConnection,
)
from regseg.stream.igtl.status import STATUS_RESOURCE_ERROR, pack_status
from regseg.stream.igtl.wire import RateLimitedLog, WireStats

log = logging.getLogger(__name__)

#: Called on the server's I/O thread with each accepted message a client sent and its "host:port".
#: It must be quick: every client waits while it runs.
OnMessage = Callable[[MessageBase, str], None]

#: Three Slicer instances (navigation, a second display, a recording one) plus tools (a monitor,
#: pyigtl scripts), with room to spare; each costs up to ~2 outboxes of our output (~3 MB at
#: 640x480), so 8 bounds our memory for clients at a few tens of MB.
DEFAULT_MAX_CLIENTS = 8
#: Bytes read from one client per turn of the I/O loop before the others get theirs.
_READ_TURN_BYTES = 256 << 10
#: After a failed accept (EMFILE: out of file handles), the listener rests this long.
ACCEPT_BACKOFF_NS = 1_000_000_000
_SEND_TURN_BYTES = 4 << 20


class IgtlServer:
    """Listens on ``host:port`` from construction until ``close()``; ``port=0`` picks a free port.

    Args:
        host: interface to bind; 127.0.0.1 unless the server must be reachable from elsewhere.
        port: TCP port (18944 is OpenIGTLink's usual one); 0 lets the OS choose, see ``.port``.
        max_clients: clients served at once; more are refused (STATUS, then closed) and counted.
        outbox_size: broadcasts kept per client while it is behind; older ones are dropped.
        max_outbox_bytes: bytes kept per client while it is behind (the newest broadcast always).
        on_message: called with (message, "host:port") for each TRANSFORM a client sends us.
        max_body_bytes: body-size limit for what clients send us (larger: skipped by size).
        send_timeout_s: a client with data due that takes no byte of it for this long is
            disconnected (None: never).
        send_buffer_bytes: SO_SNDBUF per client (None: the OS default, auto-tuned to megabytes
            on Linux). What a slow client has not read yet waits there, older than anything in
            its outbox: a small buffer keeps what it sees recent (see tests/interop).
        recv_bytes_per_s: what one client may send us per second (burst: the same amount).
    Raises:
        OSError: the address cannot be bound (in use, not local).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        outbox_size: int = 2,
        max_outbox_bytes: int = 32 << 20,
        on_message: OnMessage | None = None,
        max_body_bytes: int = DEFAULT_CLIENT_BODY_BYTES,
        send_timeout_s: float | None = 10.0,
        send_buffer_bytes: int | None = None,
        recv_bytes_per_s: float = DEFAULT_RECV_BYTES_PER_S,
    ) -> None:
        if outbox_size < 1 or max_clients < 1:
            raise ValueError(f"outbox_size {outbox_size}, max_clients {max_clients}; at least 1 "
                             "expected")
        self.max_clients = max_clients
        self.outbox_size = outbox_size
        self.max_outbox_bytes = max_outbox_bytes
        self.on_message = on_message
        self.max_body_bytes = max_body_bytes
        self.send_timeout_s = send_timeout_s
        self.send_timeout_ns = None if not send_timeout_s else int(send_timeout_s * 1e9)
        self.send_buffer_bytes = send_buffer_bytes
        self.recv_bytes_per_s = float(recv_bytes_per_s)
        self.drops = 0  # messages dropped from outboxes of clients that were behind
        self.send_failures = 0  # clients dropped because a send failed (timeouts included)
        self.send_timeouts = 0  # ... because no byte went out for send_timeout_s
        self.clients_refused = 0  # connections closed at once: max_clients reached
        self.throttled = 0  # times a client was paused for sending faster than recv_bytes_per_s
        self.callback_errors = 0
        self.accept_failures = 0  # accept() failed (out of file handles and the like)
        self._accept_paused_until_ns = 0  # listener unwatched until then after a failed accept
        self._lock = threading.Condition()
        self._clients: dict[socket.socket, ClientConnection] = {}
        self._closing = False
        self._accepted = 0
        self._sent_closed = 0  # messages sent to clients already gone
        self._wire_closed = WireStats()
        self._log = RateLimitedLog(log)
        # Packed once: a flood of connections past the cap costs an accept, a send and a close.
        self._refusal = pack_status(STATUS_RESOURCE_ERROR, max_clients, "server full",
                                    f"refused: {max_clients} clients already connected",
                                    header_version=1)
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False  # a wake byte is in flight (at most one: never fills the pair)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"igtl-server-{self.port}",
                                        daemon=True)
        self._thread.start()
        log.info("OpenIGTLink server listening on %s:%d (at most %d clients)", self.host,
                 self.port, max_clients)

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
        size = sum(len(m) for m in group)
        with self._lock:
            clients = list(self._clients.values())
            for client in clients:
                self.drops += client.enqueue(group, size, self.outbox_size, self.max_outbox_bytes)
            self._wake()
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

    def wait_until(self, predicate: Callable[[dict], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate(self.stats())`` holds (checked after each turn of the I/O
        loop); False on timeout or close. For tests and tools that must not sleep."""
        with self._lock:
            return self._lock.wait_for(lambda: self._closing or predicate(self.stats()),
                                       timeout=timeout) and not self._closing

    def stats(self) -> dict:
        """Counters: clients (connected, accepted, refused), messages_sent, drops, send failures
        and timeouts, throttling, and ``received``: what clients sent us, by fate (messages
        decoded; refused as oversize, unknown_type, bad_crc, malformed; ignored keep-alives)."""
        with self._lock:
            clients = list(self._clients.values())
            sent = self._sent_closed + sum(c.sent for c in clients)
            wire = WireStats()
            wire.add(self._wire_closed)
            for client in clients:
                wire.add(client.wire)
            return {
                "clients_connected": len(clients),
                "clients_accepted": self._accepted,
                "clients_refused": self.clients_refused,
                "max_clients": self.max_clients,
                "messages_sent": sent,
                "drops": self.drops,
                "send_failures": self.send_failures,
                "send_timeouts": self.send_timeouts,
                "throttled": self.throttled,
                "callback_errors": self.callback_errors,
                "accept_failures": self.accept_failures,
                "received": wire.as_dict(),
            }

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting, disconnect every client, end the I/O thread (within ``timeout`` s)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._lock.notify_all()
            self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("OpenIGTLink server thread did not stop in %.1f s", timeout)

    # ---- the I/O thread ------------------------------------------------------------------

    def _wake(self) -> None:
        """Interrupt the select (call under the lock)."""
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass

    def _run(self) -> None:
        try:
            while not self._closing:
                for key, mask in self._selector.select(self._next_timeout_s()):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        client = key.data
                        if mask & selectors.EVENT_READ and client.sock in self._clients:
                            self._receive(client)
                        if mask & selectors.EVENT_WRITE and client.sock in self._clients:
                            self._send(client)
                self._service()
                with self._lock:
                    self._lock.notify_all()  # wait_until() and wait_for_clients()
        except Exception:  # a bug here must not pass silently: every client would hang
            log.exception("OpenIGTLink server %d: I/O thread failed", self.port)
        finally:
            for client in list(self._clients.values()):
                self._drop(client)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _next_timeout_s(self) -> float | None:
        """Until the next send-timeout deadline or the end of a throttle pause."""
        now = now_ns()
        deadlines = [self._accept_paused_until_ns] if self._accept_paused_until_ns else []
        for client in self._clients.values():
            if client.pending and self.send_timeout_ns is not None:
                deadlines.append(client.progress_ns + self.send_timeout_ns)
            if client.paused_until_ns:
                deadlines.append(client.paused_until_ns)
        if not deadlines:
            return None
        return max(min(deadlines) - now, 0) / 1e9 + 0.001

    def _drain_wake(self) -> None:
        with self._lock:
            self._woken = False
            try:
                while self._wake_r.recv(64):
                    pass
            except OSError:
                pass

    def _service(self) -> None:
        """After each select: start sends for new data, enforce send timeouts, end pauses, and
        watch for what each client needs next."""
        now = now_ns()
        if self._accept_paused_until_ns and now >= self._accept_paused_until_ns:
            self._accept_paused_until_ns = 0
            self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        for client in list(self._clients.values()):
            if client.paused_until_ns and now >= client.paused_until_ns:
                client.paused_until_ns = 0
            if client.pending:
                if not client.events & selectors.EVENT_WRITE:
                    self._send(client)  # most sends complete at once: no extra select turn
                if (client.sock in self._clients and client.pending
                        and self.send_timeout_ns is not None
                        and now - client.progress_ns > self.send_timeout_ns):
                    self.send_timeouts += 1
                    self.send_failures += 1
                    self._log.warning("send", f"OpenIGTLink client {client.peer}: took no data "
                                      f"for {self.send_timeout_ns / 1e9:.1f} s; disconnected")
                    self._drop(client)
            if client.sock in self._clients:
                self._watch(client)

    def _watch(self, client: ClientConnection) -> None:
        events = (0 if client.paused_until_ns else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if client.pending else 0)
        if events == client.events:
            return
        if client.events == 0:
            self._selector.register(client.sock, events, client)
        elif events == 0:
            self._selector.unregister(client.sock)
        else:
            self._selector.modify(client.sock, events, client)
        client.events = events

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: say so, keep serving who we have
                # The connection stays queued, so the listener would wake select() at once
                # again: stop watching it for a while instead of spinning a core.
                self.accept_failures += 1
                self._selector.unregister(self._listener)
                self._accept_paused_until_ns = now_ns() + ACCEPT_BACKOFF_NS
                self._log.warning("accept", f"OpenIGTLink server {self.port}: accept failed: "
                                  f"{exc}; not accepting for {ACCEPT_BACKOFF_NS / 1e9:.1f} s")
                return
            peer = f"{address[0]}:{address[1]}"
            sock.setblocking(False)
            if len(self._clients) >= self.max_clients:
                self.clients_refused += 1
                self._log.warning("refused", f"OpenIGTLink client {peer} refused: "
                                  f"{self.max_clients} clients already connected (--max-clients)")
                try:  # best effort: tell the client why before closing (v1: any library parses it)
                    sock.send(self._refusal)
                except OSError:
                    pass
                sock.close()
                continue
            # Small messages (TRANSFORM, STATUS) must not wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.send_buffer_bytes:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
            client = ClientConnection(sock, peer, self.max_body_bytes, self.recv_bytes_per_s)
            with self._lock:
                self._clients[sock] = client
                self._accepted += 1
                self._lock.notify_all()
            self._watch(client)
            log.info("OpenIGTLink client %s connected", peer)

    def _receive(self, client: ClientConnection) -> None:
        """Read what the client sent, within its rate; hand accepted messages to on_message."""
        now = now_ns()
        rate = self.recv_bytes_per_s
        try:
            client.read_some(now, rate, _READ_TURN_BYTES, self._deliver)
        except OSError as exc:  # StreamError included: peer closed or out of step
            log.info("OpenIGTLink client %s disconnected: %s", client.peer, exc)
            self._drop(client)
            return
        except Exception as exc:  # a bug in parsing costs this client, never the server
            self._log.warning("receive", f"OpenIGTLink client {client.peer}: {exc!r} while "
                              "reading what it sent; disconnected")
            self._drop(client)
            return
        if client.recv_tokens < 1:  # pause until 64 KiB of allowance has built up again
            self.throttled += 1
            client.paused_until_ns = now + int((min(rate, 64 << 10) - client.recv_tokens)
                                               / rate * 1e9)

    def _deliver(self, message: MessageBase, peer: str) -> None:
        if self.on_message is None:
            return
        try:
            self.on_message(message, peer)
        except Exception as exc:  # a faulty callback must not drop the client or the server
            self.callback_errors += 1
            self._log.warning("callback", f"on_message raised: {exc!r}")

    def _send(self, client: ClientConnection) -> None:
        """Send what the socket takes now, without blocking; whole broadcasts in order."""
        try:
            client.send_some(self._lock, _SEND_TURN_BYTES)
        except OSError as exc:
            self.send_failures += 1
            self._log.warning("send", f"OpenIGTLink client {client.peer}: send failed ({exc!r}); "
                              "disconnected")
            self._drop(client)

    def _drop(self, client: ClientConnection) -> None:
        if client.events:
            self._selector.unregister(client.sock)
            client.events = 0
        try:
            client.sock.close()
        except OSError:
            pass
        with self._lock:
            if self._clients.pop(client.sock, None) is not None:
                self._sent_closed += client.sent
                self._wire_closed.add(client.wire)
            self._lock.notify_all()
