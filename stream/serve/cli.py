"""``regseg-serve``: several scanners' live sessions in one process, engines shared and batched."""

from __future__ import annotations

import argparse
import sys
import threading
import time

from regseg.cli_checks import (
    Once,
    Parser,
    float_at_least,
    int_at_least,
)
from regseg.errors import InputError
from regseg.stream.entry import run_live

EPILOG = """examples:
  regseg-serve --demo 2 --web 127.0.0.1:8080
  regseg-serve --config serve.toml --web 127.0.0.1:8080
  curl http://127.0.0.1:8765/sessions
  curl -X POST -d '{"name": "room3", "source": "sim://3"}' http://127.0.0.1:8765/sessions
  curl -X DELETE http://127.0.0.1:8765/sessions/room3

The config file (TOML) has a [serve] table (device, backend, batching, max-batch, control, web)
and one [[session]] table per scanner, whose keys are regseg-stream's flags without the dashes
(source, mri, mri-labels, serve, zmq, ...); see README "Several scanners: regseg-serve".
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="regseg-serve", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Several live MRI-TRUS fusion sessions (one per scanner) in one "
               "process: engines shared, frames micro-batched across sessions, a local HTTP "
               "control endpoint and an optional browser view.")
    p.add_argument("--config", action=Once, default=None, help="the sessions, a TOML file")
    p.add_argument("--demo", action=Once, type=int_at_least(1), default=None, metavar="N",
                   help="N simulated scanners (sim://0 ... sim://N-1) instead of a config file")
    p.add_argument("--web", action=Once, default=None, metavar="HOST:PORT",
                   help="browser view, e.g. 127.0.0.1:8080 ('none': off; default: [serve] web)")
    p.add_argument("--control", action=Once, default=None, metavar="HOST:PORT",
                   help="HTTP control endpoint ('none': off; default: [serve] control, "
                   "127.0.0.1:8765)")
    p.add_argument("--batching", action=Once, choices=["on", "off"], default=None,
                   help="micro-batch frames across sessions (default: [serve] batching, on)")
    p.add_argument("--max-batch", action=Once, type=int_at_least(1), default=None,
                   help="largest static batch (default: [serve] max-batch, 4)")
    p.add_argument("--device", action=Once, default=None, help="auto, cpu or cuda[:N]")
    p.add_argument("--backend", action=Once, default=None,
                   choices=["auto", "eager", "compiled", "onnxrt", "tensorrt"],
                   help="engine backend (default: [serve] backend, auto)")
    p.add_argument("--fps", action=Once, type=float_at_least(0.0, 1000.0), default=30.0,
                   help="--demo: simulated scanner frame rate")
    p.add_argument("--duration", action=Once, type=float_at_least(0.1), default=None,
                   metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--stats-json", action=Once, default=None,
                   help="write the exit summary (every session's) here as JSON")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    return p


def _config(args):
    """The checked ServeConfig of the file (or --demo) with the command line's overrides."""
    from regseg.cli_checks import check_writable
    from regseg.stream.serve.config import (
        ServeConfig,
        address,
        check_ports,
        check_serve,
        check_session,
        load_config,
    )

    if (args.config is None) == (args.demo is None):
        raise InputError("give either --config serve.toml or --demo N")
    overrides = {k: v for k, v in (("device", args.device), ("backend", args.backend))
                 if v is not None}
    if args.config is not None:
        config = load_config(args.config)
        if overrides:
            config.engine.update(overrides)
    else:
        config = check_serve(overrides, "command line")
        config.control = None
        for n in range(args.demo):
            table = {"name": f"sim{n}", "source": f"sim://{n}", "fps": args.fps}
            config.sessions.append(check_session(table, f"--demo session {n}", config.engine))
    if args.batching is not None:
        config.batching = args.batching == "on"
    if args.max_batch is not None:
        config.max_batch = args.max_batch
    if args.web is not None:
        config.web = None if args.web == "none" else address(args.web, "--web")
    if args.control is not None:
        config.control = None if args.control == "none" else address(args.control, "--control")
    taken = {a[1]: w for a, w in ((config.control, "control"), (config.web, "web")) if a}
    if config.control and config.web and config.control[1] == config.web[1] != 0:
        raise InputError(f"control and web both on port {config.web[1]}; one port each")
    check_ports(config.sessions, {p: w for p, w in taken.items() if p})
    if args.stats_json:
        check_writable(args.stats_json, "--stats-json")
    return config if isinstance(config, ServeConfig) else config


def _engine_options(config) -> tuple[dict, str]:
    from regseg.stream.cli_args import _device

    e = config.engine
    device = _device(e.get("device", "auto"))
    threads = e.get("threads") or (1 if device.type == "cpu" else None)
    options = {"weights": e.get("weights"), "backend": e.get("backend", "auto"),
               "device": device, "precision": e.get("precision", "fp32"),
               "threads": e.get("engine_threads") or threads}
    return options, e.get("deformable_weights", "plcreg2d")


def _status_line(sessions) -> str:
    parts = []
    for s in sessions.live():
        fps = f"{s['fps']:.1f}" if s["fps"] is not None else "-"
        p99 = s["latency_ms"]["p99"]
        parts.append(f"{s['name']} {s['state']} {fps} fps p99 {p99 if p99 is not None else '-'}"
                     f" ms")
    return " | ".join(parts) or "no sessions"


def run(args, stop: threading.Event | None = None,
        running: threading.Event | None = None) -> dict:
    """Serve until ``stop``, ``--duration``, or (without a control endpoint) every session ended.

    ``running`` is set once every configured session has started (``stop`` then ends cleanly).
    """
    config = _config(args)
    import torch

    options, deformable_weights = _engine_options(config)
    if options["device"].type == "cpu":
        torch.set_num_threads(config.engine.get("threads") or 1)
    from regseg.stream.serve.control import control_app
    from regseg.stream.serve.server import ServeSessions
    from regseg.stream.stats import write_json
    from regseg.stream.web.server import AppLoop, WebServer

    stop = stop or threading.Event()
    app_loop = AppLoop()
    web = None
    sessions = None
    try:
        sessions = ServeSessions(config, options, deformable_weights=deformable_weights)
        if config.web:
            try:
                web = WebServer(*config.web, sessions=sessions.live, app_loop=app_loop)
            except OSError as exc:
                raise InputError(f"--web {config.web[0]}:{config.web[1]}: cannot listen "
                                 f"({exc.strerror}); choose another port") from None
            sessions.web = web
            sessions.reserved_ports[web.port] = "web"
            print(f"regseg-serve: web view {web.url}", file=sys.stderr, flush=True)
        if config.control:
            try:
                host, port = app_loop.add_app(control_app(sessions), *config.control)
            except OSError as exc:
                raise InputError(f"control {config.control[0]}:{config.control[1]}: cannot "
                                 f"listen ({exc.strerror}); choose another port") from None
            sessions.reserved_ports[port] = "control"
            print(f"regseg-serve: control http://{host}:{port}/sessions", file=sys.stderr,
                  flush=True)
        for spec in config.sessions:
            sessions.add(spec)
            print(f"regseg-serve: session {spec.name} ({spec.plan.source_url})",
                  file=sys.stderr, flush=True)
        print(f"regseg-serve: {len(config.sessions)} sessions running; batching "
              f"{'on, sizes ' + str(list(config.batch_sizes)) if config.batching else 'off'}",
              file=sys.stderr, flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        if running is not None:
            running.set()
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if config.control is None and not sessions.any_running():
                break
            if not args.quiet:
                print(_status_line(sessions), file=sys.stderr, flush=True)
            timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            stop.wait(timeout)
        sessions.stop_all()
        summary = sessions.summary()
    finally:
        if running is not None:
            running.clear()
        if sessions is not None:
            sessions.close()
        if web is not None:
            web.close()
        app_loop.close()
    if args.stats_json:
        write_json(summary, args.stats_json)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'session':<16}{'frames':>8}{'fps':>8}{'p50 ms':>9}{'p99 ms':>9}{'skipped':>9}"
             f"{'failed':>8}  state"]
    for name, s in summary["sessions"].items():
        lat = s["latency_ms"]
        lines.append(f"{name:<16}{s['frames']:>8}{s['fps']:>8}{lat['p50']:>9}{lat['p99']:>9}"
                     f"{s['skipped']:>9}{s['failed_frames']:>8}  {s['state']}")
    lines.append(f"aggregate {summary['aggregate_fps']} frames/s; batching "
                 f"{'on' if summary['batching'] else 'off'} {summary['batch_sizes']}")
    for kind, b in summary["engines"].items():
        lines.append(f"engine {kind}: {b['calls']} calls, {b['frames']} frames, mean batch "
                     f"{b['mean_batch']}, padded {b['padded']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``regseg-serve``: 0 done, 2 bad input, 1 a failure, 130 interrupted (after the summary).

    Ctrl-C or SIGTERM once the sessions run ends them cleanly (summary printed and written);
    before that (checks, loading, building engines) it ends the process at once, quietly.
    """

    def report(summary: dict) -> None:
        print(format_summary(summary))

    def start(stop, running) -> dict:
        return run(build_parser().parse_args(argv), stop=stop, running=running)

    return run_live("regseg-serve", start, report)


if __name__ == "__main__":
    sys.exit(main())
