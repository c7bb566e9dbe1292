"""``regseg-stream``: the live MRI-TRUS fusion loop from the command line."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from regseg.errors import InputError, RegsegError
from regseg.stream.stats import format_summary, write_json

EPILOG = """examples:
  regseg-stream --demo --max-frames 200
  regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz \\
      --source igtl://plus-host:18944 --serve igtl://127.0.0.1:18945 --zmq tcp://127.0.0.1:5556
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regseg-stream", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Live MRI-TRUS fusion: register the MRI to every "
                                "ultrasound frame, segment prostate and lesion, publish overlays.")
    p.add_argument("--demo", action="store_true",
                   help="simulated scanner on a generated phantom case; no files needed")
    p.add_argument("--mri", help="patient MRI, 3-D NIfTI (T2)")
    p.add_argument("--mri-labels", help="labels: 3-D NIfTI on the MRI grid: 1 prostate, 2 lesion")
    p.add_argument("--source", default=None,
                   help="igtl://HOST:PORT (PLUS or scanner OpenIGTLink server) or sim://[SEED] "
                   "(simulated scanner); default sim:// with --demo")
    p.add_argument("--image-device", default=None,
                   help="IMAGE device to use (default: the first seen, e.g. Image_Reference)")
    p.add_argument("--serve", action="append", default=None,
                   help="OpenIGTLink server for 3D Slicer, igtl://HOST:PORT (repeatable; 'none' "
                   "for no server; default igtl://127.0.0.1:18945 with --demo)")
    p.add_argument("--zmq", default=None,
                   help="ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5556 ('none' for none; default "
                   "tcp://127.0.0.1:5556 with --demo)")
    p.add_argument("--reference-to-mri", default=None,
                   help="text file with the 4x4 ReferenceToMRI matrix (initial registration); "
                   "default identity")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many results")
    p.add_argument("--fps", type=float, default=30.0,
                   help="simulated scanner frame rate (0 = flat out)")
    p.add_argument("--seed", type=int, default=0, help="phantom and scanner seed for sim://")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default="eager", choices=["eager"],
                   help="engine backend (more arrive with the engine layer)")
    p.add_argument("--weights", default=None, help="AlignSegNet checkpoint (default: shipped)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--stats-json", default=None, help="write the exit summary here as JSON")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name!r}: not a device; use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _host_port(url: str, scheme: str, flag: str) -> tuple[str, int]:
    parsed = urlparse(url)
    if parsed.scheme != scheme or not parsed.hostname or parsed.port is None:
        raise InputError(f"{flag} {url!r}: expected {scheme}://HOST:PORT, e.g. "
                         f"{scheme}://127.0.0.1:18944")
    return parsed.hostname, parsed.port


def _reference_to_mri(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        m = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise InputError(f"--reference-to-mri {path}: cannot read a matrix ({exc}); a text file "
                         "with 4 rows of 4 numbers is expected") from exc
    if m.shape != (4, 4) or not np.allclose(m[3], [0, 0, 0, 1]):
        raise InputError(f"--reference-to-mri {path}: got shape {m.shape}; a 4x4 affine matrix "
                         "with last row 0 0 0 1 is expected")
    return m


def _sim_seed(source: str, default: int) -> int:
    rest = source[len("sim://"):]
    if not rest:
        return default
    if not rest.isdigit():
        raise InputError(f"--source {source!r}: expected sim:// or sim://SEED with an integer seed")
    return int(rest)


def _context_and_source(args, device):
    """MRI context and frame source for the parsed arguments (imports here keep start-up quick)."""
    from regseg.stream.context import build_context, load_context
    from regseg.stream.slot import LatestSlot

    source_url = args.source or ("sim://" if args.demo else None)
    if source_url is None:
        raise InputError("no --source given: use --source igtl://HOST:PORT for a scanner or PLUS "
                         "server, or --demo for the simulated scanner")
    if source_url.startswith("sim://"):
        from regseg.phantom import make_phantom
        from regseg.scanner import SimulatedScanner
        from regseg.stream.source import SimSource

        if args.mri or args.mri_labels:
            raise InputError("--mri/--mri-labels cannot be used with the simulated scanner: it "
                             "images its own phantom case (write it with `regseg phantom`)")
        seed = _sim_seed(source_url, args.seed)
        phantom = make_phantom(seed)
        context = build_context(phantom.mri, phantom.labels, device)
        source = SimSource(SimulatedScanner(phantom, seed=seed), LatestSlot(), fps=args.fps)
    elif source_url.startswith("igtl://"):
        if not (args.mri and args.mri_labels):
            raise InputError("--source igtl:// needs the patient case: --mri case.nii.gz "
                             "--mri-labels case_labels.nii.gz")
        context = load_context(args.mri, args.mri_labels, device)
        from regseg.stream.igtl_source import IgtlSource

        host, port = _host_port(source_url, "igtl", "--source")
        source = IgtlSource(host, port, LatestSlot(), image_device=args.image_device)
    else:
        raise InputError(f"--source {source_url!r}: unknown scheme; expected igtl://HOST:PORT or "
                         "sim://[SEED]")
    return context, source, source_url


def _sinks(args) -> tuple[list, list[str]]:
    """The sinks the arguments ask for, opened (servers bound); returns them and their URLs."""
    sinks, urls = [], []
    serve = args.serve if args.serve is not None else (["igtl://127.0.0.1:18945"] if args.demo
                                                       else [])
    for url in serve:
        if url == "none":
            continue
        from regseg.stream.igtl_server import IgtlServer
        from regseg.stream.igtl_sink import IgtlSink

        host, port = _host_port(url, "igtl", "--serve")
        sinks.append(IgtlSink(IgtlServer(host, port)))
        urls.append(url)
    zmq_url = args.zmq if args.zmq is not None else ("tcp://127.0.0.1:5556" if args.demo else None)
    if zmq_url and zmq_url != "none":
        from regseg.stream.zmq_sink import ZmqSink

        sinks.append(ZmqSink(zmq_url))
        urls.append(zmq_url)
    return sinks, urls


def run(args) -> dict:
    """Run the stream for parsed arguments; returns the summary dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    reference_to_mri = _reference_to_mri(args.reference_to_mri)
    context, source, source_url = _context_and_source(args, device)
    from regseg.engines.fusion import FusionEngine
    from regseg.stream.pipeline import Pipeline
    from regseg.stream.runner import run_stream

    engine = FusionEngine(args.weights, backend=args.backend, device=device)
    sinks, sink_urls = _sinks(args)
    pipeline = Pipeline(context, engine, reference_to_mri=reference_to_mri)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stats, skipped = run_stream(source, pipeline, sinks, max_frames=args.max_frames, stop=stop,
                                    status_every_s=0 if args.quiet else 1.0)
    finally:
        signal.signal(signal.SIGINT, previous)
    extra = {"engine": f"alignsegnet/{engine.backend}", "device": str(device),
             "source": source_url,
             "sinks": sink_urls,
             "source_stats": source.stats()}
    summary = stats.summary(skipped=skipped, extra=extra)
    if args.stats_json:
        write_json(summary, args.stats_json)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.stats_json:
            Path(args.stats_json).parent.mkdir(parents=True, exist_ok=True)
        summary = run(args)
    except InputError as exc:
        print(f"regseg-stream: error: {exc}", file=sys.stderr)
        return 2
    except RegsegError as exc:
        print(f"regseg-stream: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
