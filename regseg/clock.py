"""The clocks regseg uses: monotonic nanoseconds for latency, wall seconds for wire timestamps."""

import time


def now_ns() -> int:
    """Monotonic time in nanoseconds (``time.monotonic_ns``): latency and receipt stamps."""
    return time.monotonic_ns()


def wall_s() -> float:
    """Wall-clock seconds since 1970: only for timestamps that travel to other programs."""
    return time.time()


def ms_between(start_ns: int, end_ns: int) -> float:
    """Milliseconds from ``start_ns`` to ``end_ns`` (both from :func:`now_ns`)."""
    return (end_ns - start_ns) / 1e6


#: 2001-09-09: a timestamp below this is relative (seconds since a tracker or file started), not
#: seconds since 1970. No clinical recording is older; a tracker up for 31 years is not expected.
EPOCH_MIN_S = 1e9


class SenderClock:
    """One rule for every source's timestamps: published ``source_ts`` is seconds since 1970.

    Epoch timestamps (``>= EPOCH_MIN_S``) pass unchanged. Relative ones (PLUS trackers count from
    their start, our simulators and old recordings from 0) are anchored to the wall clock at the
    first one seen: ``wall_at_first + (ts - first_ts)``, so a stream neither jumps from the wall
    clock to a relative clock nor mixes the two. A missing timestamp (None, negative, not finite)
    gives 0.0, which the sinks replace by the wall clock at sending.
    """

    def __init__(self) -> None:
        self._offset_s: float | None = None

    def __call__(self, ts: float | None) -> float:
        if ts is None or not ts >= 0 or ts == float("inf"):
            return 0.0
        if ts >= EPOCH_MIN_S:
            return float(ts)
        if self._offset_s is None:
            self._offset_s = wall_s() - ts
        return self._offset_s + ts
