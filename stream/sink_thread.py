"""The thread behind a sink: Results handed over without blocking, then encoded and sent."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from regseg.clock import now_ns
from regseg.stream.igtl.wire import RateLimitedLog
from regseg.stream.slot import LatestSlot
from regseg.types import Result

T = TypeVar("T")


class SinkThread(Generic[T]):
    """Runs ``send(result, encode(result))`` on its own thread for the newest submitted Result.

    ``submit`` hands a Result over through a LatestSlot and never blocks (a backlog is dropped and
    counted as ``skipped``). A Result that ``encode`` refuses (any exception: an InputError, or
    anything odd in a Result) is counted in ``encode_errors``, logged (rate-limited) and skipped:
    it must never end the stream. ``send`` runs only on this thread, so it may own a socket, and
    handles its own errors. The thread starts here, because a sink has no start() in the Sink
    protocol; ``close()`` ends it.

    Staleness (issue 9): with ``on_stale``, when no Result has been sent for ``stale_after_s``,
    ``on_stale(seconds_since_last)`` runs on this thread, again every ``stale_after_s`` while it
    lasts, and ``on_fresh()`` after the next Result is sent. The check lives in the wait for the
    next Result (a timeout), so it costs nothing per frame.

    Args:
        encode: Result -> what ``send`` takes (bytes, multipart parts ...).
        send: publishes one encoded Result.
        name: the thread's name, also the prefix of its log lines (e.g. ``igtl-sink``).
        logger: where refused Results are logged.
        stale_after_s, on_stale, on_fresh: see above (None: no staleness reports).
    """

    def __init__(self, encode: Callable[[Result], T], send: Callable[[Result, T], None], *,
                 name: str, logger: logging.Logger, stale_after_s: float | None = None,
                 on_stale: Callable[[float], None] | None = None,
                 on_fresh: Callable[[], None] | None = None) -> None:
        self.name = name
        self.encode_errors = 0
        self.stale_reports = 0  # on_stale calls
        self._stale_after_ns = (int(stale_after_s * 1e9) if stale_after_s and on_stale
                                else None)
        self._on_stale, self._on_fresh = on_stale, on_fresh
        self._encode, self._send = encode, send
        self._slot: LatestSlot[Result] = LatestSlot()
        self._log = RateLimitedLog(logger)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def submitted(self) -> int:
        return self._slot.put_count

    @property
    def skipped(self) -> int:
        """Results replaced by a newer one before the thread took them."""
        return self._slot.skipped

    def submit(self, result: Result) -> None:
        """Hand ``result`` over; never blocks. Its arrays must not change after this call."""
        self._slot.put(result)

    def close(self, timeout: float = 2.0) -> bool:
        """Send what is pending, then end the thread (within ``timeout`` s); True if it ended."""
        self._slot.close()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        last_ns = report_ns = now_ns()  # last Result sent (start: none yet), next stale report
        stale = False
        while True:
            timeout = None
            if self._stale_after_ns is not None:
                report_ns = max(report_ns, last_ns + self._stale_after_ns)
                timeout = max(report_ns - now_ns(), 0) / 1e9
            result = self._slot.get(timeout)
            if result is None:
                if self._slot.closed:
                    return
                now = now_ns()
                if now >= report_ns:  # a timeout: only with staleness reports on
                    stale = True
                    self.stale_reports += 1
                    report_ns = now + self._stale_after_ns
                    self._notify(self._on_stale, (now - last_ns) / 1e9)
                continue
            try:
                encoded = self._encode(result)
            except Exception as exc:  # never fatal: the next Result may be fine
                self.encode_errors += 1
                self._log.warning("encode", f"{self.name}: result for frame {result.frame.seq} "
                                  f"not sent: {exc}")
                continue
            self._send(result, encoded)
            last_ns = now_ns()
            if stale:
                stale = False
                self._notify(self._on_fresh)

    def _notify(self, callback: Callable[..., None] | None, *args: float) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as exc:  # a status that cannot go out must not end the stream
            self._log.warning("status", f"{self.name}: status not sent: {exc!r}")
