"""Fixtures for the OpenIGTLink tests of several packages: free TCP ports, pyigtl's server.

The suite runs ``--lc2 async`` (the default) in order, as ``lag``: the same arithmetic, but results
that do not depend on how fast the worker thread finishes, so that two runs of a chain can be
compared to the bit (``REGSEG_LC2_IN_ORDER``; subprocesses inherit it).
tests/stream/test_lc2_lag.py lifts it to run the thread itself."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator

import pyigtl
import pytest

os.environ["REGSEG_LC2_IN_ORDER"] = "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()``: a TCP port on 127.0.0.1 that was free a moment ago, for servers that
    cannot listen on port 0 and say which port they got (pyigtl's, the C++ example programs)."""
    return _free_port


@pytest.fixture
def pyigtl_server() -> Iterator[pyigtl.OpenIGTLinkServer]:
    """pyigtl's server (a PLUS stand-in) on a free port; its SIGINT/SIGTERM handlers are put back
    afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = pyigtl.OpenIGTLinkServer(port=_free_port())
    yield server
    server.stop()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
