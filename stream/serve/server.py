"""The sessions of one ``regseg-serve`` process: add, remove, list, summarise."""

from __future__ import annotations

import logging
import threading
from typing import Any

from regseg.errors import InputError
from regseg.stream.serve.config import ServeConfig, SessionSpec, check_ports, check_session
from regseg.stream.serve.session import Session, SharedEngines

log = logging.getLogger(__name__)


class SessionExists(InputError):
    """A session of that name (or using that port) is already running."""


class ServeSessions:
    """Every session of the process and the engines they share; safe from any thread.

    Args:
        config: the checked config (its sessions are not started here: :meth:`add` each).
        engine_options: FusionEngine options (weights, backend, device, precision, threads).
        web: the web view's server, or None.
    """

    def __init__(self, config: ServeConfig, engine_options: dict[str, Any], *, web=None,
                 deformable_weights: str = "plcreg2d") -> None:
        self.config = config
        self.engines = SharedEngines(engine_options, config.batch_sizes,
                                     window_ms=config.batch_window_ms,
                                     deformable_weights=deformable_weights)
        self.web = web
        self._sessions: dict[str, Session] = {}
        self._building: set[str] = set()
        self._lock = threading.Lock()
        self.reserved_ports: dict[int, str] = {}  # control, web

    def check(self, table: Any, where: str) -> SessionSpec:
        """A session table checked, also against the running sessions' names and ports."""
        spec = check_session(table, where, self.config.engine)
        with self._lock:
            if spec.name in self._sessions or spec.name in self._building:
                raise SessionExists(f"{where}: a session named {spec.name!r} exists already")
            others = [s.spec for s in self._sessions.values()]
        check_ports(others + [spec], self.reserved_ports)
        return spec

    def add(self, spec: SessionSpec) -> Session:
        """Build and start a session (seconds: it loads its case); raises what the build raised."""
        with self._lock:
            if spec.name in self._sessions or spec.name in self._building:
                raise SessionExists(f"a session named {spec.name!r} exists already")
            self._building.add(spec.name)
        try:
            session = Session(spec, self.engines, self.web)
            session.start()
        finally:
            with self._lock:
                self._building.discard(spec.name)
        with self._lock:
            self._sessions[spec.name] = session
        log.info("session %s started (%s)", spec.name, spec.plan.source_url)
        return session

    def remove(self, name: str) -> dict:
        """Stop and forget session ``name``; its summary.

        Raises:
            KeyError: no such session.
        """
        with self._lock:
            session = self._sessions.pop(name)
        session.stop()
        log.info("session %s removed", name)
        return session.summary()

    def get(self, name: str) -> Session:
        with self._lock:
            return self._sessions[name]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def live(self) -> list[dict]:
        with self._lock:
            sessions = list(self._sessions.values())
        return [s.live() for s in sessions]

    def any_running(self) -> bool:
        with self._lock:
            return any(s.alive for s in self._sessions.values())

    def summary(self) -> dict:
        with self._lock:
            sessions = list(self._sessions.values())
        return {"sessions": {s.name: s.summary() for s in sessions},
                "aggregate_fps": round(sum((s.stats.fps() or 0.0) for s in sessions
                                           if s.stats.frames > 1), 2),
                "batching": self.config.batching, "batch_sizes": list(self.config.batch_sizes),
                "engines": self.engines.stats()}

    def stop_all(self) -> None:
        """Stop every session's loop (they stay listed, so :meth:`summary` still has them)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.stop()

    def close(self) -> None:
        for name in self.names():
            try:
                self.remove(name)
            except KeyError:
                pass
        self.engines.close()
