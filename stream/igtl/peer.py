"""One client connection of our OpenIGTLink server: what it may send us, what we owe it, and how
fast it may send (issue 9: a client once could make us decode 62 MB IMAGEs or buffer a 64 MiB
claim)."""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from regseg.clock import now_ns
from regseg.stream.igtl.wire import MessageReader, WireStats

if TYPE_CHECKING:
    from pyigtl.messages import MessageBase

#: A TRANSFORM body is 48 bytes (+ ~100 of v2 metadata), a STT_/GET_ body at most 8 bytes.
DEFAULT_CLIENT_BODY_BYTES = 64 << 10
#: Decoded from clients: registrations from Slicer. Everything else is skipped by size.
CLIENT_ACCEPT = ("TRANSFORM",)
#: Expected from clients, not used: keep-alives and stream queries for the types we send.
CLIENT_IGNORE = ("STATUS", "GET_STATUS", "GET_CAPABIL", *(
    f"{verb}_{kind}" for verb in ("STT", "STP", "GET") for kind in ("IMAGE", "TRANSFORM",
                                                                     "POLYDATA")))
#: Receive rate per client (burst and sustained): Slicer sends a few hundred bytes per edit; a
#: client pushing more is throttled (TCP backpressure) rather than served at our CPU's cost.
DEFAULT_RECV_BYTES_PER_S = 1 << 20


class ClientConnection:
    """One client of :class:`~regseg.stream.igtl.server.IgtlServer`: its reader (what it may send
    us), its outbox (what we owe it) and its receive allowance. Touched only by the server's I/O
    thread, except ``enqueue`` (under the server's lock)."""

    def __init__(self, sock: socket.socket, peer: str, body_limit: int,
                 recv_bytes_per_s: float) -> None:
        self.sock = sock
        self.peer = peer
        self.wire = WireStats()
        self.reader = MessageReader(sock, stats=self.wire, max_body_bytes=body_limit,
                                    accept=CLIENT_ACCEPT, ignore=CLIENT_IGNORE,
                                    initial_capacity=body_limit)
        self.outbox: deque[tuple[bytes, ...]] = deque()  # whole broadcasts not started yet
        self.outbox_bytes = 0
        self.sending: deque[memoryview] = deque()  # the broadcast being sent, message by message
        self.progress_ns = now_ns()  # last time a send moved on (or data became due)
        self.sent = 0  # whole messages sent
        self.recv_tokens = float(recv_bytes_per_s)
        self.recv_refill_ns = now_ns()
        self.paused_until_ns = 0  # throttled: no reading before this
        self.events = 0  # what the selector watches for

    def enqueue(self, group: tuple[bytes, ...], size: int, max_groups: int,
                max_bytes: int) -> int:
        """Queue one broadcast; returns how many messages of older ones were dropped."""
        dropped = 0
        if not self.sending and not self.outbox:
            self.progress_ns = now_ns()  # the send timeout counts from when data is due
        self.outbox.append(group)
        self.outbox_bytes += size
        while len(self.outbox) > max_groups or (len(self.outbox) > 1
                                                and self.outbox_bytes > max_bytes):
            old = self.outbox.popleft()
            self.outbox_bytes -= sum(len(m) for m in old)
            dropped += len(old)
        return dropped

    def refill(self, now: int, rate: float) -> None:
        """Add the receive allowance earned since the last call (token bucket, burst = rate)."""
        self.recv_tokens = min(rate, self.recv_tokens + rate * (now - self.recv_refill_ns) / 1e9)
        self.recv_refill_ns = now

    def read_some(self, now: int, rate: float, max_turn_bytes: int,
                  deliver: Callable[[MessageBase, str], None]) -> None:
        """Read what the client sent, within its allowance (at most ``max_turn_bytes`` per read);
        hand each accepted message to ``deliver(message, peer)``. OSError (the peer closed, or is
        out of step) propagates: the server drops the client."""
        self.refill(now, rate)
        before = self.wire.bytes
        while self.recv_tokens >= 1:
            message = self.reader.read(int(min(self.recv_tokens, max_turn_bytes)))
            self.recv_tokens -= self.wire.bytes - before
            before = self.wire.bytes
            if message is None:
                return
            deliver(message, self.peer)

    def send_some(self, lock: threading.Condition, max_turn_bytes: int) -> None:
        """Send what the socket takes now without blocking, whole broadcasts in order, up to
        ``max_turn_bytes`` this turn (the outbox is taken under the server's ``lock``). OSError
        other than would-block propagates: the server drops the client."""
        sent_bytes = 0
        try:
            while sent_bytes < max_turn_bytes:
                if not self.sending:
                    with lock:
                        if not self.outbox:
                            return
                        group = self.outbox.popleft()
                        self.outbox_bytes -= sum(len(m) for m in group)
                    self.sending.extend(memoryview(m) for m in group)
                view = self.sending[0]
                n = self.sock.send(view)
                if n == 0:
                    return
                sent_bytes += n
                self.progress_ns = now_ns()
                if n == len(view):
                    self.sending.popleft()
                    self.sent += 1
                else:
                    self.sending[0] = view[n:]
        except (BlockingIOError, InterruptedError):
            return

    @property
    def pending(self) -> bool:
        """Whether a broadcast is being sent or waits."""
        return bool(self.sending or self.outbox)
