"""Several scanners at once: one ``regseg-serve`` (batching on and off) beside N ``regseg-stream``.

N simulated scanners (N = 1, 2, 4, 8; --quick: 1, 2, 4) each stream at 30 fps over loopback
OpenIGTLink, as PLUS would, to:

- ``batched``: one ``regseg-serve`` process, one session per scanner, frames micro-batched
  across sessions (static batch sizes 1, 2, 4, 8);
- ``unbatched``: the same process with ``--batching off`` (the sessions' engine calls one at a
  time, in arrival order);
- ``separate``: N ``regseg-stream`` processes, one per scanner.

Every arm runs the same chain (``regseg-stream``'s defaults: refinement K = 2, temporal filter,
deformable stage, quality check, overlay), the same engine backend (--backend, onnxrt on CPU by
default: what ``auto`` picks there, without its minute of trial builds per batch size) and one
thread per engine, as ``regseg-stream`` uses on the CPU. Frames are rendered before the run (the
senders cost almost nothing) and every sender starts on one common schedule once every session is
connected (so start-up times do not count), sends for --seconds, and stops. Per session: fps,
latency p50/p99 (receipt to result), frames skipped by the newest-frame slot; per arm the
aggregate frames/s = frames processed by all sessions / seconds sent.

Last, the dead-source check: 3 sessions in one batched ``regseg-serve`` at --dead-fps; one
scanner stops halfway; the others' frames/s before and after (read from the control endpoint).

    python bench/serve.py [--quick] [--json out/bench_serve.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import device_name, print_table, write_json
from latency import PrerenderedScanner

from regseg.clock import now_ns
from regseg.sim.phantom import make_phantom, write_phantom
from regseg.sim.scanner import SimulatedScanner
from regseg.stream.igtl.sim_server import SimIgtlServer

START_TIMEOUT_S = 300  # engines are built (and ONNX exported once) while the machine is shared
ARMS = ("batched", "unbatched", "separate")


def _senders(scanner, n: int, fps: float, seconds: float) -> list[SimIgtlServer]:
    """N listening senders; not sending until :func:`_go`."""
    return [SimIgtlServer(scanner, port=0, fps=fps, max_frames=int(round(fps * seconds)),
                          wait_for_client=False) for _ in range(n)]


def _go(senders: list[SimIgtlServer], procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait until every sender has its client, then start all on one schedule."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for s in senders:
        while not s.server.wait_for_clients(1, timeout=0.5):
            for p, log in zip(procs, logs, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"a pipeline ended before connecting:\n"
                                       f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no client on {s.port} after {START_TIMEOUT_S} s")
    t0 = now_ns() + int(0.3e9)
    for s in senders:
        s.t0 = t0
        s.start()


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)  # a clean end: the stats JSON is written
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _serve_config(path: Path, ports: list[int], case, args, *, batching: bool,
                  control: bool = False) -> None:
    lines = ["[serve]", f'device = "{args.device}"', f'backend = "{args.backend}"',
             f"batching = {'true' if batching else 'false'}", f"max-batch = {args.max_batch}",
             f'control = "{"127.0.0.1:0" if control else "none"}"',
             f"batch-window-ms = {args.window_ms}"]
    if args.serve_engine_threads:
        lines.append(f"engine-threads = {args.serve_engine_threads}")
    lines.append("")
    for k, port in enumerate(ports):
        lines += ["[[session]]", f'name = "s{k}"', f'source = "igtl://127.0.0.1:{port}"',
                  f'mri = "{case[0]}"', f'mri-labels = "{case[1]}"', ""]
    path.write_text("\n".join(lines))


def _row(arm: str, n: int, sessions: list[dict], seconds: float, fps: float) -> dict:
    frames = sum(s["frames"] for s in sessions)
    lat = [s["latency_ms"] for s in sessions]
    return {"arm": arm, "sessions": n, "offered_fps": n * fps,
            "aggregate_fps": round(frames / seconds, 2),
            "session_fps_min": min(s["fps"] or 0.0 for s in sessions),
            "p50_ms_max": max(x["p50"] or 0.0 for x in lat),
            "p99_ms_max": max(x["p99"] or 0.0 for x in lat),
            "skipped": sum(s["skipped"] for s in sessions),
            "per_session": [{"frames": s["frames"], "fps": s["fps"], "skipped": s["skipped"],
                             "p50_ms": s["latency_ms"]["p50"], "p99_ms": s["latency_ms"]["p99"]}
                            for s in sessions]}


def run_arm(arm: str, n: int, scanner, case, work: Path, args) -> dict:
    """One arm at N scanners; returns its row."""
    senders = _senders(scanner, n, args.fps, args.seconds)
    ports = [s.port for s in senders]
    procs, logs, stats = [], [], []
    try:
        if arm in ("batched", "unbatched"):
            config, stat = work / f"{arm}{n}.toml", work / f"{arm}{n}.json"
            _serve_config(config, ports, case, args, batching=arm == "batched")
            logs.append(work / f"{arm}{n}.log")
            stats.append(stat)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "regseg.stream.serve.cli", "--config", str(config),
                 "--quiet", "--stats-json", str(stat)],
                stdout=logs[-1].open("w"), stderr=subprocess.STDOUT))
        else:
            for k, port in enumerate(ports):
                stat = work / f"separate{n}_{k}.json"
                logs.append(work / f"separate{n}_{k}.log")
                stats.append(stat)
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "regseg.stream.cli", "--source",
                     f"igtl://127.0.0.1:{port}", "--mri", str(case[0]), "--mri-labels",
                     str(case[1]), "--serve", "none", "--zmq", "none", "--quiet",
                     "--device", args.device, "--backend", args.backend,
                     "--stats-json", str(stat)],
                    stdout=logs[-1].open("w"), stderr=subprocess.STDOUT))
        _go(senders, procs, logs)
        for s in senders:
            s.done.wait(args.seconds + 30)
        time.sleep(1.0)  # the last frames through the pipelines
    finally:
        for s in senders:
            s.stop()
        _stop(procs)
    sessions = []
    for stat, log in zip(stats, logs, strict=True):
        if not stat.exists():
            raise RuntimeError(f"{arm} N={n}: no stats written:\n{log.read_text()[-3000:]}")
        data = json.loads(stat.read_text())
        sessions += list(data["sessions"].values()) if "sessions" in data else [data]
    row = _row(arm, n, sessions, args.seconds, args.fps)
    if arm != "separate":
        row["engines"] = data.get("engines")
    return row


def _frames_by_session(control: str) -> dict[str, int]:
    with urllib.request.urlopen(control, timeout=10) as reply:
        return {s["name"]: s["frames"] for s in json.load(reply)["sessions"]}


def dead_source(scanner, case, work: Path, args) -> dict:
    """3 batched sessions; scanner s0 stops halfway: the others' frames/s before and after."""
    n, seconds, fps = 3, args.seconds * 2, args.dead_fps
    senders = _senders(scanner, n, fps, seconds)
    config, log = work / "dead.toml", work / "dead.log"
    _serve_config(config, [s.port for s in senders], case, args, batching=True, control=True)
    proc = subprocess.Popen([sys.executable, "-m", "regseg.stream.serve.cli", "--config",
                             str(config), "--quiet"], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    try:
        _go(senders, [proc], [log])
        control = next(line.split()[-1] for line in log.read_text().splitlines()
                       if "control http" in line)
        half = seconds / 2
        time.sleep(1.0)  # settle
        t1, f1 = time.monotonic(), _frames_by_session(control)
        time.sleep(half - 1.0)
        t2, f2 = time.monotonic(), _frames_by_session(control)
        senders[0].stop()  # its scanner dies; the session waits for it (OpenIGTLink reconnect)
        time.sleep(1.0)
        t3, f3 = time.monotonic(), _frames_by_session(control)
        time.sleep(half - 2.0)
        t4, f4 = time.monotonic(), _frames_by_session(control)
    finally:
        for s in senders:
            s.stop()
        _stop([proc])
    others = ("s1", "s2")
    before = sum(f2[k] - f1[k] for k in others) / len(others) / (t2 - t1)
    after = sum(f4[k] - f3[k] for k in others) / len(others) / (t4 - t3)
    dead_after = (f4["s0"] - f3["s0"]) / (t4 - t3)
    return {"sessions": n, "offered_fps_each": fps,
            "others_fps_before": round(before, 2), "others_fps_after": round(after, 2),
            "ratio": round(after / before, 3) if before else None,
            "dead_session_fps_after": round(dead_after, 2),
            "not_below_90pct": bool(before and after >= 0.9 * before)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1, 2, 4 and shorter runs "
                    "(under 10 minutes here)")
    ap.add_argument("--sessions", default=None, help="comma-separated N (default 1,2,4,8)")
    ap.add_argument("--seconds", type=float, default=None, help="sending time per run")
    ap.add_argument("--fps", type=float, default=30.0, help="each scanner's frame rate")
    ap.add_argument("--dead-fps", type=float, default=10.0,
                    help="frame rate of the dead-source check's scanners")
    ap.add_argument("--arms", default=",".join(ARMS), help="which of " + ", ".join(ARMS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="default onnxrt on CPU, auto on CUDA")
    ap.add_argument("--max-batch", type=int, default=None, help="default: the largest N")
    ap.add_argument("--window-ms", type=float, default=2.0,
                    help="regseg-serve's batch-window-ms (longest wait for the others' frames)")
    ap.add_argument("--serve-engine-threads", type=int, default=None,
                    help="regseg-serve's engine threads (default 1, as each regseg-stream)")
    ap.add_argument("--no-dead-source", action="store_true")
    ap.add_argument("--json", default="out/bench_serve.json")
    args = ap.parse_args(argv)
    ns = [int(v) for v in (args.sessions or ("1,2,4" if args.quick else "1,2,4,8")).split(",")]
    args.seconds = args.seconds or (8.0 if args.quick else 20.0)
    args.backend = args.backend or ("onnxrt" if args.device == "cpu" else "auto")
    args.max_batch = args.max_batch or max(ns)
    arms = args.arms.split(",")

    load_start = os.getloadavg()  # others' work on this machine skews every number: say it
    print(f"load average at start {load_start[0]:.1f} (on {os.cpu_count()} cores)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="regseg-bench-serve-"))
    phantom = make_phantom(0)
    case = write_phantom(phantom, work)
    scanner = PrerenderedScanner(SimulatedScanner(phantom, seed=0), 30)
    rows = []
    t_start = time.monotonic()
    for n in ns:
        for arm in arms:
            row = run_arm(arm, n, scanner, case, work, args)
            rows.append(row)
            print(f"{arm:>9} N={n}: {row['aggregate_fps']:.1f} frames/s "
                  f"({time.monotonic() - t_start:.0f} s so far)", flush=True)
    print_table(rows, [("arm", "arm", ""), ("sessions", "N", "d"),
                       ("offered_fps", "offered", ".0f"), ("aggregate_fps", "frames/s", ".1f"),
                       ("session_fps_min", "min fps", ".1f"), ("p50_ms_max", "p50 ms", ".1f"),
                       ("p99_ms_max", "p99 ms", ".1f"), ("skipped", "skipped", "d")])
    aggregate = {arm: {str(r["sessions"]): r["aggregate_fps"] for r in rows if r["arm"] == arm}
                 for arm in arms}
    dead = None if args.no_dead_source else dead_source(scanner, case, work, args)
    if dead:
        print(f"dead source: the other sessions' fps {dead['others_fps_before']} before, "
              f"{dead['others_fps_after']} after (ratio {dead['ratio']}); the dead session "
              f"{dead['dead_session_fps_after']} fps after")
    write_json(args.json, "serve", rows, argv, device=device_name(args.device),
               backend=args.backend, fps_per_scanner=args.fps, seconds=args.seconds,
               window_ms=args.window_ms, serve_engine_threads=args.serve_engine_threads or 1,
               load_average_start=load_start, load_average_end=os.getloadavg(),
               aggregate_fps=aggregate, dead_source=dead,
               wall_s=round(time.monotonic() - t_start, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
