"""``regseg-stream``: the live MRI-TRUS fusion loop from the command line."""

from __future__ import annotations

import argparse
import sys
import threading

# Only the standard library and regseg's light modules at import time: Ctrl-C must find main()'s
# handler installed as early as possible, so numpy, torch and the rest are imported in functions.
from regseg.cli_checks import (
    Once,
    Parser,
    float_at_least,
    int_at_least,
)
from regseg.stream.cli_args import check_args
from regseg.stream.entry import run_live

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
    from regseg.geometry import MAX_FRAME_PIXELS
    from regseg.stream.capture import (
        MULTI_START_DEFAULT,
        REFINE_ITERATIONS,
        TEMPORAL_FILTER_DEFAULT,
    )

    p = Parser(prog="regseg-stream", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Live MRI-TRUS fusion: register the MRI to every ultrasound frame, "
               "segment prostate and lesion, publish overlays.")
    p.add_argument("--demo", action="store_true",
                   help="simulated scanner on a generated phantom case; no files needed")
    p.add_argument("--mri", action=Once, help="patient MRI, 3-D NIfTI (T2)")
    p.add_argument("--mri-labels", action=Once,
                   help="labels: 3-D NIfTI on the MRI grid: 1 prostate, 2 lesion")
    p.add_argument("--source", action=Once, default=None,
                   help="igtl://HOST:PORT (PLUS or scanner OpenIGTLink server), sim://[SEED] "
                   "(simulated scanner), file://PATH (PLUS sequence file .igs.mha/.seq.nrrd ...), "
                   "grabber://N (capture device N) or a video file path; default sim:// with "
                   "--demo")
    p.add_argument("--image-device", action=Once, default=None,
                   help="IMAGE device to use (default: the first seen, e.g. Image_Reference)")
    p.add_argument("--serve", action="append", default=None,
                   help="OpenIGTLink server for 3D Slicer, igtl://HOST:PORT (repeatable; 'none' "
                   "for no server; default igtl://127.0.0.1:18945 with --demo)")
    p.add_argument("--zmq", action=Once, default=None,
                   help="ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5556 ('none' for none; default "
                   "tcp://127.0.0.1:5556 with --demo)")
    p.add_argument("--reference-to-mri", action=Once, default=None,
                   help="ReferenceToMRI (initial registration): ITK .tfm/.h5 as Slicer saves it, "
                   "PLUS .xml (Reference -> MRI) or a text file of 4 rows of 4 numbers; default "
                   "identity")
    cal = p.add_argument_group("calibration (regseg calibrate ...)")
    cal.add_argument("--probe-calibration", action=Once, default=None, metavar="FILE",
                     help="ImageToProbe (PLUS .xml, .tfm/.h5 or 4x4 .txt, pixels -> mm): pair "
                     "IMAGEs with the probe's TRANSFORM (--probe-transform) and use "
                     "ProbeToReference x ImageToProbe as the frame's pose (igtl:// sources)")
    cal.add_argument("--probe-transform", action=Once, default="ProbeToTracker", metavar="NAME",
                     help="the probe's TRANSFORM device with --probe-calibration (default "
                     "ProbeToTracker; ProbeToReference with a reference marker)")
    cal.add_argument("--time-offset-ms", action=Once, type=float_at_least(-5000.0, 5000.0),
                     default=0.0, metavar="MS",
                     help="pair an IMAGE stamped t with the pose stamped t + MS (the lag "
                     "`regseg calibrate temporal` measures; igtl:// sources)")
    cal.add_argument("--landmarks-mri", action=Once, default=None, metavar="FILE",
                     help="landmarks in the MRI (.mrk.json/.fcsv); with --landmarks-reference, "
                     "ReferenceToMRI is registered from them at start (FRE printed)")
    cal.add_argument("--landmarks-reference", action=Once, default=None, metavar="FILE",
                     help="the same landmarks in the tracker's Reference frame (.mrk.json/.fcsv)")
    p.add_argument("--max-frames", action=Once, type=int_at_least(1), default=None,
                   help="stop after this many results")
    p.add_argument("--fps", action=Once, type=float_at_least(0.0, 1000.0), default=30.0,
                   help="simulated scanner frame rate (0 = flat out)")
    p.add_argument("--seed", action=Once, type=int_at_least(0), default=0,
                   help="phantom and scanner seed for sim://")
    p.add_argument("--device", action=Once, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", action=Once, default="auto",
                   choices=["auto", "eager", "compiled", "onnxrt", "tensorrt"],
                   help="engine backend; auto (default) builds the candidates for the device, "
                   "checks each against eager and takes the fastest (the choice is printed)")
    p.add_argument("--precision", action=Once, default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="engine precision (fp16/bf16: matmuls and convolutions low, norms fp32)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: capture the whole per-frame chain as one CUDA graph")
    p.add_argument("--weights", action=Once, default=None,
                   help="AlignSegNet checkpoint (default: shipped)")
    p.add_argument("--deformable", action=Once, choices=["on", "off"], default=DEFORMABLE_DEFAULT,
                   help="refine the affine registration with the 2-D PLCReg (default "
                   f"{DEFORMABLE_DEFAULT}; see README 'Registration')")
    p.add_argument("--deformable-weights", action=Once, default="plcreg2d",
                   help="2-D PLCReg checkpoint for --deformable on (default: shipped)")
    p.add_argument("--segmenter", action=Once, choices=["unet", "ascseg", "ascseg-trus"],
                   default="unet",
                   help="segmentation stage: unet (default, AlignSegNet's head), ascseg (ASC-Seg "
                   "on the frame + registered MRI) or ascseg-trus (ASC-Seg on the frame alone: "
                   "the disagreement flag then compares two independent views)")
    p.add_argument("--refine-iterations", action=Once, type=int_at_least(1),
                   default=REFINE_ITERATIONS, metavar="K",
                   help="registrations per frame, each on the MRI resliced at the estimate so far "
                   f"(default {REFINE_ITERATIONS}; README 'Capture range')")
    p.add_argument("--multi-start", action=Once, choices=["on", "off"],
                   default=MULTI_START_DEFAULT,
                   help="register 7 start hypotheses (shifts, rotations) in one batched call and "
                   f"keep the best (default {MULTI_START_DEFAULT})")
    p.add_argument("--temporal-filter", action=Once, choices=["on", "off", "warm"],
                   default=TEMPORAL_FILTER_DEFAULT,
                   help="on: filter the correction over frames and report jump_mm; warm: also "
                   f"start each frame from the filtered one (default {TEMPORAL_FILTER_DEFAULT})")
    p.add_argument("--threads", action=Once, type=int_at_least(1), default=None,
                   help="CPU threads for torch (default on CPU: 1; the per-frame glue ops are too "
                   "small to gain from more, and two busy thread pools thrash on 2 cores)")
    p.add_argument("--engine-threads", action=Once, type=int_at_least(1), default=None,
                   help="threads of the engine's own pool (onnxrt); default: --threads")
    p.add_argument("--max-frame-pixels", action=Once, type=int_at_least(64 * 64),
                   default=MAX_FRAME_PIXELS,
                   help="frames with more pixels are refused and counted (refused_frames."
                   f"too_large); default {MAX_FRAME_PIXELS} = 2048x2048, 4x the largest TRUS "
                   "frames PLUS streams; OpenIGTLink IMAGE bodies above the matching size are "
                   "skipped unread")
    p.add_argument("--stats-json", action=Once, default=None,
                   help="write the exit summary here as JSON (checked writable at start)")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    io = p.add_argument_group("interoperability and recording")
    io.add_argument("--replay-rate", action=Once, choices=["recorded", "max"], default="recorded",
                    help="file:// and video replay: at the recorded rate, or flat out (the "
                    "pipeline then takes the newest frame; skips are counted)")
    io.add_argument("--record", action=Once, default=None, metavar="PATH",
                    help="record every incoming frame with its pose and time as a PLUS sequence "
                    "file (.igs.mha, .seq.mha, .igs.nrrd, .seq.nrrd)")
    io.add_argument("--record-outputs", action="store_true",
                    help="with --record, also record labels and overlays (PATH_Labels.*, "
                    "PATH_Overlay.*) with MRIToImage per frame")
    io.add_argument("--grabber-crop", action=Once, default=None, metavar="X,Y,W,H",
                    help="grabber/video: the ultrasound image inside the captured frame, pixels")
    io.add_argument("--grabber-spacing-mm", action=Once, default="0.2,0.2", metavar="ROW,COL",
                    help="grabber/video: pixel size of the cropped image in mm (default 0.2,0.2)")
    io.add_argument("--pose-source", action=Once, default=None, metavar="igtl://HOST:PORT",
                    help="grabber/video: take ImageToReference TRANSFORMs from this OpenIGTLink "
                    "server (untracked without it)")
    io.add_argument("--igtl-header-version", action=Once, type=int, choices=[1, 2], default=2,
                    help="OpenIGTLink header version we send: 2 (Slicer, PLUS; metadata) or 1 "
                    "(OpenIGTLink <= 2.x receivers such as Debian's 1.11 library)")
    io.add_argument("--web", action=Once, default=None, metavar="HOST:PORT",
                    help="browser view of the overlay, quality, fps and latency, e.g. "
                    "127.0.0.1:8080 (JPEG over a WebSocket; 0.0.0.0 to reach it from a tablet)")
    io.add_argument("--no-contours", action="store_true",
                    help="do not send the ProstateContour/LesionContour POLYDATA outlines")
    net = p.add_argument_group("network safeguards (OpenIGTLink server)")
    net.add_argument("--max-clients", action=Once, type=int_at_least(1), default=8,
                     help="clients each --serve server takes at once; more are refused and "
                     "counted (default 8)")
    net.add_argument("--accept-registration-from", action=Once, default=None,
                     metavar="HOST[,HOST]",
                     help="hosts whose MRIToReference/ReferenceToMRI TRANSFORM may change the "
                     "registration (default: none; every such TRANSFORM is refused and logged)")
    net.add_argument("--registration-max-jump-mm", action=Once,
                     type=float_at_least(1e-3, 1e3), default=10.0,
                     help="refuse a registration change moving the prostate centre further "
                     "(default 10 mm)")
    net.add_argument("--registration-max-jump-deg", action=Once,
                     type=float_at_least(1e-3, 180.0), default=10.0,
                     help="refuse a registration change turning more (default 10 degrees)")
    net.add_argument("--allow-registration-jump", action="store_true",
                     help="take registration changes above both limits (still logged)")
    return p


def _file_or_grabber_source(args, plan, slot):
    """FileSource for file:// sequence files; GrabberSource for grabber://N and video files."""
    if plan.kind == "file":
        from regseg.stream.file_source import FileSource

        return FileSource(plan.source_url[len("file://"):], slot, rate=args.replay_rate)
    from regseg.stream.grabber_source import GrabberSource

    device = plan.source_url
    if plan.kind == "grabber":
        device = int(plan.source_url[len("grabber://"):])
    pose_source = None
    if plan.pose_source:
        from regseg.stream.igtl.source import IgtlSource

        pose_source = IgtlSource(*plan.pose_source, expect_images=False)
    return GrabberSource(device, slot, crop=plan.crop, spacing_mm=plan.spacing_mm,
                         pose_source=pose_source,
                         fps=0.0 if args.replay_rate == "max" else None)


def _pairing(args, plan) -> dict:
    """IgtlSource arguments for --probe-calibration and --time-offset-ms (issue 10)."""
    if plan.image_to_probe is None and not plan.time_offset_s:
        return {}
    from regseg.stream.igtl.pairing import TimestampPairer

    # Poses follow their images by about the offset: wait that long plus the usual margin, keep
    # poses back that far, and take the nearest within half a 30 fps period (no interpolation).
    offset = plan.time_offset_s
    pairer = TimestampPairer(tolerance_s=0.017 if offset else 0.005,
                             max_wait_s=0.05 + max(offset, 0.0),
                             history=16 + int(abs(offset) * 200),
                             image_to_probe=plan.image_to_probe, time_offset_s=offset)
    extra = {"pairer": pairer}
    if plan.image_to_probe is not None:
        extra["transform_device"] = args.probe_transform
    return extra


def _context_and_source(args, plan, slot):
    """MRI context and frame source for the checked plan (imports here keep start-up quick)."""
    from regseg.stream.context import build_context, load_context

    if plan.kind == "sim":
        from regseg.sim.phantom import make_phantom
        from regseg.sim.scanner import SimulatedScanner
        from regseg.stream.source import SimSource

        phantom = make_phantom(plan.seed)
        context = build_context(phantom.mri, phantom.labels, plan.device)
        return context, SimSource(SimulatedScanner(phantom, seed=plan.seed), slot, fps=args.fps)
    if plan.kind == "igtl":
        from regseg.stream.igtl.source import IgtlSource
        from regseg.stream.igtl.wire import image_body_limit

        source = IgtlSource(plan.source_host, plan.source_port, slot,
                            image_device=args.image_device,
                            max_image_bytes=image_body_limit(plan.limits.max_pixels),
                            **_pairing(args, plan))
    else:  # opened first: a missing device or unreadable file fails before the MRI loads
        source = _file_or_grabber_source(args, plan, slot)
    try:
        return load_context(args.mri, args.mri_labels, plan.device), source
    except BaseException:
        source.stop()
        raise


def _sinks(args, plan, on_message=None) -> tuple[list, list[str]]:
    """The sinks the plan asks for, opened (servers bound); returns them and their URLs.

    ``on_message`` receives what Slicer sends to our OpenIGTLink servers (MRIToReference).
    """
    sinks, urls = [], []
    contours = None if args.no_contours else ("ProstateContour", "LesionContour")
    try:
        for url, host, port in plan.serve:
            from regseg.stream.igtl.server import IgtlServer
            from regseg.stream.igtl.sink import IgtlSink

            sinks.append(IgtlSink(IgtlServer(host, port, on_message=on_message,
                                             max_clients=args.max_clients),
                                  header_version=args.igtl_header_version,
                                  contour_devices=contours))
            urls.append(url)
        if plan.zmq:
            from regseg.stream.zmq_sink import ZmqSink

            sinks.append(ZmqSink(plan.zmq))
            urls.append(plan.zmq)
        if plan.web:
            from regseg.stream.web.sink import open_web_sink

            sinks.append(open_web_sink(*plan.web))
            urls.append(sinks[-1].server.url)
            print(f"regseg-stream: web view {urls[-1]}", file=sys.stderr, flush=True)
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks, urls


def _stats_of(thing) -> dict | None:
    stats = getattr(thing, "stats", None)
    return stats() if callable(stats) else None


def run(args, stop: threading.Event | None = None,
        running: threading.Event | None = None) -> dict:
    """Run the stream for parsed arguments; returns the summary dict.

    Every input is checked (:func:`check_args`) before anything loads; everything opened is
    closed again on any error. ``running`` is set while the stream loop runs (``stop`` then
    ends it cleanly).
    """
    plan = check_args(args)
    if plan.landmarks is not None:
        print(f"regseg-stream: {plan.landmarks.describe()}", file=sys.stderr, flush=True)
    import torch

    threads = args.threads or (1 if plan.device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    from regseg.stream.build import (
        build_deformable,
        build_engine,
        build_pipeline,
        build_segmenter,
    )
    from regseg.stream.capture import build_capture
    from regseg.stream.gate import FrameGate
    from regseg.stream.igtl.registration import RegistrationListener
    from regseg.stream.runner import run_stream
    from regseg.stream.slot import LatestSlot
    from regseg.stream.stats import write_json

    recorder = None
    sinks: list = []
    try:
        if args.record:
            from regseg.stream.recorder import Recorder, RecordingSlot

            recorder = Recorder(args.record, outputs=args.record_outputs)
            slot = RecordingSlot(recorder)
        else:
            slot = LatestSlot()
        context, source = _context_and_source(args, plan, slot)
        engine = build_engine(args.weights, backend=args.backend, device=plan.device,
                              precision=args.precision, threads=args.engine_threads or threads)
        # Slicer's MRIToReference, from the next frame on, from allowed hosts only (issue 9)
        registration = RegistrationListener(
            allowed_hosts=plan.registration_hosts,
            reference_to_mri=plan.reference_to_mri, pivot_mri=context.prostate_centre_mm(),
            max_jump_mm=args.registration_max_jump_mm,
            max_jump_deg=args.registration_max_jump_deg,
            allow_jump=args.allow_registration_jump)
        sinks, sink_urls = _sinks(args, plan, on_message=registration)
        if recorder is not None:
            sinks.append(recorder)
            sink_urls.append(f"record:{args.record}")
        deformable = None
        if args.deformable == "on":
            deformable = build_deformable(context, args.deformable_weights, backend=args.backend,
                                          precision=args.precision,
                                          threads=args.engine_threads or threads)
        capture = build_capture(args.refine_iterations, args.multi_start == "on",
                                args.temporal_filter, weights=args.weights,
                                backend=args.backend, device=plan.device,
                                precision=args.precision, threads=args.engine_threads or threads)
        segmenter = build_segmenter(args.segmenter, backend=args.backend, device=plan.device,
                                    threads=args.engine_threads or threads)
        pipeline = build_pipeline(context, engine, reference_to_mri=plan.reference_to_mri,
                                  cuda_graph=args.cuda_graph, deformable=deformable,
                                  capture=capture, segmenter=segmenter)
        registration.bind(pipeline.set_reference_to_mri)
        gate = FrameGate(plan.limits)
    except BaseException:
        for sink in sinks:
            sink.close()
        if recorder is not None and recorder not in sinks:
            recorder.close()
        raise
    if running is not None:
        running.set()
    try:
        stats, skipped = run_stream(source, pipeline, sinks, max_frames=args.max_frames,
                                    stop=stop, status_every_s=0 if args.quiet else 1.0,
                                    gate=gate, status_extra=registration.status_text)
    finally:
        if running is not None:
            running.clear()
    extra = {"engine": f"alignsegnet/{engine.backend}", "device": str(plan.device),
             "deformable": (f"{deformable.weights}/{deformable.engine.backend}"
                            if deformable is not None else "off"),
             "engine_info": engine.info,
             "segmenter": (f"{args.segmenter}/{segmenter.backend}" if segmenter is not None
                           else "unet"),
             "capture": {"refine_iterations": capture.refine_iterations,
                         "multi_start": args.multi_start, "temporal_filter": args.temporal_filter},
             # the flag threshold and the chain it was calibrated on (regseg.stream.quality)
             "quality_calibration": pipeline.quality.calibration_info,
             "deformable_engine_info": (deformable.engine.engine.info
                                        if deformable is not None else None),
             "source": plan.source_url,
             "sinks": sink_urls,
             "source_stats": source.stats(),
             "gate": gate.stats(),
             "sink_stats": {url: _stats_of(sink) for url, sink in zip(sink_urls, sinks,
                                                                      strict=True)},
             "registration_from_slicer": registration.stats()}
    if recorder is not None:
        extra["recorder"] = recorder.stats()
    summary = stats.summary(skipped=skipped, extra=extra)
    if args.stats_json:
        write_json(summary, args.stats_json)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``regseg-stream``: 0 done, 2 bad input (one paragraph, nothing written), 1 a failure at
    run time, 130 interrupted by Ctrl-C (during the stream: after its summary).

    Ctrl-C or SIGTERM while the stream runs ends it cleanly: sinks closed, summary printed and
    written. Before that (checks, loading, building engines) they end the process at once,
    quietly; a second Ctrl-C during the clean end does too.
    """

    def report(summary: dict) -> None:
        from regseg.stream.stats import format_summary

        print(format_summary(summary))

    def start(stop, running) -> dict:
        return run(build_parser().parse_args(argv), stop=stop, running=running)

    return run_live("regseg-stream", start, report)


if __name__ == "__main__":
    sys.exit(main())
