"""regseg-stream refuses bad input with exit status 2 and one paragraph, never a traceback, and
before any model loads or anything is written.

The table runs ``main(argv)`` in-process (each case well under a second of work); a few cases run
as real subprocesses to check the exit status and stderr the user sees, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from regseg.models.registry import WEIGHTS_DIR, default_weights_path
from regseg.stream.cli import main

STREAM = [sys.executable, "-m", "regseg.stream.cli"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the cases point at: a small valid case, matrices, checkpoints, a busy port."""
    root = tmp_path_factory.mktemp("inputs")
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(root / "labels.nii.gz"))
    nib.save(nib.Nifti1Image(labels.astype(np.float32), np.eye(4)), str(root / "mri.nii.gz"))
    singular = np.eye(4)
    singular[:3, :3] = 0
    np.savetxt(root / "singular.txt", singular)
    nan = np.eye(4)
    nan[1, 3] = np.nan
    np.savetxt(root / "nan.txt", nan)
    np.savetxt(root / "three.txt", np.eye(3))
    (root / "words.txt").write_text("four rows of four numbers\n")
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (root / "a_file").write_text("x")
    (root / "clip.avi").write_bytes(b"\0")  # exists; refused flags are checked before it opens
    np.savetxt(root / "mirror.txt", np.diag([-1.0, 1.0, 1.0, 1.0]))  # all used to be accepted
    np.savetxt(root / "metres.txt", np.diag([1000.0, 1000.0, 1000.0, 1.0]))
    plus = '<P><CoordinateDefinitions>{}</CoordinateDefinitions></P>'
    one = '<Transform From="Reference" To="MRI" Matrix="1 0 0 {} 0 1 0 0 0 0 1 0 0 0 0 1"/>'
    (root / "twice.xml").write_text(plus.format(one.format(0) + one.format(50)))
    (root / "encoding.xml").write_text('<?xml version="1.0" encoding="ebcdic-xx"?><P/>')
    (root / "empty.h5").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def busy_port():
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s.getsockname()[1]


def _case(files, busy_port, argv):
    def sub(a: str) -> str:
        return (a.replace("F/", f"{files}/").replace("BUSY", str(busy_port))
                .replace("PLCREG2D", str(WEIGHTS_DIR / "plcreg2d.pt"))
                .replace("PLCREG3D", str(WEIGHTS_DIR / "plcreg3d.pt"))
                .replace("ALIGNSEGNET", str(default_weights_path("alignsegnet"))))
    return [sub(a) for a in argv]


IGTL = ["--mri", "F/mri.nii.gz", "--mri-labels", "F/labels.nii.gz", "--source",
        "igtl://127.0.0.1:18944", "--serve", "none", "--device", "cpu"]
DEMO = ["--demo", "--serve", "none", "--zmq", "none", "--device", "cpu"]


def demo(serve: str = "none", zmq: str = "none", device: str | None = "cpu") -> list[str]:
    return ["--demo", "--serve", serve, "--zmq", zmq] + (["--device", device] if device else [])



# (kind, argv, fragments the one paragraph must hold: the bad value and what was expected)
CASES = [
    ("no source", ["--device", "cpu"], ["no --source given"]),
    ("unknown scheme", ["--source", "rtsp://x"], ["'rtsp://x'", "unknown scheme"]),
    ("port out of range", [*IGTL[:4], "--source", "igtl://127.0.0.1:70000"],
     ["igtl://127.0.0.1:70000", "PORT 1-65535"]),
    ("port zero", [*IGTL[:4], "--source", "igtl://127.0.0.1:0"], [":0'", "1-65535"]),
    ("no port", [*IGTL[:4], "--source", "igtl://127.0.0.1"], ["igtl://HOST:PORT"]),
    ("no host", [*IGTL[:4], "--source", "igtl://:18944"], ["'igtl://:18944'", "HOST:PORT"]),
    ("text after port", [*IGTL[:4], "--source", "igtl://h:1/x?y"], ["after the port"]),
    ("port not a number", [*IGTL[:4], "--source", "igtl://h:abc"], ["'igtl://h:abc'"]),
    ("bad sim seed", ["--source", "sim://abc"], ["sim://abc", "integer seed"]),
    ("mri with sim", ["--source", "sim://", "--mri", "F/mri.nii.gz"], ["simulated scanner"]),
    ("igtl without case", ["--source", "igtl://h:1"], ["needs the patient case"]),
    ("missing mri", [*IGTL[:1], "F/missing.nii.gz", *IGTL[2:]], ["missing.nii.gz", "not found"]),
    ("labels is a folder", [*IGTL[:3], "F/", *IGTL[4:]], ["--mri-labels", "not a file"]),
    ("file not a sequence", [*IGTL[:4], "--source", "file://notes.txt"],
     ["notes.txt", "not a sequence file name", ".igs.mha"]),
    ("missing sequence", [*IGTL[:4], "--source", "file://F/none.igs.mha"], ["none.igs.mha",
                                                                         "not found"]),
    ("grabber not a number", [*IGTL[:4], "--source", "grabber://cam"], ["grabber://N"]),
    ("not a video", [*IGTL[:4], "--source", "F/a_file"], ["a_file", "not a video file"]),
    ("pose source without grabber", [*IGTL, "--pose-source", "igtl://h:1"],
     ["--pose-source", "grabber"]),
    ("crop malformed", [*IGTL[:4], "--source", "F/clip.avi", "--grabber-crop", "1,2,3"],
     ["'1,2,3'", "X,Y,W,H"]),
    ("spacing one value", [*IGTL[:4], "--source", "F/clip.avi", "--grabber-spacing-mm", "0.2"],
     ["'0.2'", "ROW,COL"]),
    ("spacing zero", [*IGTL[:4], "--source", "F/clip.avi", "--grabber-spacing-mm", "0,0.2"],
     ["'0,0.2'", "between 0.01 and 5.0 mm"]),
    ("max-frames 0", [*DEMO, "--max-frames", "0"], ["--max-frames", "0; at least 1"]),
    ("max-frames -1", [*DEMO, "--max-frames", "-1"], ["--max-frames", "-1; at least 1"]),
    ("max-frames text", [*DEMO, "--max-frames", "ten"], ["'ten' is not an integer"]),
    ("threads 0", [*DEMO, "--threads", "0"], ["--threads", "0; at least 1"]),
    ("engine threads 0", [*DEMO, "--engine-threads", "0"], ["--engine-threads"]),
    ("fps negative", [*DEMO, "--fps", "-1"], ["--fps", "-1"]),
    ("fps nan", [*DEMO, "--fps", "nan"], ["--fps", "nan"]),
    ("seed negative", [*DEMO, "--seed", "-3"], ["--seed", "-3"]),
    ("max frame pixels tiny", [*DEMO, "--max-frame-pixels", "10"], ["--max-frame-pixels"]),
    ("refine iterations 0", [*DEMO, "--refine-iterations", "0"], ["--refine-iterations"]),
    ("max clients 0", [*DEMO, "--max-clients", "0"], ["--max-clients"]),
    ("jump 0 mm", [*DEMO, "--registration-max-jump-mm", "0"], ["--registration-max-jump-mm"]),
    ("second source", [*DEMO, "--source", "sim://1", "--source", "sim://2"],
     ["--source given twice", "'sim://1'", "'sim://2'"]),
    ("second mri", [*IGTL, "--mri", "F/mri.nii.gz"], ["--mri given twice"]),
    ("unknown flag", [*DEMO, "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    ("bad backend", [*DEMO, "--backend", "fast"], ["--backend", "'fast'"]),
    ("bad device", [*demo(device=None), "--device", "banana"], ["'banana'", "cpu or cuda"]),
    ("serve port in use", demo("igtl://127.0.0.1:BUSY"),
     ["127.0.0.1:BUSY", "already in use"]),
    ("serve port out of range", demo("igtl://127.0.0.1:99999"),
     ["99999", "1-65535"]),
    ("serve wrong scheme", demo("http://h:1"),
     ["'http://h:1'", "igtl://HOST:PORT"]),
    ("serve twice same port", [*demo("igtl://127.0.0.1:18999"), "--serve",
                               "igtl://127.0.0.1:18999"], ["port 18999 is also"]),
    ("zmq port in use", demo(zmq="tcp://127.0.0.1:BUSY"),
     ["--zmq", "already in use"]),
    ("zmq bad endpoint", demo(zmq="tcp://127.0.0.1:x"),
     ["'tcp://127.0.0.1:x'"]),
    ("zmq and serve same port", ["--demo", "--serve", "igtl://127.0.0.1:18998", "--zmq",
                                 "tcp://127.0.0.1:18998", "--device", "cpu"],
     ["port 18998 is also used by --serve"]),
    ("zmq allow without zmq", [*DEMO, "--zmq-allow", "127.0.0.1"],
     ["--zmq-allow 127.0.0.1", "no --zmq endpoint"]),
    ("zmq allow host unknown", [*demo(zmq="tcp://127.0.0.1:18996"), "--zmq-allow",
                                "no-such-host.invalid"],
     ["--zmq-allow", "'no-such-host.invalid' does not resolve"]),
    ("host not here", demo("igtl://192.0.2.1:18945"),
     ["192.0.2.1:18945", "not an address of this machine"]),
    ("stats json under a file", [*DEMO, "--stats-json", "F/a_file/stats.json"],
     ["--stats-json", "is a file, not a folder"]),
    ("stats json is a folder", [*DEMO, "--stats-json", "F/"], ["--stats-json", "is a folder"]),
    ("record not a sequence", [*DEMO, "--record", "F/out.mp4"], ["out.mp4", "not a sequence"]),
    ("record outputs alone", [*DEMO, "--record-outputs"], ["--record-outputs needs --record"]),
    ("record under a file", [*DEMO, "--record", "F/a_file/x.igs.mha"], ["is a file"]),
    ("reference missing", [*IGTL, "--reference-to-mri", "F/nope.txt"], ["nope.txt", "not found"]),
    ("reference singular", [*IGTL, "--reference-to-mri", "F/singular.txt"],
     ["singular.txt", "singular", "invertible 4x4 affine"]),
    ("reference nan", [*IGTL, "--reference-to-mri", "F/nan.txt"], ["nan.txt", "non-finite"]),
    ("reference 3x3", [*IGTL, "--reference-to-mri", "F/three.txt"], ["three.txt", "(3, 3)"]),
    ("reference words", [*IGTL, "--reference-to-mri", "F/words.txt"], ["words.txt",
                                                                       "4 rows of 4 numbers"]),
    ("reference mirrored", [*IGTL, "--reference-to-mri", "F/mirror.txt"],
     ["--reference-to-mri", "mirror.txt", "a reflection (determinant -1", "rotation"]),
    ("reference scaled x1000", [*IGTL, "--reference-to-mri", "F/metres.txt"],
     ["metres.txt", "scales 1e+03 to 1e+03", "near-rigid", "0.8 to 1.25"]),
    ("reference defined twice", [*IGTL, "--reference-to-mri", "F/twice.xml"],
     ["twice.xml", "From='Reference' To='MRI' is defined twice"]),
    ("reference unknown encoding", [*IGTL, "--reference-to-mri", "F/encoding.xml"],
     ["encoding.xml", "unknown encoding: ebcdic-xx"]),
    ("reference empty h5", [*IGTL, "--reference-to-mri", "F/empty.h5"],
     ["empty.h5", "not an HDF5 file"]),
    ("weights of the other model", [*DEMO, "--weights", "PLCREG2D"],
     ["plcreg2d.pt", "model plcreg 2-D", "--weights takes a checkpoint of model alignsegnet"]),
    ("weights missing", [*DEMO, "--weights", "F/none.pt"], ["--weights", "none.pt"]),
    ("weights garbage", [*DEMO, "--weights", "F/garbage.pt"], ["garbage.pt", "checkpoint"]),
    ("deformable weights of the other model", [*DEMO, "--deformable-weights", "ALIGNSEGNET"],
     ["alignsegnet.pt", "model alignsegnet;", "takes a checkpoint of model plcreg 2-D"]),
    ("deformable weights 3-D", [*DEMO, "--deformable-weights", "PLCREG3D"],
     ["model plcreg 3-D;", "model plcreg 2-D"]),
    ("registration host empty", [*DEMO, "--accept-registration-from", "127.0.0.1,,x"],
     ["--accept-registration-from", "empty host"]),
    ("cuda graph on cpu", [*DEMO, "--cuda-graph"],
     ["--cuda-graph", "need a CUDA device", "runs on cpu"]),
    ("overlap with a gland window", [*DEMO, "--overlap", "on", "--roi", "auto"],
     ["--overlap on with --roi auto", "use one of them"]),
    ("lc2 mode", [*DEMO, "--lc2", "maybe"], ["--lc2", "maybe", "on", "off"]),
    ("gland window for the segmentation without it", [*DEMO, "--resegment", "off",
                                                      "--seg-window", "auto"],
     ["--seg-window auto with --resegment off", "--resegment on or --seg-window off"]),
    ("intensity mode", [*DEMO, "--intensity", "maybe"], ["--intensity", "maybe", "match"]),
    ("mirror pass without the segmentation it repeats", [*DEMO, "--resegment", "off",
                                                         "--seg-tta", "flip"],
     ["--seg-tta flip with --resegment off", "--resegment on or --seg-tta off"]),
    ("jump measure", [*DEMO, "--jump-at", "corners"], ["--jump-at", "corners", "gland"]),
    ("prior without the segmentation it pools with", [*DEMO, "--resegment", "off",
                                                      "--seg-prior", "on"],
     ["--seg-prior on with --resegment off", "--resegment on or --seg-prior off"]),
    ("prior with a gland window", [*DEMO, "--seg-window", "auto", "--seg-prior", "on"],
     ["--seg-prior on with --seg-window auto", "--seg-window off or --seg-prior off"]),
    ("gated prior without the segmentation", [*DEMO, "--resegment", "off",
                                               "--seg-prior", "gated"],
     ["--seg-prior gated with --resegment off", "--resegment on or --seg-prior off"]),
    ("prior mode", [*DEMO, "--seg-prior", "maybe"], ["--seg-prior", "maybe", "gated"]),
    ("adapted segmentation without the segmentation",
     [*DEMO, "--resegment", "off", "--scanner-adapt", "segmentation"],
     ["--scanner-adapt segmentation with --resegment off", "--resegment on"]),
    ("adapt mode", [*DEMO, "--scanner-adapt", "maybe"], ["--scanner-adapt", "maybe"]),
]


@pytest.mark.parametrize(("kind", "argv", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_paragraph_exit_2_and_leaves_nothing(files, busy_port, capsys, kind,
                                                              argv, fragments, monkeypatch,
                                                              tmp_path):
    monkeypatch.chdir(tmp_path)  # relative outputs would land here
    before = sorted(files.rglob("*"))
    t0 = time.perf_counter()
    try:
        code = main(_case(files, busy_port, argv))
    except SystemExit as exc:  # what argparse refuses (types, choices, repeats) exits here
        code = exc.code
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("regseg-stream: error: "), err
    assert "Traceback" not in err and "\n\n" not in err.strip()
    for fragment in fragments:
        assert fragment.replace("BUSY", str(busy_port)) in err, (fragment, err)
    assert sorted(files.rglob("*")) == before and not list(tmp_path.iterdir())
    assert elapsed < 3.0, f"{kind}: {elapsed:.1f} s: validation must fail before any model loads"


def test_at_least_thirty_kinds():
    assert len(CASES) >= 30


def _run(*args, timeout=120):
    return subprocess.run([*STREAM, *args], capture_output=True, text=True, timeout=timeout)


def test_subprocess_port_out_of_range_and_busy_serve_fail_fast(files, busy_port):
    """Before: a ValueError traceback; and an OSError traceback after 10 s of model loading."""
    proc = _run("--mri", f"{files}/mri.nii.gz", "--mri-labels", f"{files}/labels.nii.gz",
                "--source", "igtl://127.0.0.1:70000")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("regseg-stream: error: --source 'igtl://127.0.0.1:70000'")
    assert proc.stderr.count("\n") == 1
    t0 = time.monotonic()
    proc = _run("--demo", "--serve", f"igtl://127.0.0.1:{busy_port}", "--zmq", "none",
                "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already in use" in proc.stderr
    assert time.monotonic() - t0 < 20  # the process start and imports only: no model built


def test_subprocess_argparse_error_is_one_line():
    proc = _run("--demo", "--max-frames", "-1")
    assert proc.returncode == 2
    assert proc.stderr == ("regseg-stream: error: argument --max-frames: -1; at least 1 expected "
                           "(see regseg-stream --help)\n")


def test_ctrl_c_during_start_up_exits_130_quietly(tmp_path):
    """Ctrl-C while the demo builds its phantom and engines: exit 130, one line, no traceback,
    and the --stats-json file is not half-written (not written at all)."""
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen([*STREAM, "--demo", "--serve", "none", "--zmq", "none", "--device",
                             "cpu", "--stats-json", str(stats)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    # Wait for the first engine's choice (printed while the others still build): start-up is
    # under way and main() has its handler. A fixed sleep raced the interpreter's own start on a
    # loaded machine.
    before = []
    while not (before and before[-1].startswith("engine auto")):
        line = proc.stderr.readline()
        assert line, f"regseg-stream ended before building an engine: {before}"
        before.append(line)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "regseg-stream: interrupted"
    assert not stats.exists()


@pytest.mark.slow
def test_sigterm_ends_the_stream_with_its_summary(tmp_path):
    """SIGTERM once frames flow (the status line shows them): summary printed and written."""
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen([*STREAM, "--demo", "--serve", "none", "--zmq", "none", "--device",
                             "cpu", "--stats-json", str(stats), "--deformable", "off",
                             "--fps", "5"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None \
            and not any(line.startswith("frames ") for line in lines):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    proc.wait(timeout=60)
    reader.join(timeout=5)
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and out.startswith("frames ")
    assert stats.exists() and '"frames"' in stats.read_text()
