"""``regseg-stream``: the live MRI-TRUS fusion loop from the command line."""

from __future__ import annotations

import sys
import threading

# Only the standard library and regseg's light modules at import time: Ctrl-C must find main()'s
# handler installed as early as possible, so numpy, torch and the rest are imported in functions.
from regseg.stream.cli_args import check_args
from regseg.stream.cli_parser import DEFORMABLE_DEFAULT, EPILOG, build_parser  # noqa: F401
from regseg.stream.entry import run_live


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


def _loopback_endpoint(endpoint: str) -> bool:
    """tcp://127.x or tcp://[::1] or tcp://localhost (and ipc://, inproc://): this computer only."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


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

            sinks.append(ZmqSink(plan.zmq, allow=plan.zmq_allow))
            if plan.zmq_allow is None and not _loopback_endpoint(plan.zmq):
                print(f"regseg-stream: warning: --zmq {plan.zmq} is reachable beyond this "
                      "computer and any peer may subscribe (a subscriber can grow this "
                      "process's memory); name the subscribers with --zmq-allow HOST[,HOST]",
                      file=sys.stderr, flush=True)
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
        deformable = build_deformable(context, args.deformable_weights, backend=args.backend,
                                      precision=args.precision,
                                      threads=args.engine_threads or threads,
                                      mode=args.deformable)
        capture = build_capture(args.refine_iterations, args.multi_start == "on",
                                args.temporal_filter, weights=args.weights,
                                backend=args.backend, device=plan.device,
                                precision=args.precision, threads=args.engine_threads or threads)
        segmenter = build_segmenter(args.segmenter, backend=args.backend, device=plan.device,
                                    threads=args.engine_threads or threads)
        pipeline = build_pipeline(context, engine, reference_to_mri=plan.reference_to_mri,
                                  cuda_graph=args.cuda_graph, deformable=deformable,
                                  capture=capture, segmenter=segmenter,
                                  do_no_harm=args.do_no_harm,
                                  do_no_harm_margin_mm=args.do_no_harm_margin_mm,
                                  roi=args.roi, overlap=args.overlap == "on", lc2=args.lc2,
                                  resegment=args.resegment, consensus=args.consensus,
                                  intensity=args.intensity, seg_window=args.seg_window,
                                  jump_at=args.jump_at, seg_tta=args.seg_tta,
                                  seg_prior=args.seg_prior, scanner_adapt=args.scanner_adapt,
                                  estimate_check=args.estimate_check,
                                  stage_threads=args.stage_threads,
                                  seg_fallback=args.seg_fallback, lc2_hold=args.lc2_hold,
                                  lc2_rescue=args.lc2_rescue)
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
                            + ("" if args.deformable == "on" else f" ({args.deformable})")
                            if deformable is not None else "off"),
             "engine_info": engine.info,
             "segmenter": (f"{args.segmenter}/{segmenter.backend}" if segmenter is not None
                           else "unet"),
             "capture": {"refine_iterations": capture.refine_iterations,
                         "multi_start": args.multi_start, "temporal_filter": args.temporal_filter},
             # the flag threshold and the chain it was calibrated on (regseg.stream.quality)
             "quality_calibration": pipeline.quality.calibration_info,
             # regseg.stream.do_no_harm: margin, window, how often each alignment went out
             "do_no_harm": (pipeline.do_no_harm.info() if pipeline.do_no_harm is not None
                            else "off"),
             "roi": args.roi,
             "lc2": args.lc2,
             "lc2_hold": args.lc2_hold,
             "lc2_rescue": args.lc2_rescue,
             "resegment": args.resegment,
             "consensus": args.consensus,
             "intensity": args.intensity,
             "seg_window": args.seg_window,
             "seg_tta": args.seg_tta,
             "seg_prior": pipeline.seg_prior or "off",  # as resolved ("default": README)
             # --scanner-adapt: whether and from which frame the adapted network ran
             "scanner_adapt": (pipeline.scanner_adapt.info()
                               if pipeline.scanner_adapt is not None else "off"),
             # --estimate-check: the error estimate's own check on this stream's frames
             "estimate_check": (pipeline.quality.self_check.info()
                                if pipeline.quality.self_check is not None else "off"),
             # the 3-D consensus at the end: its fitted shift is what SuggestedMRIToRef proposed
             "consensus_estimate": (pipeline.consensus.info() if pipeline.consensus is not None
                                    else None),
             "overlap": args.overlap,
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
