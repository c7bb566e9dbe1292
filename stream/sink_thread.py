"""The thread behind a sink: Results handed over without blocking, then encoded and sent."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

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

    Args:
        encode: Result -> what ``send`` takes (bytes, multipart parts ...).
        send: publishes one encoded Result.
        name: the thread's name, also the prefix of its log lines (e.g. ``igtl-sink``).
        logger: where refused Results are logged.
    """

    def __init__(self, encode: Callable[[Result], T], send: Callable[[Result, T], None], *,
                 name: str, logger: logging.Logger) -> None:
        self.name = name
        self.encode_errors = 0
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
        while (result := self._slot.get()) is not None:
            try:
                encoded = self._encode(result)
            except Exception as exc:  # never fatal: the next Result may be fine
                self.encode_errors += 1
                self._log.warning("encode", f"{self.name}: result for frame {result.frame.seq} "
                                  f"not sent: {exc}")
                continue
            self._send(result, encoded)
