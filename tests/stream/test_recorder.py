"""Recorder: every incoming frame and (optionally) every result, written without holding us up."""

import logging
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from regseg.sequence_file import read_sequence
from regseg.sequence_writer import SequenceWriter, has_partial, recover_recording
from regseg.stream.recorder import Recorder, RecordingSlot, output_paths
from regseg.types import Frame, Result

WAIT_S = 5.0


def make_frame(seq: int, tracked: bool = True, shape=(12, 16)) -> Frame:
    rng = np.random.default_rng(seq)
    pose = np.eye(4)
    pose[:3] = rng.normal(size=(3, 4))
    return Frame(seq=seq, acquired_ns=seq, pixels=rng.integers(0, 256, shape, dtype=np.uint8),
                 spacing_mm=(float(np.linalg.norm(pose[:3, 1])), float(np.linalg.norm(pose[:3, 0])))
                 if tracked else (0.3, 0.2), image_to_reference=pose if tracked else None,
                 source_ts=1_700_000_000 + seq / 30)


def make_result(frame: Frame, flagged: bool = False) -> Result:
    h, w = frame.pixels.shape
    labels = np.zeros((h, w), np.uint8)
    labels[2:5, 3:9] = 1 + frame.seq % 2
    mri_to_image = np.eye(4)
    mri_to_image[:3, 3] = [frame.seq, 2.5, -1 / 3]
    return Result(frame=frame, mri_to_image=mri_to_image, warped_labels=labels, labels=labels,
                  overlay=np.dstack([frame.pixels] * 3), quality=0.123456789, flagged=flagged)


def test_the_slot_records_frames_the_pipeline_never_takes(tmp_path):
    recorder = Recorder(tmp_path / "s.igs.mha")
    slot = RecordingSlot(recorder)
    for seq in range(10):
        slot.put(make_frame(seq, tracked=seq % 4 != 1))
    assert slot.skipped == 9  # nobody took them from the hand-off ...
    recorder.close()
    frames = read_sequence(tmp_path / "s.igs.mha").frames
    assert len(frames) == 10  # ... and the recording has them all
    assert [f.fields["FrameNumber"] for f in frames] == [str(i) for i in range(10)]
    assert frames[1].fields["ImageToReferenceTransformStatus"] == "INVALID"
    # Untracked, and not the first frame's pixel size (ElementSpacing): its own is kept.
    assert frames[1].fields["SpacingMm"] == "0.3 0.2"
    np.testing.assert_array_equal(frames[6].transform("ImageToReference"),
                                  make_frame(6).image_to_reference)
    assert recorder.stats() == {"kind": "recorder", "path": str(tmp_path / "s.igs.mha"),
                                "frames": 10, "results": 0, "dropped": 0, "errors": 0,
                                "failed": []}


def test_outputs_go_to_labels_and_overlay_files_with_the_registration(tmp_path):
    recorder = Recorder(tmp_path / "run.seq.nrrd", outputs=True)
    for seq in range(3):
        recorder.submit(make_result(make_frame(seq), flagged=seq == 1))
    recorder.close()
    labels_path, overlay_path = output_paths(tmp_path / "run.seq.nrrd")
    assert labels_path.name == "run_Labels.seq.nrrd" and overlay_path.name == "run_Overlay.seq.nrrd"
    labels, overlay = read_sequence(labels_path), read_sequence(overlay_path)
    assert overlay.frames[2].pixels.shape == (12, 16, 3)
    np.testing.assert_array_equal(labels.frames[2].pixels, make_result(make_frame(2)).labels)
    fields = labels.frames[1].fields
    assert fields["Flagged"] == "true" and fields["MRIToImageTransformStatus"] == "INVALID"
    assert float(fields["Quality"]) == 0.123456789
    assert fields["Status"] == "OK"  # IGSIO's NRRD writer calls ImageStatus "Status"
    np.testing.assert_array_equal(labels.frames[0].transform("MRIToImage"),
                                  make_result(make_frame(0)).mri_to_image)
    assert read_sequence(tmp_path / "run.seq.nrrd").frames == []  # no frames were added


def test_a_slow_disk_drops_and_counts_instead_of_blocking(tmp_path, monkeypatch):
    release = threading.Event()
    writing = threading.Event()
    original = Recorder._write

    def stuck_write(self, item):
        writing.set()
        release.wait(WAIT_S)  # the disk stalls on the first frame
        original(self, item)

    monkeypatch.setattr(Recorder, "_write", stuck_write)
    recorder = Recorder(tmp_path / "s.igs.mha", queue_size=4)
    recorder.add_frame(make_frame(0))
    assert writing.wait(WAIT_S)
    start = time.perf_counter()
    for seq in range(1, 21):
        recorder.add_frame(make_frame(seq))
    assert time.perf_counter() - start < 0.5  # never waited for the disk
    release.set()
    recorder.close()
    assert recorder.stats()["frames"] == 5 and recorder.stats()["dropped"] == 16
    assert len(read_sequence(tmp_path / "s.igs.mha").frames) == 5


def test_a_frame_of_another_size_is_counted_and_the_file_stays_valid(tmp_path):
    recorder = Recorder(tmp_path / "s.igs.mha")
    recorder.add_frame(make_frame(0))
    recorder.add_frame(make_frame(1, shape=(20, 20)))
    recorder.add_frame(make_frame(2))
    recorder.close()
    assert recorder.errors == 1
    assert len(read_sequence(tmp_path / "s.igs.mha").frames) == 2


def test_a_bad_record_path_fails_at_once(tmp_path):
    with pytest.raises(Exception, match="not a sequence file name"):
        Recorder(tmp_path / "session.mp4")


HOSTILE_NAMES = ["Img\n\nZZZZ", "ImageΩ", "\x1b[2K\rFAKE: ok", "Img\r\nElementDataFile = x"]


@pytest.mark.parametrize("ext", [".igs.mha", ".igs.nrrd"])
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_scanner_device_name_cannot_break_the_recording(tmp_path, ext, name):
    """Red team: a LF in the name ended the NRRD header early, an Omega failed to encode at close
    and left an empty file. Now every frame reads back, the name escaped to printable ASCII."""
    path = tmp_path / f"s{ext}"
    recorder = Recorder(path, outputs=True)
    for seq in range(3):
        frame = replace(make_frame(seq), device_name=name)
        recorder.add_frame(frame)
        recorder.submit(make_result(frame))
    recorder.close()
    assert recorder.stats()["errors"] == 0 and recorder.stats()["failed"] == []
    for file in (path, *output_paths(path)):
        frames = read_sequence(file).frames
        assert len(frames) == 3
        written = frames[2].fields["FriendlyDeviceName"]
        assert written.isascii() and written.isprintable()
        assert written.encode().decode("unicode_escape") == name  # readable, nothing lost
    np.testing.assert_array_equal(read_sequence(path).frames[1].pixels, make_frame(1).pixels)


def test_a_file_that_fails_to_close_does_not_keep_the_others_open(tmp_path, monkeypatch, caplog):
    path = tmp_path / "s.igs.mha"
    original = SequenceWriter.close
    recorder = Recorder(path, outputs=True)

    def failing_close(self):
        if self.path == path:
            raise OSError(28, "No space left on device")
        return original(self)

    monkeypatch.setattr(SequenceWriter, "close", failing_close)
    for seq in range(3):
        recorder.add_frame(make_frame(seq))
        recorder.submit(make_result(make_frame(seq)))
    with caplog.at_level(logging.ERROR, logger="regseg.stream.recorder"):
        recorder.close()
    labels_path, overlay_path = output_paths(path)
    assert len(read_sequence(labels_path).frames) == 3  # closed although the session file failed
    assert len(read_sequence(overlay_path).frames) == 3
    [failure] = recorder.stats()["failed"]
    assert failure.startswith(f"{path}: closing failed: OSError") and "No space left" in failure
    assert any(r.levelno == logging.ERROR and "regseg-igt recover" in r.getMessage()
               for r in caplog.records)
    monkeypatch.undo()
    assert has_partial(path)  # what was written stays on disk, and recovers whole
    assert recover_recording(path)[1] == 3


def test_a_disk_error_while_writing_stops_the_recording_and_is_reported(tmp_path, monkeypatch):
    original = SequenceWriter.add

    def add(self, pixels, fields):
        if self.count == 2:
            raise OSError(28, "No space left on device")
        original(self, pixels, fields)

    monkeypatch.setattr(SequenceWriter, "add", add)
    path = tmp_path / "s.igs.mha"
    recorder = Recorder(path)
    for seq in range(5):
        recorder.add_frame(make_frame(seq))
    recorder.close()
    stats = recorder.stats()
    assert stats["frames"] == 2 and stats["dropped"] == 2  # frame 2 failed, 3 and 4 not written
    assert stats["failed"] == [f"{path}: writing failed: OSError: [Errno 28] No space left on "
                               "device"]
    assert len(read_sequence(path).frames) == 2  # the frames before it are complete


def test_an_incomplete_recording_makes_the_live_process_exit_1(capsys):
    """The stream ran, but a file it was asked to record is not complete: not a success."""
    from regseg.stream.entry import run_live

    def start(_stop, running):
        running.set()
        return {"recorder": {"frames": 3, "failed": ["rec.igs.mha: closing failed: OSError: "
                                                     "[Errno 28] No space left on device"]}}

    assert run_live("regseg-stream", start, lambda summary: None) == 1
    err = capsys.readouterr().err
    assert err.startswith("regseg-stream: error: the recording is incomplete: rec.igs.mha")
    assert "No space left" in err
    ok = {"recorder": {"frames": 3, "failed": []}}
    assert run_live("regseg-stream", lambda _s, r: (r.set(), ok)[1], lambda summary: None) == 0
