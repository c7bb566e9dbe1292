"""Recorder: every incoming frame and (optionally) every result, written without holding us up."""

import threading
import time

import numpy as np
import pytest

from regseg.sequence_file import read_sequence
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
                                "frames": 10, "results": 0, "dropped": 0, "errors": 0}


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
