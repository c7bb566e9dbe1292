"""The ``regseg-serve`` config file (TOML): server-wide options and one table per session.

Example::

    [serve]
    device = "cpu"              # auto, cpu, cuda[:N]; every engine lives here
    backend = "auto"            # auto, eager, compiled, onnxrt, tensorrt
    batching = true             # micro-batch the frames ready across sessions
    max-batch = 4               # static batch sizes 1, 2, 4 (powers of two up to this)
    batch-window-ms = 2.0       # how long a batch waits for the other sessions' frames
    control = "127.0.0.1:8765"  # HTTP control endpoint (list/add/remove sessions)
    web = "127.0.0.1:8080"      # the browser view (optional)

    [[session]]
    name = "room1"
    source = "igtl://127.0.0.1:18944"
    mri = "case1.nii.gz"
    mri-labels = "case1_labels.nii.gz"
    serve = ["igtl://127.0.0.1:18945"]
    zmq = "tcp://127.0.0.1:5556"

A session's keys are ``regseg-stream``'s flags without the leading dashes (the per-session ones,
:data:`SESSION_KEYS`), checked by the same rules (:func:`regseg.stream.cli_args.check_args`).
Every error names the file, the table and the key, the value and what is expected.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regseg.cli_checks import host_port
from regseg.errors import InputError

#: regseg-stream flags a session may set. The others (device, backend, precision, weights,
#: threads ...) choose the engines, which all sessions share: they belong in [serve].
SESSION_KEYS = (
    "source", "mri", "mri-labels", "serve", "zmq", "zmq-allow", "image-device", "fps", "seed",
    "reference-to-mri", "deformable", "refine-iterations", "temporal-filter", "replay-rate",
    "grabber-crop", "grabber-spacing-mm", "pose-source", "max-frame-pixels", "no-contours",
    "igtl-header-version", "max-clients", "accept-registration-from",
    "registration-max-jump-mm", "registration-max-jump-deg", "allow-registration-jump",
    "do-no-harm", "do-no-harm-margin-mm", "roi", "lc2", "resegment",
    "consensus", "intensity", "seg-window", "jump-at", "seg-tta", "seg-prior", "estimate-check",
    "stage-threads", "seg-fallback", "lc2-hold", "lc2-rescue",
)
#: [serve] keys that are regseg-stream flags, applied to every session's engines.
ENGINE_KEYS = ("device", "backend", "precision", "threads", "engine-threads", "weights",
               "deformable-weights")
SERVE_KEYS = ENGINE_KEYS + ("batching", "max-batch", "batch-window-ms", "control", "web")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_BATCH = 64
DEFAULT_CONTROL = "127.0.0.1:8765"


@dataclass
class SessionSpec:
    """One session as checked: its name, regseg-stream arguments and their plan."""

    name: str
    args: argparse.Namespace
    plan: argparse.Namespace
    table: dict[str, Any]  # as given (shown by the control endpoint)

    def ports(self) -> list[tuple[int, str]]:
        """(port, what) of every TCP server this session binds."""
        out = [(port, f"serve {url}") for url, _host, port in self.plan.serve]
        if self.plan.zmq and self.plan.zmq.startswith("tcp://"):
            out.append((host_port(self.plan.zmq, "tcp", "zmq")[1], f"zmq {self.plan.zmq}"))
        return out


@dataclass
class ServeConfig:
    """Server-wide options and the sessions to start with."""

    engine: dict[str, Any] = field(default_factory=dict)  # ENGINE_KEYS given, by dest name
    batching: bool = True
    max_batch: int = 4
    batch_window_ms: float = 2.0
    control: tuple[str, int] | None = ("127.0.0.1", 8765)
    web: tuple[str, int] | None = None
    sessions: list[SessionSpec] = field(default_factory=list)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The static batch shapes: powers of two up to ``max_batch`` (and it)."""
        if not self.batching:
            return (1,)
        sizes = {1 << k for k in range(int(math.log2(self.max_batch)) + 1)} | {self.max_batch}
        return tuple(sorted(sizes))


def address(text: Any, where: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), port 0-65535 (0: any free port)."""
    if not isinstance(text, str) or text.count(":") != 1:
        raise InputError(f"{where} {text!r}: HOST:PORT expected, e.g. 127.0.0.1:8080")
    host, port = text.split(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InputError(f"{where} {text!r}: HOST:PORT with PORT 0-65535 expected, "
                         "e.g. 127.0.0.1:8080")
    return host, int(port)


def _stream_actions() -> dict[str, argparse.Action]:
    from regseg.stream.cli_parser import build_parser

    return {a.option_strings[0][2:]: a for a in build_parser()._actions  # noqa: SLF001
            if a.option_strings and a.option_strings[0].startswith("--")}


def _set(ns: argparse.Namespace, action: argparse.Action, key: str, value: Any,
         where: str) -> None:
    """Put ``value`` into ``ns`` as regseg-stream's parser would, with its type and choices."""
    what = f"{where}: {key} = {value!r}"
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise InputError(f"{what}: true or false expected")
        setattr(ns, action.dest, value)
        return
    items = value if isinstance(action, argparse._AppendAction) else [value]  # noqa: SLF001
    if not isinstance(items, list) or not items:
        raise InputError(f"{what}: a list of strings expected, e.g. [\"igtl://127.0.0.1:18945\"]")
    converted = []
    for item in items:
        if isinstance(item, (dict, list)) or isinstance(item, bool):
            raise InputError(f"{what}: a {'string' if action.type is None else 'number'} "
                             "expected")
        try:
            v = action.type(str(item)) if action.type is not None else str(item)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise InputError(f"{what}: {exc}") from None
        if action.choices is not None and v not in action.choices:
            raise InputError(f"{what}: one of {list(action.choices)} expected")
        converted.append(v)
    setattr(ns, action.dest, converted if isinstance(action, argparse._AppendAction)  # noqa: SLF001
            else converted[0])


def check_session(table: Any, where: str, engine: dict[str, Any] | None = None) -> SessionSpec:
    """One session table -> its checked :class:`SessionSpec` (files readable, ports free ...).

    Raises:
        InputError: naming ``where``, the key, the value and what is expected.
    """
    from regseg.stream.cli_args import check_args
    from regseg.stream.cli_parser import build_parser

    if not isinstance(table, dict):
        raise InputError(f"{where}: a table of keys expected, got {type(table).__name__}")
    name = table.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(f"{where}: name = {name!r}: 1-64 letters, digits, '_', '.' or '-' "
                         "expected (it is the session's name in URLs)")
    where = f"{where} ({name!r})"
    if "source" not in table:
        raise InputError(f"{where}: no source; expected e.g. source = \"igtl://HOST:PORT\" or "
                         "\"sim://SEED\"")
    actions = _stream_actions()
    args = build_parser().parse_args([])
    for key, value in (engine or {}).items():
        setattr(args, key, value)
    for key, value in table.items():
        if key == "name":
            continue
        if key not in SESSION_KEYS:
            hint = " (engines are shared: set it in [serve])" if key in ENGINE_KEYS else ""
            raise InputError(f"{where}: unknown key {key!r}{hint}; expected one of "
                             f"{', '.join(SESSION_KEYS)}")
        _set(args, actions[key], key, value, where)
    args.quiet = True
    try:
        plan = check_args(args)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return SessionSpec(name, args, plan, dict(table))


def _engine_options(table: dict[str, Any], where: str) -> dict[str, Any]:
    actions = _stream_actions()
    ns = argparse.Namespace()
    for key in ENGINE_KEYS:
        if key in table:
            _set(ns, actions[key], key, table[key], where)
    return vars(ns)


def check_serve(table: Any, where: str) -> ServeConfig:
    """The [serve] table -> a ServeConfig without sessions."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise InputError(f"{where}: a table expected")
    unknown = sorted(set(table) - set(SERVE_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; expected one of "
                         f"{', '.join(SERVE_KEYS)}")
    config = ServeConfig(engine=_engine_options(table, where))
    if "batching" in table:
        if not isinstance(table["batching"], bool):
            raise InputError(f"{where}: batching = {table['batching']!r}: true or false expected")
        config.batching = table["batching"]
    if "max-batch" in table:
        n = table["max-batch"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BATCH:
            raise InputError(f"{where}: max-batch = {n!r}: a whole number 1-{MAX_BATCH} expected")
        config.max_batch = n
    if "batch-window-ms" in table:
        w = table["batch-window-ms"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 100:
            raise InputError(f"{where}: batch-window-ms = {w!r}: a number 0-100 expected")
        config.batch_window_ms = float(w)
    control = table.get("control", DEFAULT_CONTROL)
    config.control = None if control == "none" else address(control, f"{where}: control =")
    if "web" in table and table["web"] != "none":
        config.web = address(table["web"], f"{where}: web =")
    return config


def check_ports(specs: list[SessionSpec], taken: dict[int, str]) -> None:
    """No two servers on one port (sessions, control, web); ``taken``: port -> what."""
    taken = dict(taken)
    for spec in specs:
        for port, what in spec.ports():
            if port in taken:
                raise InputError(f"session {spec.name!r}: {what}: port {port} is also used by "
                                 f"{taken[port]}; one port per server")
            taken[port] = f"session {spec.name!r} {what}"


def load_config(path: str | Path) -> ServeConfig:
    """Read and check a ``regseg-serve`` config file (see the module docstring).

    Raises:
        InputError: unreadable, not TOML, or any bad table or key (named with the file).
    """
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config ({exc.strerror}); a TOML file with "
                         "[serve] and [[session]] tables is expected") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise InputError(f"{path}: arrays or tables nested too deeply; a TOML file with "
                         "[serve] and [[session]] tables is expected") from None
    unknown = sorted(set(data) - {"serve", "session"})
    if unknown:
        raise InputError(f"{path}: unknown table {unknown[0]!r}; expected [serve] and "
                         "[[session]] tables")
    config = check_serve(data.get("serve"), f"{path} [serve]")
    sessions = data.get("session", [])
    if not isinstance(sessions, list):
        raise InputError(f"{path}: session must be an array of tables ([[session]]), not a "
                         "single [session] table")
    names: set[str] = set()
    for n, table in enumerate(sessions, 1):
        spec = check_session(table, f"{path} [[session]] {n}", config.engine)
        if spec.name in names:
            raise InputError(f"{path} [[session]] {n}: name {spec.name!r} is used twice; each "
                             "session needs its own name")
        names.add(spec.name)
        config.sessions.append(spec)
    taken = {}
    if config.control:
        taken[config.control[1]] = "control"
    if config.web:
        taken[config.web[1]] = "web"
    check_ports(config.sessions, {p: w for p, w in taken.items() if p})
    return config
