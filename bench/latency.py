"""End-to-end latency over loopback OpenIGTLink: sender -> pipeline -> receiver, regseg vs naive.

The sender is a simulated scanner behind an OpenIGTLink server (as PLUS would be). Each pipeline
runs as its own process exactly as a user starts it: ``regseg-stream`` with the chosen engine
backend, and the naive baseline of bench/naive.py (pyigtl client + MONAI GlobalNet + LocalNet +
UNet, eager, sequential, 256 x 256). The receiver is a separate client on the pipeline's
OpenIGTLink server (as 3D Slicer would be). Latency is the receiver's wall clock at receipt of the
``Overlay`` IMAGE minus the timestamp the sender put on the frame (both pipelines pass it
through), so it covers both network hops, decoding, the pipeline and encoding.

Frames are rendered before the run so the sender costs almost nothing while a pipeline is
measured (this machine has two cores). Prints a table, writes JSON and a histogram PNG.

    python bench/latency.py [--quick] [--json out/bench_latency.json] [--device cuda --fps 500]
        [--frame-size 480x640]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_ratios, device_name, print_table, summarise, write_histogram, write_json

from regseg.errors import StreamError
from regseg.sim.phantom import make_phantom, write_phantom
from regseg.sim.scanner import ScannerConfig, SimulatedScanner
from regseg.stream.cli_parser import DEFORMABLE_DEFAULT
from regseg.stream.igtl.sim_server import SimIgtlServer
from regseg.stream.igtl.wire import MessageReader

WARMUP = 10  # first results include lazy allocations: not what a session sees
NAIVE = Path(__file__).with_name("naive.py")


class PrerenderedScanner:
    """Cycles through frames rendered up front, with the scanner's API (frame(i), config)."""

    def __init__(self, scanner: SimulatedScanner, count: int) -> None:
        self.config = scanner.config
        self.frames = [scanner.frame(i) for i in range(count)]

    def frame(self, index: int):
        return self.frames[index % len(self.frames)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receive(port: int, frames: int, timeout_s: float,
            proc: subprocess.Popen) -> list[tuple[float, float]]:
    """(latency ms, sender timestamp s) of each Overlay image received from the pipeline."""
    deadline = time.monotonic() + timeout_s
    sock = None
    while sock is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        except OSError:
            time.sleep(0.1)  # the server is not up yet; start-up takes a few seconds
    if sock is None:
        raise RuntimeError("the pipeline did not open its OpenIGTLink server")
    sock.settimeout(0.5)
    reader = MessageReader(sock)
    latencies: list[tuple[float, float]] = []
    with sock:
        while len(latencies) < frames and time.monotonic() < deadline and proc.poll() is None:
            try:
                msg = reader.read()
            except StreamError:  # the pipeline closed: its exit status tells why
                break
            if msg is not None and msg.message_type == "IMAGE" and msg.device_name == "Overlay":
                latencies.append(((time.time() - msg.timestamp) * 1e3, msg.timestamp))
        # Stay connected and drain until the pipeline exits: pyigtl's send_message(wait=True),
        # as the naive pipeline calls it, never returns once its only client has gone.
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reader.read()
            except StreamError:
                break
    return latencies


def pipeline_command(kind: str, args, case: tuple[Path, Path], source_port: int,
                     serve_port: int, frames: int, stats_path: Path) -> list[str]:
    """The command line of one pipeline process."""
    if kind == "naive":
        return [sys.executable, str(NAIVE), "--mri", str(case[0]), "--mri-labels", str(case[1]),
                "--source-port", str(source_port), "--serve-port", str(serve_port),
                "--max-frames", str(frames), "--threads", str(args.naive_threads),
                "--device", args.device, "--stats-json", str(stats_path)]
    return [sys.executable, "-m", "regseg.stream.cli", "--mri", str(case[0]), "--mri-labels",
            str(case[1]), "--source", f"igtl://127.0.0.1:{source_port}", "--serve",
            f"igtl://127.0.0.1:{serve_port}", "--max-frames", str(frames), "--quiet",
            "--device", args.device, "--threads", str(args.threads), "--engine-threads",
            str(args.engine_threads or args.threads), "--backend", args.backend,
            "--precision", args.precision, "--stats-json", str(stats_path),
            "--deformable", ((getattr(args, "deformable_mode", None) or DEFORMABLE_DEFAULT)
                             if "+deformable" in kind else "off"),
            "--overlap", "on" if kind.endswith("+overlap") else "off",
            *(["--lc2", args.lc2] if getattr(args, "lc2", None) else []),
            *(["--lc2-hold", args.lc2_hold] if getattr(args, "lc2_hold", None) else []),
            *(["--lc2-rescue", args.lc2_rescue] if getattr(args, "lc2_rescue", None) else []),
            *(["--resegment", args.resegment] if getattr(args, "resegment", None) else []),
            *(["--intensity", args.intensity] if getattr(args, "intensity", None) else []),
            *(["--seg-tta", args.seg_tta] if getattr(args, "seg_tta", None) else []),
            *(["--seg-prior", args.seg_prior] if getattr(args, "seg_prior", None) else []),
            *(["--scanner-adapt", args.scanner_adapt] if getattr(args, "scanner_adapt", None)
              else []),
            *(["--estimate-check", args.estimate_check]
              if getattr(args, "estimate_check", None) else []),
            *(["--stage-threads", str(args.stage_threads)]
              if getattr(args, "stage_threads", None) else [])]


def run_variant(kind: str, fps: float, frames: int, case: tuple[Path, Path], scanner,
                args) -> tuple[dict, list[float]]:
    """Run one pipeline against the sender at ``fps`` (0: flat out); its row and latencies."""
    serve_port = free_port()
    stats_path = Path(tempfile.mkdtemp()) / "stats.json"
    total = frames + WARMUP
    with SimIgtlServer(scanner, port=0, fps=fps) as sender:
        # a few frames more than received: the last results are still in flight at its exit
        cmd = pipeline_command(kind, args, case, sender.port, serve_port, total + 5, stats_path)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        try:
            latencies = receive(serve_port, total, 120 + frames, proc)
            elapsed = time.monotonic() - t0
        finally:
            try:
                out, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()  # never leave a pipeline process behind
                out, err = proc.communicate()
                raise RuntimeError(f"{kind} pipeline did not exit:\n{err[-3000:]}") from None
        sent = sender.frames_sent
        sent_stamps = sorted(sender.sent)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} pipeline failed ({proc.returncode}):\n{err[-3000:]}")
    stats = json.loads(stats_path.read_text())
    measured = [ms for ms, _ in latencies[WARMUP:]]
    stamps = [ts for _, ts in latencies[WARMUP:]]
    # dropped: frames the sender sent between the first and the last measured overlay that
    # never came back (skipped by a latest-wins hand-off, or processed and lost)
    in_window = sum(1 for ts in sent_stamps if stamps and stamps[0] <= ts <= stamps[-1])
    name = f"{kind} @{fps:g}fps" if fps > 0 else f"{kind} flat-out"
    row = summarise(name, measured, offered_fps=fps if fps > 0 else "max",
                    frames_sent=in_window, frames_received=len(measured),
                    frames_sent_total=sent, dropped=max(in_window - len(measured), 0),
                    receive_span_fps=round(len(latencies) / max(elapsed, 1e-9), 2),
                    device=device_name(args.device),
                    threads=args.naive_threads if kind == "naive" else args.threads)
    if kind != "naive":
        row["fps"] = stats.get("fps")
        row["engine"] = stats.get("engine")
        row["engine_info"] = stats.get("engine_info")
        row["deformable"] = stats.get("deformable")
        row["deformable_engine_info"] = stats.get("deformable_engine_info")
        row["processing_p50_ms"] = stats["stages_ms"].get("total", {}).get("p50")
        row["stages_p50_ms"] = {k: v["p50"] for k, v in stats["stages_ms"].items()}
        row["regseg_skipped"] = stats["skipped"]
    else:
        proc_ms = stats["processing_ms"][WARMUP:]
        row["fps"] = round(1000.0 / (sum(proc_ms) / len(proc_ms)), 2) if proc_ms else None
        row["processing_p50_ms"] = summarise("", proc_ms)["p50_ms"]
        row["engine"] = "monai globalnet+localnet+unet/eager (random weights)"
    return row, measured


def scanner_config(ap: argparse.ArgumentParser, text: str | None) -> ScannerConfig:
    """``--frame-size HxW``: the default scanner with that frame, its 51.2 mm field of view kept
    (the larger side at 0.2 mm x 256 / its pixels); None: the default 256 x 256."""
    if text is None:
        return ScannerConfig()
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if not (64 <= h <= 2048 and 64 <= w <= 2048):
        ap.error(f"--frame-size {text!r}: expected HxW, each 64 to 2048 pixels, e.g. 480x640")
    base = ScannerConfig()
    return dataclasses.replace(base, frame_hw=(h, w),
                               pixel_mm=base.pixel_mm * max(base.frame_hw) / max(h, w))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer frames (under 3 minutes)")
    ap.add_argument("--frames", type=int, default=None, help="measured frames per variant")
    ap.add_argument("--fps", type=float, default=30.0, help="offered rate of the paced runs")
    ap.add_argument("--threads", type=int, default=1, help="regseg's torch threads")
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="regseg's engine pool (onnxrt); default --threads")
    ap.add_argument("--naive-threads", type=int, default=2,
                    help="the naive pipeline's torch threads (torch's default: all cores)")
    ap.add_argument("--device", default="cpu", help="regseg's device: cpu or cuda")
    ap.add_argument("--backend", default="auto", help="regseg's engine backend")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--no-naive", action="store_true", help="regseg only (no ratio)")
    ap.add_argument("--deformable", action="store_true",
                    help="also run regseg with the live deformable stage (--deformable on)")
    ap.add_argument("--deformable-mode", choices=["on", "async"], default=None,
                    help="the regseg+deformable rows' --deformable (default: the CLI's, "
                    f"{DEFORMABLE_DEFAULT}; on: in order; async: the network one frame late on a "
                    "worker thread)")
    ap.add_argument("--overlap", action="store_true",
                    help="with --deformable, also run it with --overlap on (the host half of "
                    "each frame on a second thread) at the paced rate")
    ap.add_argument("--lc2", choices=["on", "async", "warm", "fast", "off"], default=None,
                    help="regseg-stream --lc2 for every regseg variant (default: its default)")
    ap.add_argument("--lc2-hold", choices=["on", "off"], default=None,
                    help="regseg-stream --lc2-hold for every regseg variant (default: its default)")
    ap.add_argument("--lc2-rescue", choices=["on", "off"], default=None,
                    help="regseg-stream --lc2-rescue for every regseg variant (default: its "
                    "default)")
    ap.add_argument("--resegment", choices=["on", "off"], default=None,
                    help="regseg-stream --resegment for every regseg variant (default: its "
                    "default)")
    ap.add_argument("--seg-tta", choices=["flip", "off"], default=None,
                    help="regseg-stream --seg-tta for every regseg variant (default: its default)")
    ap.add_argument("--seg-prior", choices=["on", "gated", "off"], default=None,
                    help="regseg-stream --seg-prior for every regseg variant (default: its "
                    "default)")
    ap.add_argument("--intensity", choices=["match", "off"], default=None,
                    help="regseg-stream --intensity for every regseg variant (default: its "
                    "default)")
    ap.add_argument("--scanner-adapt", choices=["on", "segmentation", "off"], default=None,
                    help="regseg-stream --scanner-adapt for every regseg variant (default: its "
                    "default); its build (a background thread, after the first 12 frames) "
                    "overlaps the first scored frames, so the row includes its cost")
    ap.add_argument("--estimate-check", choices=["on", "inform", "off"], default=None,
                    help="regseg-stream --estimate-check for every regseg variant (default: its "
                    "default); it runs on the first 12 frames no other check doubts")
    ap.add_argument("--stage-threads", type=int, choices=[1, 2], default=None,
                    help="regseg-stream --stage-threads for every regseg variant (default: its "
                    "default); 2: the deformable stage beside the segmentation")
    ap.add_argument("--frame-size", default=None, metavar="HxW",
                    help="the simulated scanner's frame size, e.g. 480x640 (a PLUS server's usual "
                         "640 x 480 video); the same 51 x 51 mm field of view scaled, so pixels "
                         "are smaller (default 256x256 at 0.2 mm)")
    ap.add_argument("--json", default="out/bench_latency.json")
    ap.add_argument("--png", default=None, help="histogram (default: JSON path with .png)")
    args = ap.parse_args(argv)
    if args.overlap and not args.deformable:
        ap.error("--overlap compares the deformable chain with and without it: add --deformable")
    frames = args.frames or (60 if args.quick else 300)
    config = scanner_config(ap, args.frame_size)

    workdir = Path(tempfile.mkdtemp(prefix="regseg-bench-"))
    phantom = make_phantom(0)
    case = write_phantom(phantom, workdir)
    scanner = PrerenderedScanner(SimulatedScanner(phantom, config, seed=0),
                                 min(frames + 20, 200))
    rows, series = [], {}
    for fps in (args.fps, 0.0):
        # regseg's live chain as issue 3 specifies it (affine AlignSegNet); with issue 4's
        # deformable stage on top at the paced rate only; the naive baseline last.
        kinds = ["regseg"] + (["regseg+deformable"] if fps > 0 and args.deformable else [])
        kinds += (["regseg+deformable+overlap"] if fps > 0 and args.deformable and args.overlap
                  else [])
        kinds += [] if args.no_naive else ["naive"]
        for kind in kinds:
            # the naive chain needs ~10x regseg's time per frame: fewer frames keep --quick short
            n = max(20, frames // 3) if kind == "naive" else frames
            row, measured = run_variant(kind, fps, n, case, scanner, args)
            rows.append(row)
            series[row["name"]] = measured
        naive_name = None if args.no_naive else rows[-1]["name"]
        add_ratios(rows[-len(kinds):], naive=naive_name)
    print_table(rows, [("name", "pipeline", ""), ("offered_fps", "offered", ""),
                       ("p50_ms", "p50 ms", ".1f"), ("p95_ms", "p95 ms", ".1f"),
                       ("p99_ms", "p99 ms", ".1f"), ("max_ms", "max ms", ".1f"),
                       ("fps", "fps", ".1f"), ("frames_sent", "sent", "d"),
                       ("frames_received", "recv", "d"), ("dropped", "drop", "d"),
                       ("ratio_p50_vs_naive", "x naive", ".1f")])
    write_json(args.json, "latency", rows, frames_per_variant=frames, warmup=WARMUP, argv=argv,
               deformable_mode=args.deformable_mode or DEFORMABLE_DEFAULT,
               frame_hw=list(config.frame_hw), pixel_mm=config.pixel_mm,
               lc2=args.lc2 or "default", lc2_hold=args.lc2_hold or "default",
               lc2_rescue=args.lc2_rescue or "default", resegment=args.resegment or "default",
               intensity=args.intensity or "default", seg_tta=args.seg_tta or "default",
               seg_prior=args.seg_prior or "default",
               scanner_adapt=args.scanner_adapt or "default",
               estimate_check=args.estimate_check or "default",
               stage_threads=args.stage_threads or "default",
               # REGSEG_NUMBA=0 switches the compiled kernels off (LC2's reslicer: torch's)
               regseg_numba=os.environ.get("REGSEG_NUMBA", "unset (1)"),
               # REGSEG_LC2_KERNELS=0: LC2's search as before session 22 (bench/lc2_kernels.py)
               regseg_lc2_kernels=os.environ.get("REGSEG_LC2_KERNELS", "unset (1)"))
    write_histogram(args.png or Path(args.json).with_suffix(".png"), series,
                    f"end-to-end latency over loopback OpenIGTLink ({device_name(args.device)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
