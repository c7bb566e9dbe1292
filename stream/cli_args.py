"""``regseg-stream``'s argument checks: every input validated before any work starts.

:func:`check_args` turns parsed arguments into a plan (URLs split, files and outputs checked, ports
tried, checkpoints of the right model, the initial registration a sane affine) or raises the first
:class:`~regseg.errors.InputError`. Heavy modules are imported inside functions, so that a bad flag
is reported without importing torch where it can be.
"""

from __future__ import annotations

import argparse

from regseg.cli_checks import (
    check_checkpoint,
    check_port_free,
    check_readable_file,
    check_writable,
    check_zmq_endpoint,
    host_port,
)
from regseg.errors import InputError


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name!r}: not a device; use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _reference_to_mri(path: str | None):
    """The --reference-to-mri matrix, (4, 4) float64: our 4x4 text, ITK .tfm/.h5 (Slicer's
    convention) or PLUS .xml (regseg.calibration.live), checked by regseg.geometry.check_affine."""
    if path is None:
        return None
    from regseg.calibration.live import read_reference_to_mri

    check_readable_file(path, "--reference-to-mri")
    return read_reference_to_mri(path)


def _calibration(args, plan) -> None:
    """--probe-calibration, --time-offset-ms, --landmarks-mri/--landmarks-reference (issue 10)."""
    from regseg.calibration import live

    plan.image_to_probe = None
    plan.time_offset_s = (getattr(args, "time_offset_ms", None) or 0.0) / 1e3
    if getattr(args, "probe_calibration", None):
        if plan.kind != "igtl":
            raise InputError(f"--probe-calibration {args.probe_calibration}: only with an "
                             "igtl:// source (the probe's ProbeToTracker/ProbeToReference "
                             "TRANSFORMs come over OpenIGTLink)")
        check_readable_file(args.probe_calibration, "--probe-calibration")
        plan.image_to_probe = live.read_image_to_probe(args.probe_calibration)
    if plan.time_offset_s and plan.kind != "igtl":
        raise InputError(f"--time-offset-ms {args.time_offset_ms}: only with an igtl:// source "
                         "(it shifts image timestamps when pairing them with TRANSFORMs)")
    mri, ref = getattr(args, "landmarks_mri", None), getattr(args, "landmarks_reference", None)
    plan.landmarks = None
    if bool(mri) != bool(ref):
        raise InputError("--landmarks-mri and --landmarks-reference go together: the same "
                         "landmarks in the MRI and in the tracker's Reference frame")
    if mri:
        if args.reference_to_mri:
            raise InputError("--reference-to-mri and --landmarks-mri/--landmarks-reference both "
                             "set ReferenceToMRI; give one of them")
        check_readable_file(mri, "--landmarks-mri")
        check_readable_file(ref, "--landmarks-reference")
        plan.landmarks = live.register_landmarks(mri, ref)
        plan.reference_to_mri = plan.landmarks.reference_to_mri


def _sim_seed(source: str, default: int) -> int:
    rest = source[len("sim://"):]
    if not rest:
        return default
    if not rest.isdigit():
        raise InputError(f"--source {source!r}: expected sim:// or sim://SEED with an integer seed")
    return int(rest)


def _spacing(text: str) -> tuple[float, float]:
    from regseg.geometry import SPACING_RANGE_MM

    lo, hi = SPACING_RANGE_MM
    try:
        row, col = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--grabber-spacing-mm {text!r}: ROW,COL in mm expected, e.g. 0.2,0.2"
                         ) from None
    if not (lo <= row <= hi and lo <= col <= hi):
        raise InputError(f"--grabber-spacing-mm {text!r}: each between {lo} and {hi} mm expected")
    return row, col


def _source_kind(url: str) -> str:
    for scheme in ("sim", "igtl", "file", "grabber"):
        if url.startswith(f"{scheme}://"):
            return scheme
    if "://" in url:
        raise InputError(f"--source {url!r}: unknown scheme; expected igtl://HOST:PORT, "
                         "sim://[SEED], file://PATH.igs.mha, grabber://N or a video file")
    return "video"


def check_args(args) -> argparse.Namespace:
    """Validate every input of ``regseg-stream`` before any work starts; the resolved plan.

    Nothing is loaded, built, bound or written here: files are checked readable, outputs
    writable (a temporary file, removed), ports free (bound and released), URLs well formed,
    checkpoints of the right model, the initial registration a sane affine. Flag values that
    argparse can check (numbers, choices, repeated flags) were checked while parsing.

    Raises:
        InputError: the first bad input, naming the flag, the value and what is expected.
    """
    from regseg.engines.registration import SHIPPED
    from regseg.geometry import FrameLimits
    from regseg.models.registry import WEIGHTS_DIR
    from regseg.sequence_file import SEQUENCE_EXTENSIONS
    from regseg.stream.grabber_source import parse_crop
    from regseg.stream.igtl.registration import parse_hosts

    plan = argparse.Namespace()
    if getattr(args, "seg_window", "off") != "off" and getattr(args, "resegment", "on") == "off":
        raise InputError(f"--seg-window {args.seg_window} with --resegment off: the window is cut "
                         "around the gland where the published registration puts it, for the "
                         "segmentation --resegment makes there; use --resegment on or "
                         "--seg-window off")
    if getattr(args, "seg_tta", "off") != "off" and getattr(args, "resegment", "on") == "off":
        raise InputError(f"--seg-tta {args.seg_tta} with --resegment off: the mirror pass is a "
                         "second run of the segmentation --resegment makes at the published "
                         "plane; use --resegment on or --seg-tta off")
    if (getattr(args, "scanner_adapt", "off") == "segmentation"
            and getattr(args, "resegment", "on") == "off"):
        raise InputError("--scanner-adapt segmentation with --resegment off: the adapted network "
                         "runs the segmentation --resegment makes at the published plane; use "
                         "--resegment on, or --scanner-adapt on for the whole network")
    explicit_prior = getattr(args, "seg_prior", "off") not in ("off", "default")
    if explicit_prior and getattr(args, "resegment", "on") == "off":
        raise InputError(f"--seg-prior {args.seg_prior} with --resegment off: the prior is "
                         "pooled with the segmentation --resegment makes at the published plane; "
                         "use --resegment on or --seg-prior off")
    if explicit_prior and getattr(args, "seg_window", "off") != "off":
        raise InputError(f"--seg-prior {args.seg_prior} with --seg-window {args.seg_window}: the "
                         "prior is pooled on the whole frame; use --seg-window off or --seg-prior "
                         "off")
    if getattr(args, "seg_fallback", "off") != "off" and getattr(args, "estimate_check",
                                                                 "inform") == "off":
        raise InputError(f"--seg-fallback {args.seg_fallback} with --estimate-check off: the "
                         "check's verdict decides when the MRI labels are published; use "
                         "--estimate-check inform (or on) or --seg-fallback off")
    if getattr(args, "lc2_rescue", "off") == "on" and getattr(args, "lc2", "off") in ("warm",
                                                                                    "fast"):
        raise InputError(f"--lc2-rescue on with --lc2 {args.lc2}: a warm search starts from the "
                         "previous frame's move and has no rescue; use --lc2 on or async, or "
                         "--lc2-rescue off")
    if getattr(args, "overlap", "off") == "on" and getattr(args, "roi", "off") == "auto":
        raise InputError("--overlap on with --roi auto: not supported (a frame's window depends "
                         "on the previous frame's flags, which overlap has not computed yet); "
                         "use one of them")
    url = args.source or ("sim://" if args.demo else None)
    if url is None:
        raise InputError("no --source given: use --source igtl://HOST:PORT for a scanner or PLUS "
                         "server, or --demo for the simulated scanner")
    plan.source_url, plan.kind = url, _source_kind(url)
    if plan.kind == "sim":
        if args.mri or args.mri_labels:
            raise InputError("--mri/--mri-labels cannot be used with the simulated scanner: it "
                             "images its own phantom case (write it with `regseg phantom`)")
        plan.seed = _sim_seed(url, args.seed)
    else:
        if not (args.mri and args.mri_labels):
            raise InputError(f"--source {url}: needs the patient case: --mri case.nii.gz "
                             "--mri-labels case_labels.nii.gz")
    if plan.kind == "igtl":
        plan.source_host, plan.source_port = host_port(url, "igtl", "--source")
    elif plan.kind == "file":
        path = url[len("file://"):]
        if not path.lower().endswith(SEQUENCE_EXTENSIONS):
            raise InputError(f"--source {url}: not a sequence file name; expected a PLUS "
                             f"sequence file ({', '.join(SEQUENCE_EXTENSIONS[:6])})")
    elif plan.kind == "grabber":
        if not url[len("grabber://"):].isdigit():
            raise InputError(f"--source {url!r}: expected grabber://N with a device number N")
    elif plan.kind == "video" and not url.lower().endswith(_video_extensions()):
        raise InputError(f"--source {url!r}: not a URL and not a video file ("
                         f"{', '.join(_video_extensions())}); expected igtl://HOST:PORT, sim://, "
                         "file://PATH.igs.mha or grabber://N")
    grabbing = plan.kind in ("grabber", "video")
    for flag, value in (("--pose-source", args.pose_source), ("--grabber-crop", args.grabber_crop)):
        if value is not None and not grabbing:
            raise InputError(f"{flag} {value}: only for grabber://N or a video --source")
    plan.pose_source = host_port(args.pose_source, "igtl", "--pose-source") \
        if args.pose_source else None
    plan.crop = parse_crop(args.grabber_crop) if args.grabber_crop else None
    plan.spacing_mm = _spacing(args.grabber_spacing_mm)
    plan.reference_to_mri = _reference_to_mri(args.reference_to_mri)
    _calibration(args, plan)
    plan.registration_hosts = parse_hosts(args.accept_registration_from)
    if args.record_outputs and not args.record:
        raise InputError("--record-outputs needs --record PATH.igs.mha")
    if args.record:
        if not args.record.lower().endswith(SEQUENCE_EXTENSIONS):
            raise InputError(f"--record {args.record}: not a sequence file name; expected one of "
                             f"{', '.join(SEQUENCE_EXTENSIONS[:6])}")
        check_writable(args.record, "--record")
    if args.stats_json:
        check_writable(args.stats_json, "--stats-json")
    plan.device = _device(args.device)
    if args.cuda_graph and plan.device.type != "cuda":
        raise InputError(f"--cuda-graph: CUDA graphs need a CUDA device, and --device "
                         f"{args.device} runs on {plan.device.type} here; drop --cuda-graph or "
                         "use --device cuda on a machine with a GPU")
    if args.weights is not None:
        check_checkpoint(args.weights, "--weights", "alignsegnet",
                         shipped={"alignsegnet": WEIGHTS_DIR / "alignsegnet.pt"})
    if args.deformable != "off":
        check_checkpoint(args.deformable_weights, "--deformable-weights", "plcreg", ndim=2,
                         shipped={name: WEIGHTS_DIR / f"{name}.pt" for name in SHIPPED})
    if getattr(args, "segmenter", "unet") != "unet":
        check_checkpoint(args.segmenter, "--segmenter", "ascseg",
                         shipped={"ascseg": WEIGHTS_DIR / "ascseg.pt",
                                  "ascseg-trus": WEIGHTS_DIR / "ascseg_trus.pt"})
    plan.serve = []
    serve = args.serve if args.serve is not None else (["igtl://127.0.0.1:18945"] if args.demo
                                                       else [])
    bound: dict[tuple[str, int], str] = {}
    for value in serve:
        if value == "none":
            continue
        host, port = host_port(value, "igtl", "--serve")
        _claim(bound, host, port, f"--serve {value}")
        check_port_free(host, port, f"--serve {value}")
        plan.serve.append((value, host, port))
    zmq = args.zmq if args.zmq is not None else ("tcp://127.0.0.1:5556" if args.demo else None)
    plan.zmq = zmq if zmq and zmq != "none" else None
    if plan.zmq:
        if plan.zmq.startswith("tcp://"):
            _claim(bound, *host_port(plan.zmq, "tcp", "--zmq"), f"--zmq {plan.zmq}")
        check_zmq_endpoint(plan.zmq)
    plan.zmq_allow = parse_hosts(args.zmq_allow, "--zmq-allow") if args.zmq_allow else None
    if plan.zmq_allow and not plan.zmq:
        raise InputError(f"--zmq-allow {args.zmq_allow}: there is no --zmq endpoint to guard")
    plan.web = None
    if getattr(args, "web", None) and args.web != "none":
        from regseg.stream.serve.config import address

        plan.web = address(args.web, "--web")
        if plan.web[1]:
            _claim(bound, *plan.web, f"--web {args.web}")
            check_port_free(*plan.web, f"--web {args.web}")
    plan.limits = FrameLimits(max_pixels=args.max_frame_pixels)
    # Files last, so every flag is checked even when a path is wrong; their content is read
    # (and checked) when the source opens and the case loads.
    if plan.kind in ("file", "video"):
        check_readable_file(url[len("file://"):] if plan.kind == "file" else url, "--source")
    if plan.kind != "sim":
        check_readable_file(args.mri, "--mri")
        check_readable_file(args.mri_labels, "--mri-labels")
    return plan


def _video_extensions() -> tuple[str, ...]:
    from regseg.stream.grabber_source import VIDEO_EXTENSIONS as extensions

    return extensions


def _claim(bound: dict, host: str, port: int, flag: str) -> None:
    if port in {p for _, p in bound}:
        other = next(v for (_, p), v in bound.items() if p == port)
        raise InputError(f"{flag}: port {port} is also used by {other}; one port per server")
    bound[(host, port)] = flag
