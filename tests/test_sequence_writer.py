"""Crash-safe recording: what a killed process leaves on disk is completed by recover_recording."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from regseg.errors import InputError
from regseg.sequence_file import read_sequence
from regseg.sequence_writer import (
    SequenceWriter,
    has_partial,
    header_text,
    partial_paths,
    recover_recording,
)
from regseg.stream.recorder import Recorder, recovered_path

EXTENSIONS = [".igs.mha", ".igs.nrrd"]


def frames(n: int, shape=(7, 11)) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def fields(i: int) -> dict[str, str]:
    return {"FrameNumber": str(i), "Timestamp": repr(1_700_000_000 + i / 7)}


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("compress", [True, False])
def test_an_abandoned_writer_is_recovered_frame_for_frame(tmp_path, ext, compress):
    path = tmp_path / f"s{ext}"
    writer = SequenceWriter(path, compress=compress, fields={"UltrasoundImageOrientation": "MF"},
                            spacing_mm=(0.2, 0.3))
    written = frames(5)
    for i, pixels in enumerate(written):
        writer.add(pixels, fields(i))
    # the process "dies" here: no close(); what is on disk must be enough
    assert has_partial(path) and not path.exists()
    out, count = recover_recording(path)
    assert (out, count) == (path, 5)
    back = read_sequence(path)
    assert [f.fields for f in back.frames] == [fields(i) for i in range(5)]
    for f, pixels in zip(back.frames, written, strict=True):
        np.testing.assert_array_equal(f.pixels, pixels)
    assert back.fields["UltrasoundImageOrientation"] == "MF"
    assert back.element_spacing_mm == (0.2, 0.3)
    assert not has_partial(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing left behind


def test_a_torn_journal_line_and_cut_pixels_cost_only_the_last_frame(tmp_path):
    path = tmp_path / "s.igs.mha"
    writer = SequenceWriter(path)
    written = frames(4)
    for i, pixels in enumerate(written):
        writer.add(pixels, fields(i))
    writer._journal.flush()
    pixels_path, journal_path = partial_paths(path)
    text = journal_path.read_text()
    journal_path.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + '{"fields": {"Fr')
    with open(pixels_path, "r+b") as f:  # the last frame's pixels only partly written
        f.truncate(os.path.getsize(pixels_path) - 3)
    _, count = recover_recording(path)
    assert count == 3
    back = read_sequence(path)
    for f, pixels in zip(back.frames, written[:3], strict=True):
        np.testing.assert_array_equal(f.pixels, pixels)


def test_closing_replaces_the_file_and_leaves_no_partial_files(tmp_path):
    path = tmp_path / "s.igs.nrrd"
    writer = SequenceWriter(path)
    for i, pixels in enumerate(frames(3)):
        writer.add(pixels, fields(i))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert len(read_sequence(path).frames) == 3


def test_a_second_writer_on_an_unfinished_recording_is_refused(tmp_path):
    path = tmp_path / "s.igs.mha"
    SequenceWriter(path).add(frames(1)[0], fields(0))
    with pytest.raises(InputError, match="unfinished recording.*regseg-igt recover"):
        SequenceWriter(path)
    with pytest.raises(InputError, match="no unfinished recording"):
        recover_recording(tmp_path / "other.igs.mha")


def test_a_killed_recording_process_is_completed_by_the_next_recorder(tmp_path):
    """SIGKILL mid-session (no handler can run): the next Recorder on the same name completes
    the dead session's file beside it before recording anew."""
    path = tmp_path / "session.igs.mha"
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from regseg.stream.recorder import Recorder
        from regseg.types import Frame
        recorder = Recorder({str(path)!r})
        for seq in range(6):
            recorder.add_frame(Frame(seq=seq, acquired_ns=seq, spacing_mm=(0.5, 0.5),
                                     pixels=np.full((8, 10), seq, np.uint8),
                                     image_to_reference=None, source_ts=float(seq)))
        while recorder.frames < 6:
            pass
        print("recorded", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "recorded"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert has_partial(path)
    recorder = Recorder(path)  # a new session on the same name
    recorder.close()
    recovered = tmp_path / "session_recovered1.igs.mha"
    assert recovered.exists()
    back = read_sequence(recovered)
    assert [int(f.pixels[0, 0]) for f in back.frames] == list(range(6))
    assert len(read_sequence(path).frames) == 0  # the new, empty session
    assert not has_partial(path)
    assert recovered_path(path).name == "session_recovered2.igs.mha"  # never overwritten


def test_regseg_recover_completes_the_file_and_refuses_what_is_not_there(tmp_path, capsys):
    from regseg.stream.tools_cli import main

    path = tmp_path / "s.igs.mha"
    writer = SequenceWriter(path)
    for i, pixels in enumerate(frames(2)):
        writer.add(pixels, fields(i))
    assert main(["recover", str(path)]) == 0
    assert "recovered 2 frames" in capsys.readouterr().out
    assert len(read_sequence(path).frames) == 2
    assert main(["recover", str(path)]) == 2
    assert "no unfinished recording" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [
    ("Image_Reference", "Image_Reference"),
    ("Img\n\nZZZZ", "Img\\n\\nZZZZ"),
    ("ImageΩ", "Image\\u03a9"),
    ("\x1b[1;31mX\r", "\\x1b[1;31mX\\r"),
    ("µm", "\\xb5m"),
])
def test_header_text_is_printable_ascii(text, expected):
    assert header_text(text) == expected
    assert expected.isascii() and expected.isprintable()


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize(("bad", "match"), [
    ({"FriendlyDeviceName": "Img\n\nZZZZ"}, r"frame 1: field FriendlyDeviceName = .* holds '\\n'"),
    ({"FriendlyDeviceName": "ImageΩ"}, "holds 'Ω', which a header line cannot hold"),
    ({"Note": "a\rb"}, r"holds '\\r'"),
    ({"Bad=Name": "1"}, "field name 'Bad=Name'; printable ASCII without '=' or ':'"),
    ({"Bad\nName": "1"}, r"field name 'Bad\\nName'"),
])
def test_a_field_the_header_cannot_hold_is_refused_when_added(tmp_path, ext, bad, match):
    """Checked at add: the bad frame is refused, the frames before it still make a valid file
    (the red team's Omega used to fail at close, leaving an empty file)."""
    path = tmp_path / f"s{ext}"
    writer = SequenceWriter(path)
    written = frames(2)
    writer.add(written[0], fields(0))
    with pytest.raises(InputError, match=match):
        writer.add(written[1], bad)
    writer.add(written[1], {**fields(1), "FriendlyDeviceName": "Latin-1 µ is fine"})
    writer.close()
    back = read_sequence(path)
    assert len(back.frames) == 2
    assert back.frames[1].fields["FriendlyDeviceName"] == "Latin-1 µ is fine"
    with pytest.raises(InputError, match="file header: field UltrasoundImageOrientation"):
        SequenceWriter(tmp_path / f"t{ext}", fields={"UltrasoundImageOrientation": "MF\n"})


def test_a_journal_holding_raw_peer_text_is_recovered_escaped(tmp_path):
    """Journals of earlier versions hold the scanner's device name raw: recovery escapes it."""
    path = tmp_path / "s.igs.nrrd"
    writer = SequenceWriter(path)
    for i, pixels in enumerate(frames(3)):
        writer.add(pixels, {**fields(i), "FriendlyDeviceName": "PLACEHOLDER"})
    journal = partial_paths(path)[1]
    journal.write_text(journal.read_text().replace("PLACEHOLDER", "Img\\n\\nZZ\\u03a9"))
    assert recover_recording(path)[1] == 3
    back = read_sequence(path)
    assert [f.fields["FriendlyDeviceName"] for f in back.frames] == ["Img\\n\\nZZ\\u03a9"] * 3
