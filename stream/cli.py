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
from regseg.stream.capture import (
    MULTI_START_DEFAULT,
    REFINE_ITERATIONS,
    TEMPORAL_FILTER_DEFAULT,
    build_capture,
)
from regseg.stream.stats import format_summary, write_json

EPILOG = """examples:
  regseg-stream --demo --max-frames 200
  regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz \\
      --source igtl://plus-host:18944 --serve igtl://127.0.0.1:18945 --zmq tcp://127.0.0.1:5556
  regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz \\
      --source file://session.igs.mha --replay-rate recorded --record out/run.igs.mha
"""


#: Live deformable refinement by default: on, because on 80 held-out phantom frames it raised the
#: registered prostate Dice 0.957 -> 0.981 and lowered TRE 0.85 -> 0.58 mm, for ~11 ms per frame
#: on the 2-core CPU with ONNX Runtime (bench/registration.py; README "Registration (offline and
#: deformable live)"); the whole chain then keeps a 30 fps source (bench/latency.py).
DEFORMABLE_DEFAULT = "on"


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
                   help="igtl://HOST:PORT (PLUS or scanner OpenIGTLink server), sim://[SEED] "
                   "(simulated scanner), file://PATH (PLUS sequence file .igs.mha/.seq.nrrd ...), "
                   "grabber://N (capture device N) or a video file path; default sim:// with "
                   "--demo")
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
    p.add_argument("--backend", default="auto",
                   choices=["auto", "eager", "compiled", "onnxrt", "tensorrt"],
                   help="engine backend; auto (default) builds the candidates for the device, "
                   "checks each against eager and takes the fastest (the choice is printed)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="engine precision (fp16/bf16: matmuls and convolutions low, norms fp32)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: capture the whole per-frame chain as one CUDA graph")
    p.add_argument("--weights", default=None, help="AlignSegNet checkpoint (default: shipped)")
    p.add_argument("--deformable", choices=["on", "off"], default=DEFORMABLE_DEFAULT,
                   help="refine the affine registration with the 2-D PLCReg (issue 4; default "
                   f"{DEFORMABLE_DEFAULT}, see README 'Registration')")
    p.add_argument("--deformable-weights", default="plcreg2d",
                   help="2-D PLCReg checkpoint for --deformable on (default: shipped)")
    p.add_argument("--refine-iterations", type=int, default=REFINE_ITERATIONS, metavar="K",
                   help="registrations per frame, each on the MRI resliced at the estimate so far "
                   f"(default {REFINE_ITERATIONS}; README 'Capture range')")
    p.add_argument("--multi-start", choices=["on", "off"], default=MULTI_START_DEFAULT,
                   help="register 7 start hypotheses (shifts, rotations) in one batched call and "
                   f"keep the best (default {MULTI_START_DEFAULT})")
    p.add_argument("--temporal-filter", choices=["on", "off"], default=TEMPORAL_FILTER_DEFAULT,
                   help="filter the correction over frames, start each frame from it, report "
                   f"jump_mm (default {TEMPORAL_FILTER_DEFAULT})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default on CPU: 1; the per-frame glue ops are too "
                   "small to gain from more, and two busy thread pools thrash on 2 cores)")
    p.add_argument("--engine-threads", type=int, default=None,
                   help="threads of the engine's own pool (onnxrt); default: --threads")
    p.add_argument("--stats-json", default=None, help="write the exit summary here as JSON")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    io = p.add_argument_group("interoperability and recording")
    io.add_argument("--replay-rate", choices=["recorded", "max"], default="recorded",
                    help="file:// and video replay: at the recorded rate, or flat out (the "
                    "pipeline then takes the newest frame; skips are counted)")
    io.add_argument("--record", default=None, metavar="PATH",
                    help="record every incoming frame with its pose and time as a PLUS sequence "
                    "file (.igs.mha, .seq.mha, .igs.nrrd, .seq.nrrd)")
    io.add_argument("--record-outputs", action="store_true",
                    help="with --record, also record labels and overlays (PATH_Labels.*, "
                    "PATH_Overlay.*) with MRIToImage per frame")
    io.add_argument("--grabber-crop", default=None, metavar="X,Y,W,H",
                    help="grabber/video: the ultrasound image inside the captured frame, pixels")
    io.add_argument("--grabber-spacing-mm", default="0.2,0.2", metavar="ROW,COL",
                    help="grabber/video: pixel size of the cropped image in mm (default 0.2,0.2)")
    io.add_argument("--pose-source", default=None, metavar="igtl://HOST:PORT",
                    help="grabber/video: take ImageToReference TRANSFORMs from this OpenIGTLink "
                    "server (untracked without it)")
    io.add_argument("--igtl-header-version", type=int, choices=[1, 2], default=2,
                    help="OpenIGTLink header version we send: 2 (Slicer, PLUS; metadata) or 1 "
                    "(OpenIGTLink <= 2.x receivers such as Debian's 1.11 library)")
    io.add_argument("--no-contours", action="store_true",
                    help="do not send the ProstateContour/LesionContour POLYDATA outlines")
    net = p.add_argument_group("network safeguards (OpenIGTLink server)")
    net.add_argument("--max-clients", type=int, default=8,
                     help="clients each --serve server takes at once; more are refused and "
                     "counted (default 8)")
    net.add_argument("--accept-registration-from", default=None, metavar="HOST[,HOST]",
                     help="hosts whose MRIToReference/ReferenceToMRI TRANSFORM may change the "
                     "registration (default: none; every such TRANSFORM is refused and logged)")
    net.add_argument("--registration-max-jump-mm", type=float, default=10.0,
                     help="refuse a registration change moving the prostate centre further "
                     "(default 10 mm)")
    net.add_argument("--registration-max-jump-deg", type=float, default=10.0,
                     help="refuse a registration change turning more (default 10 degrees)")
    net.add_argument("--allow-registration-jump", action="store_true",
                     help="take registration changes above both limits (still logged)")
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


def _spacing(text: str) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise InputError(f"--grabber-spacing-mm {text!r}: ROW,COL in mm expected, e.g. 0.2,0.2"
                         ) from exc
    return row, col


def _file_or_grabber_source(args, source_url: str, slot):
    """FileSource for file:// sequence files; GrabberSource for grabber://N and video files."""
    from regseg.stream.grabber_source import VIDEO_EXTENSIONS, GrabberSource, parse_crop

    path = source_url[len("file://"):] if source_url.startswith("file://") else source_url
    if source_url.startswith("grabber://") or path.lower().endswith(VIDEO_EXTENSIONS):
        device = source_url[len("grabber://"):] if source_url.startswith("grabber://") else path
        if device.isdigit():
            device = int(device)
        pose_source = None
        if args.pose_source:
            from regseg.stream.igtl.source import IgtlSource

            host, port = _host_port(args.pose_source, "igtl", "--pose-source")
            pose_source = IgtlSource(host, port)
        crop = parse_crop(args.grabber_crop) if args.grabber_crop else None
        return GrabberSource(device, slot, crop=crop, spacing_mm=_spacing(args.grabber_spacing_mm),
                             pose_source=pose_source,
                             fps=0.0 if args.replay_rate == "max" else None)
    from regseg.stream.file_source import FileSource

    return FileSource(path, slot, rate=args.replay_rate)


def _context_and_source(args, device, slot=None):
    """MRI context and frame source for the parsed arguments (imports here keep start-up quick)."""
    from regseg.stream.context import build_context, load_context
    from regseg.stream.slot import LatestSlot

    slot = slot if slot is not None else LatestSlot()

    source_url = args.source or ("sim://" if args.demo else None)
    if source_url is None:
        raise InputError("no --source given: use --source igtl://HOST:PORT for a scanner or PLUS "
                         "server, or --demo for the simulated scanner")
    if source_url.startswith("sim://"):
        from regseg.sim.phantom import make_phantom
        from regseg.sim.scanner import SimulatedScanner
        from regseg.stream.source import SimSource

        if args.mri or args.mri_labels:
            raise InputError("--mri/--mri-labels cannot be used with the simulated scanner: it "
                             "images its own phantom case (write it with `regseg phantom`)")
        seed = _sim_seed(source_url, args.seed)
        phantom = make_phantom(seed)
        context = build_context(phantom.mri, phantom.labels, device)
        source = SimSource(SimulatedScanner(phantom, seed=seed), slot, fps=args.fps)
    elif source_url.startswith("igtl://"):
        if not (args.mri and args.mri_labels):
            raise InputError("--source igtl:// needs the patient case: --mri case.nii.gz "
                             "--mri-labels case_labels.nii.gz")
        context = load_context(args.mri, args.mri_labels, device)
        from regseg.stream.igtl.source import IgtlSource

        host, port = _host_port(source_url, "igtl", "--source")
        source = IgtlSource(host, port, slot, image_device=args.image_device)
    elif source_url.startswith(("file://", "grabber://")) or "://" not in source_url:
        if not (args.mri and args.mri_labels):
            raise InputError(f"--source {source_url}: needs the patient case: --mri case.nii.gz "
                             "--mri-labels case_labels.nii.gz")
        source = _file_or_grabber_source(args, source_url, slot)
        context = load_context(args.mri, args.mri_labels, device)
    else:
        raise InputError(f"--source {source_url!r}: unknown scheme; expected igtl://HOST:PORT, "
                         "sim://[SEED], file://PATH.igs.mha, grabber://N or a video file")
    return context, source, source_url


def _sinks(args, on_message=None) -> tuple[list, list[str]]:
    """The sinks the arguments ask for, opened (servers bound); returns them and their URLs.

    ``on_message`` receives what Slicer sends to our OpenIGTLink servers (MRIToReference).
    """
    sinks, urls = [], []
    contours = None if args.no_contours else ("ProstateContour", "LesionContour")
    serve = args.serve if args.serve is not None else (["igtl://127.0.0.1:18945"] if args.demo
                                                       else [])
    for url in serve:
        if url == "none":
            continue
        from regseg.stream.igtl.server import IgtlServer
        from regseg.stream.igtl.sink import IgtlSink

        host, port = _host_port(url, "igtl", "--serve")
        sinks.append(IgtlSink(IgtlServer(host, port, on_message=on_message,
                                         max_clients=args.max_clients),
                              header_version=args.igtl_header_version, contour_devices=contours))
        urls.append(url)
    zmq_url = args.zmq if args.zmq is not None else ("tcp://127.0.0.1:5556" if args.demo else None)
    if zmq_url and zmq_url != "none":
        from regseg.stream.zmq_sink import ZmqSink

        sinks.append(ZmqSink(zmq_url))
        urls.append(zmq_url)
    return sinks, urls


def run(args) -> dict:
    """Run the stream for parsed arguments; returns the summary dict."""
    device = _device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    reference_to_mri = _reference_to_mri(args.reference_to_mri)
    from regseg.stream.igtl.registration import RegistrationListener, parse_hosts

    registration_hosts = parse_hosts(args.accept_registration_from)
    if args.max_clients < 1:
        raise InputError(f"--max-clients {args.max_clients}: at least 1 expected")
    for flag, value in (("--registration-max-jump-mm", args.registration_max_jump_mm),
                        ("--registration-max-jump-deg", args.registration_max_jump_deg)):
        if not value > 0:
            raise InputError(f"{flag} {value}: a positive number expected")
    recorder = slot = None
    if args.record:
        from regseg.stream.recorder import Recorder, RecordingSlot

        recorder = Recorder(args.record, outputs=args.record_outputs)
        slot = RecordingSlot(recorder)
    elif args.record_outputs:
        raise InputError("--record-outputs needs --record PATH.igs.mha")
    try:
        context, source, source_url = _context_and_source(args, device, slot)
    except BaseException:
        if recorder is not None:
            recorder.close()
        raise
    from regseg.engines.fusion import FusionEngine
    from regseg.stream.pipeline import Pipeline
    from regseg.stream.runner import run_stream

    engine = FusionEngine(args.weights, backend=args.backend, device=device,
                          precision=args.precision, threads=args.engine_threads or threads)
    # Slicer's MRIToReference, from the next frame on, from allowed hosts only (issue 9)
    registration = RegistrationListener(
        allowed_hosts=registration_hosts,
        reference_to_mri=reference_to_mri, pivot_mri=context.prostate_centre_mm(),
        max_jump_mm=args.registration_max_jump_mm, max_jump_deg=args.registration_max_jump_deg,
        allow_jump=args.allow_registration_jump)
    sinks, sink_urls = _sinks(args, on_message=registration)
    if recorder is not None:
        sinks.append(recorder)
        sink_urls.append(f"record:{args.record}")
    deformable = None
    if args.deformable == "on":
        from regseg.stream.deformable import DeformableStage

        deformable = DeformableStage(context, args.deformable_weights, backend=args.backend,
                                     precision=args.precision,
                                     threads=args.engine_threads or threads)
    capture = build_capture(args.refine_iterations, args.multi_start == "on",
                            args.temporal_filter == "on", weights=args.weights,
                            backend=args.backend, device=device, precision=args.precision,
                            threads=args.engine_threads or threads)
    pipeline = Pipeline(context, engine, reference_to_mri=reference_to_mri,
                        cuda_graph=args.cuda_graph, deformable=deformable, capture=capture)
    registration.bind(pipeline.set_reference_to_mri)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stats, skipped = run_stream(source, pipeline, sinks, max_frames=args.max_frames, stop=stop,
                                    status_every_s=0 if args.quiet else 1.0)
    finally:
        signal.signal(signal.SIGINT, previous)
    extra = {"engine": f"alignsegnet/{engine.backend}", "device": str(device),
             "deformable": (f"{deformable.weights}/{deformable.engine.backend}"
                            if deformable is not None else "off"),
             "engine_info": engine.info,
             "capture": {"refine_iterations": capture.refine_iterations,
                         "multi_start": args.multi_start, "temporal_filter": args.temporal_filter},
             "deformable_engine_info": (deformable.engine.engine.info
                                        if deformable is not None else None),
             "source": source_url,
             "sinks": sink_urls,
             "source_stats": source.stats(),
             "registration_from_slicer": registration.stats()}
    if recorder is not None:
        extra["recorder"] = recorder.stats()
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
