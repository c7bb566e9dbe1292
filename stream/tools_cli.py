"""``regseg-igt``: IGT-side tools — a PLUS stand-in server, recovery of unfinished recordings.

``regseg-igt sim-server`` runs the simulated TRUS scanner behind an OpenIGTLink server that sends
what a PLUS server sends (IMAGE ``Image_Reference`` with the embedded pose, TRANSFORM
``ImageToReference``), so regseg-stream and 3D Slicer can be tried without a scanner.
``regseg-igt recover`` completes a recording that a crash or kill left unfinished.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
import threading

from regseg.cli_checks import TOP_LEVEL_ERRORS, exit_code
from regseg.errors import InputError

EPILOG = """examples:
  regseg-igt sim-server --port 18944 --write-case out/case
  regseg-stream --mri out/case/case.nii.gz --mri-labels out/case/case_labels.nii.gz \\
      --source igtl://127.0.0.1:18944
  regseg-igt recover out/session.igs.mha
"""


class UntrackedEvery:
    """A scanner whose every ``every``-th frame has lost tracking (``image_to_reference`` None)."""

    def __init__(self, scanner, every: int) -> None:
        self.scanner, self.every, self.config = scanner, every, scanner.config

    def frame(self, index: int):
        frame = self.scanner.frame(index)
        if self.every and index % self.every == self.every - 1:
            return dataclasses.replace(frame, image_to_reference=None)
        return frame


def _positive(kind, name: str, low: float, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: {name} {bound} expected")
        return value
    return parse


def _sim_server(args) -> int:
    from regseg.sim.phantom import make_phantom, write_phantom
    from regseg.sim.scanner import ScannerConfig, SimulatedScanner
    from regseg.stream.igtl.sim_server import SimIgtlServer

    phantom = make_phantom(args.seed)
    config = ScannerConfig(fps=args.fps, tracking_shift_mm=args.tracking_shift_mm,
                           tracking_rot_deg=args.tracking_rot_deg)
    scanner = SimulatedScanner(phantom, config, seed=args.seed)
    if args.write_case:
        image, labels = write_phantom(phantom, args.write_case)
        print(f"wrote the patient case: --mri {image} --mri-labels {labels}")
    scanner = UntrackedEvery(scanner, args.invalid_every) if args.invalid_every else scanner
    try:
        server = SimIgtlServer(scanner, args.host, args.port, fps=args.fps,
                               max_frames=args.frames, header_version=args.header_version,
                               untracked_as_invalid=True)
    except OSError as exc:
        raise InputError(f"--host {args.host} --port {args.port}: cannot listen there ({exc}); "
                         "choose a free port (or 0 for any)") from exc
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving the simulated scanner (phantom seed {args.seed}) as PLUS would on "
          f"igtl://{server.host}:{server.port}: IMAGE Image_Reference + TRANSFORM "
          f"ImageToReference at {args.fps:g} fps; Ctrl-C stops", flush=True)
    with server:
        while not stop.is_set() and not server.done.is_set():
            stop.wait(0.2)
    print(f"sent {server.frames_sent} frames")
    return 0


def _recover(args) -> int:
    from regseg.sequence_writer import recover_recording

    path, count = recover_recording(args.path, out=args.out)
    print(f"recovered {count} frames into {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regseg-igt", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="IGT-side tools: a PLUS stand-in OpenIGTLink server, "
                                "recovery of unfinished recordings")
    sub = p.add_subparsers(dest="task", required=True)
    sv = sub.add_parser("sim-server", help="the simulated scanner as a PLUS-like OpenIGTLink "
                        "server, to try regseg-stream and Slicer without a scanner")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=_positive(int, "port", 0, 65535), default=18944,
                    help="port (default 18944, PLUS's; 0 = any free port)")
    sv.add_argument("--seed", type=_positive(int, "seed", 0), default=0,
                    help="phantom and session seed (default 0)")
    sv.add_argument("--fps", type=_positive(float, "fps", 0.1, 1000), default=30.0,
                    help="frames per second (default 30)")
    sv.add_argument("--frames", type=_positive(int, "frames", 1), default=None,
                    help="stop after this many frames (default: until Ctrl-C)")
    sv.add_argument("--tracking-shift-mm", type=_positive(float, "tracking shift", 0, 50),
                    default=4.0, help="bound on the tracking error's in-plane shift, mm "
                    "(default 4)")
    sv.add_argument("--tracking-rot-deg", type=_positive(float, "tracking rotation", 0, 45),
                    default=6.0, help="bound on the tracking error's in-plane rotation, degrees "
                    "(default 6)")
    sv.add_argument("--invalid-every", type=_positive(int, "invalid every", 0), default=0,
                    help="every N-th frame's pose is sent INVALID, as PLUS does when the tracker "
                    "loses the probe (default 0: never)")
    sv.add_argument("--write-case", default=None, metavar="DIR",
                    help="write the phantom's MRI and labels here (case.nii.gz, "
                    "case_labels.nii.gz) for regseg-stream --mri/--mri-labels")
    sv.add_argument("--header-version", type=int, choices=[1, 2], default=2,
                    help="OpenIGTLink header version sent (default 2, with PLUS metadata)")
    sv.set_defaults(func=_sim_server)
    rc = sub.add_parser("recover", help="complete a recording that did not close (crash, kill)")
    rc.add_argument("path", help="the sequence file the recording was going to, e.g. "
                    "session.igs.mha (.session.igs.mha.journal lies beside it)")
    rc.add_argument("--out", default=None, help="write the completed file here (default: PATH)")
    rc.set_defaults(func=_recover)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TOP_LEVEL_ERRORS as exc:
        return exit_code(f"regseg-igt {args.task}", exc)


if __name__ == "__main__":
    sys.exit(main())
