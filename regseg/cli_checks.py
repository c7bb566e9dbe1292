"""Command-line input checks shared by ``regseg`` and ``regseg-stream``.

Every entry point validates all of its inputs in one function before any work starts (before a
model loads, a socket is served or a file is written). The checks here raise
:class:`~regseg.errors.InputError` naming the flag, the bad value and what was expected; the entry
point prints it as one paragraph ``prog: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from regseg.errors import InputError, RegsegError

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``prog: error: ...`` with exit status 2 (no usage
    dump); subparsers made from it are Parsers too."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_INPUT)


class Once(argparse.Action):
    """A single-valued option given twice is an error, not a silent replacement."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_given_once", set())
        if self.dest in given:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r} and "
                         f"{values!r}); give it once")
        given.add(self.dest)
        namespace._given_once = given  # noqa: SLF001 - argparse namespaces take any attribute
        setattr(namespace, self.dest, values)


def int_at_least(low: int):
    """argparse ``type``: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}; at least {low} expected")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def float_at_least(low: float, high: float = math.inf):
    """argparse ``type``: a finite float in [``low``, ``high``]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and low <= value <= high):
            span = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"{text}; a finite number {span} expected")
        return value
    parse.__name__ = "number"
    return parse


def host_port(url: str, scheme: str, flag: str) -> tuple[str, int]:
    """(host, port) of ``scheme://HOST:PORT``; the port must be 1-65535, nothing else after it."""
    example = f"{scheme}://127.0.0.1:18944"
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError as exc:  # urlparse: "Port out of range 0-65535", "invalid literal"
        raise InputError(f"{flag} {url!r}: bad port ({exc}); expected {scheme}://HOST:PORT with "
                         f"PORT 1-65535, e.g. {example}") from None
    if parsed.scheme != scheme or not parsed.hostname or port is None:
        raise InputError(f"{flag} {url!r}: expected {scheme}://HOST:PORT, e.g. {example}")
    if not 1 <= port <= 65535:
        raise InputError(f"{flag} {url!r}: port {port}; 1-65535 expected")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise InputError(f"{flag} {url!r}: unexpected text after the port; expected "
                         f"{scheme}://HOST:PORT, e.g. {example}")
    return parsed.hostname, port


def check_port_free(host: str, port: int, flag: str) -> None:
    """Bind ``host:port`` as a listening server would (SO_REUSEADDR, as socket.create_server and
    ZeroMQ do), then release it: a port in use or an address not on this machine fails now,
    before any model loads."""
    try:
        with socket.create_server((host, port)):
            pass
    except socket.gaierror as exc:
        raise InputError(f"{flag}: cannot resolve host {host!r} ({exc.strerror}); use an "
                         "address of this machine, e.g. 127.0.0.1") from None
    except OSError as exc:
        why = {98: "already in use (another regseg-stream, Slicer or PLUS?)",
               99: "not an address of this machine", 13: "needs privileges (ports below 1024)"}
        raise InputError(f"{flag}: cannot listen on {host}:{port}: "
                         f"{why.get(exc.errno, exc.strerror)}; choose another port or "
                         "address") from None


def check_zmq_endpoint(url: str, flag: str = "--zmq") -> None:
    """A ZeroMQ bind endpoint: tcp://HOST:PORT (port checked free) or ipc://PATH."""
    if url.startswith("ipc://"):
        check_writable(url[len("ipc://"):], flag)
        return
    host, port = host_port(url, "tcp", flag)
    check_port_free(host, port, flag)


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def check_writable(path: str | Path, flag: str) -> None:
    """Raise unless a file can be written at ``path``: it is not a folder, and the nearest existing
    folder above it takes a new file (tried with a temporary file, removed at once). Nothing is
    left behind; missing folders below that one are created only when the file is written."""
    path = Path(path)
    if str(path) == "" or path.is_dir():
        raise InputError(f"{flag} {str(path)!r}: is a folder; a file path is expected")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path}: exists and is not writable")
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".regseg-write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot write in {folder} ({exc.strerror}); choose a "
                         "writable location") from None


def check_readable_file(path: str | Path, flag: str) -> Path:
    """Raise unless ``path`` is an existing, readable file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{flag} {path}: cannot read: file not found (read as given, "
                         f"relative to {Path.cwd()})")
    if not path.is_file():
        raise InputError(f"{flag} {path}: is not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{flag} {path}: not readable (permissions)")
    return path


def check_checkpoint(value: str | Path, flag: str, model: str, *, ndim: int | None = None,
                     shipped: dict[str, Path] | None = None) -> None:
    """Raise unless ``value`` (a path, or a key of ``shipped``) is a regseg checkpoint of ``model``
    (and, for PLCReg, of ``ndim`` dimensions). Reads the file's dict without building the model."""
    from regseg.errors import EngineError
    from regseg.models.checkpoint import read_checkpoint

    path = (shipped or {}).get(str(value)) or check_readable_file(value, flag)
    try:
        checkpoint = read_checkpoint(path)
    except EngineError as exc:  # torch's own text runs to paragraphs (and advises unsafe loads)
        cause = exc.__cause__
        why = (f"{type(cause).__name__}: {str(cause).splitlines()[0][:120]}" if cause is not None
               else str(exc).splitlines()[0])
        raise InputError(f"{flag} {value}: not a readable regseg checkpoint ({why}); a .pt file "
                         "written by `regseg train` (regseg.models.checkpoint) is expected"
                         ) from None
    found = checkpoint.get("model")
    found_ndim = (checkpoint.get("config") or {}).get("ndim")
    if found != model or (ndim is not None and found_ndim != ndim):
        what = f"{found}" + (f" {found_ndim}-D" if found_ndim is not None else "")
        want = model + (f" {ndim}-D" if ndim is not None else "")
        raise InputError(f"{flag} {value}: a checkpoint of model {what}; {flag} takes a "
                         f"checkpoint of model {want}")


def memory_message(exc: MemoryError) -> str:
    """One clear sentence for a MemoryError (whose own text is often empty)."""
    detail = f" ({exc})" if str(exc) else ""
    return ("out of memory" + detail + ": the input (volume size, frame size) or the chosen "
            "batch needs more memory than this machine has free; use smaller inputs, or free "
            "memory and retry")


#: What every entry point catches at its top and turns into an exit code (see :func:`exit_code`).
TOP_LEVEL_ERRORS = (KeyboardInterrupt, MemoryError, RegsegError)


def exit_code(prog: str, exc: BaseException) -> int:
    """One paragraph on stderr for an error that reached an entry point, and its exit code: 130
    interrupted (Ctrl-C), 2 bad input (InputError, out of memory for the input), 1 any other
    regseg failure at run time. The one mapping for ``regseg``, ``regseg-stream``,
    ``regseg-serve`` and ``regseg-igt``."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, MemoryError):
        print(f"{prog}: error: {memory_message(exc)}", file=sys.stderr)
        return EXIT_INPUT
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return EXIT_INPUT if isinstance(exc, InputError) else 1
