"""regseg-igt sim-server: a PLUS stand-in whose tracked and INVALID frames a client receives."""

import re
import signal
import subprocess
import sys

import pytest

from regseg.stream.igtl.source import IgtlSource
from regseg.stream.slot import LatestSlot
from regseg.stream.tools_cli import main

WAIT_S = 60.0


def test_sim_server_sends_plus_frames_marks_invalid_poses_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "regseg.stream.tools_cli", "sim-server", "--port", "0",
         "--fps", "20", "--invalid-every", "3", "--write-case", str(tmp_path / "case")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wrote = proc.stdout.readline()
        assert "--mri" in wrote and (tmp_path / "case" / "case.nii.gz").exists()
        serving = proc.stdout.readline()
        port = int(re.search(r"igtl://127\.0\.0\.1:(\d+)", serving).group(1))
        slot: LatestSlot = LatestSlot()
        seen = []
        source = IgtlSource("127.0.0.1", port, slot)
        source.start()
        try:
            while len(seen) < 7:
                frame = slot.get(timeout=WAIT_S)
                assert frame is not None, f"no frame from the sim server (got {len(seen)})"
                seen.append(frame)
        finally:
            source.stop()
        indices = [f.seq for f in seen]
        tracked = [f.image_to_reference is not None for f in seen]
        # the server's own frame index is what it marks: every third (2, 5, 8 ...) is INVALID
        assert any(tracked) and not all(tracked)
        assert source.stats()["pairing"]["paired"] >= 1, source.stats()
        assert len(set(indices)) == len(indices)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, err
        assert re.search(r"sent \d+ frames", out) and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("argv, match", [
    (["sim-server", "--port", "70000"], "port 0..65535"),
    (["sim-server", "--fps", "0"], "fps"),
    (["sim-server", "--invalid-every", "-1"], "invalid every"),
    (["sim-server", "--tracking-shift-mm", "nan"], "tracking shift"),
])
def test_sim_server_refuses_bad_values_with_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
