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
