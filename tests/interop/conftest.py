"""Fixtures for the interop tests: the OpenIGTLink reference programs, with bounded lifetimes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = ("ImagerServer", "ReceiveClient", "ReceiveServer", "PolyDataClient")
BUILD_HINT = ("build them with `tests/interop/cpp/build.sh build/igtl-examples` after "
              "`apt-get install libopenigtlink-dev openigtlink-examples cmake g++` (what .ci/run "
              "does), or point REGSEG_IGTL_EXAMPLES at a folder that holds them")


@pytest.fixture(scope="session")
def igtl_examples() -> Path:
    """The folder with the built OpenIGTLink example programs; skip (or fail in CI) without it.

    .ci/run sets REGSEG_IGTL_REQUIRED=1 when apt installed the packages and the build ran: then a
    missing program is a failure, not a skip. Without apt the tests skip and say why.
    """
    folder = Path(os.environ.get("REGSEG_IGTL_EXAMPLES", REPO / "build" / "igtl-examples"))
    missing = [p for p in PROGRAMS if not os.access(folder / p, os.X_OK)]
    if missing:
        message = f"OpenIGTLink example programs {missing} not found in {folder}: {BUILD_HINT}"
        if os.environ.get("REGSEG_IGTL_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return folder


class Program:
    """A running reference program; threads drain its stdout and stderr (no pipe can fill up)
    and tests wait on a condition for the text they expect, never on a sleep."""

    def __init__(self, args: list[str]) -> None:
        self.name = Path(args[0]).name
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self._text: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._ended: set[str] = set()
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._drain, args=(pipe, key), daemon=True,
                                          name=f"test-{self.name}-{key}")
                         for key, pipe in (("stdout", self.proc.stdout),
                                           ("stderr", self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    def _drain(self, pipe, key: str) -> None:
        for line in iter(pipe.readline, b""):
            with self._cond:
                self._text[key].append(line.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self._ended.add(key)  # the program closed it (exited): wake the waiters
            self._cond.notify_all()

    def output(self, stream: str = "stderr") -> str:
        with self._cond:
            return "".join(self._text[stream])

    def wait_for_output(self, predicate, timeout_s: float, stream: str = "stderr") -> bool:
        """Wait until ``predicate(text so far)`` holds, the program ends, or ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(lambda: predicate("".join(self._text[stream]))
                                or stream in self._ended, timeout_s)
            return predicate("".join(self._text[stream]))

    def stop(self, timeout_s: float = 3.0) -> int | None:
        """End the program (it may have exited by itself); returns its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        for reader in self._readers:
            reader.join(timeout_s)
        return self.proc.returncode


@pytest.fixture
def run_program():
    """``with run_program([...]) as program``: the program is killed on the way out, always."""
    started: list[Program] = []

    @contextlib.contextmanager
    def run(args: list[str]) -> Iterator[Program]:
        program = Program([str(a) for a in args])
        started.append(program)
        try:
            yield program
        finally:
            program.stop()

    yield run
    for program in started:
        program.stop()
