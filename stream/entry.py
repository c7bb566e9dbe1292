"""What the live entry points (``regseg-stream``, ``regseg-serve``) share: signals and exit codes.

Only the standard library and regseg's light modules here: the handlers must be in place before
numpy and torch load, so that Ctrl-C during start-up ends the process at once and quietly.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from regseg.cli_checks import EXIT_INTERRUPTED, TOP_LEVEL_ERRORS, exit_code


class Terminated(Exception):
    """SIGTERM before the live loop runs: leave quietly."""


#: The most open files the live process asks for (some containers allow ~10^9: no need).
MAX_OPEN_FILES = 65536


def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new soft
    limit. A live process holds a handle per peer on every port, and the usual soft default
    (1,024) let 1,100 idle connections to one port starve the others (a red-team run); the
    hard limit is what the administrator allows."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def run_live(prog: str, start: Callable[[threading.Event, threading.Event], dict],
             report: Callable[[dict], None]) -> int:
    """Run ``start(stop, running)`` (it parses, checks, builds and runs until ``stop``; it sets
    ``running`` once the live loop runs) and ``report`` its summary.

    Returns 0 done, 2 bad input (one paragraph ``PROG: error: ...``), 1 a failure at run time,
    130 interrupted by Ctrl-C (during the loop: after the summary), 143 SIGTERM before the loop.
    Ctrl-C or SIGTERM while the loop runs ends it cleanly (``stop``); before that (checks,
    loading, building engines) they end the process at once, quietly; a second Ctrl-C during
    the clean end does too.
    """
    raise_file_limit()
    stop, running = threading.Event(), threading.Event()
    stopped_by: list[int] = []

    def on_signal(signum, _frame):
        if running.is_set() and not stop.is_set():
            stopped_by.append(signum)
            stop.set()
        elif signum == signal.SIGTERM and not running.is_set():
            raise Terminated
        else:
            raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = ({sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
                if in_main else {})
    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        summary = start(stop, running)
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except TOP_LEVEL_ERRORS as exc:
        return exit_code(prog, exc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    report(summary)
    if signal.SIGINT in stopped_by:
        return EXIT_INTERRUPTED
    failed = (summary.get("recorder") or {}).get("failed") if isinstance(summary, dict) else None
    if failed:  # the stream ran, but what it was asked to keep is not all there
        print(f"{prog}: error: the recording is incomplete: {'; '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0
