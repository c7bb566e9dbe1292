"""FileSource: a recorded session replays bit-exact, paced or flat out, and drives the pipeline."""

import json
import time
from dataclasses import replace

import numpy as np
import pytest

from regseg.errors import InputError
from regseg.sequence_file import Sequence, SequenceFrame, parse_matrix, read_sequence
from regseg.stream.file_source import FileSource, frame_from_sequence, replay_offsets_ns
from regseg.stream.recorder import Recorder, RecordingSlot
from regseg.types import Frame

WAIT_S = 5.0
PERIOD_S = 0.02


def session_frames(n: int = 8) -> list[Frame]:
    """Tracked and untracked frames as a source would deliver them (gaps in seq included)."""
    rng = np.random.default_rng(7)
    frames = []
    for i in range(n):
        pose = np.eye(4)
        pose[:3] = rng.normal(size=(3, 4))
        tracked = i % 3 != 1
        frames.append(Frame(
            seq=2 * i, acquired_ns=0, pixels=rng.integers(0, 256, (24, 32), dtype=np.uint8),
            spacing_mm=(float(np.linalg.norm(pose[:3, 1])), float(np.linalg.norm(pose[:3, 0])))
            if tracked else (0.35, 0.15),
            image_to_reference=pose if tracked else None,
            source_ts=1_700_000_000.123 + i * PERIOD_S,
            device_name="Image_Reference" if i != 5 else "Image_Probe"))
    return frames


def record(path, frames: list[Frame]):
    recorder = Recorder(path)
    slot = RecordingSlot(recorder)
    for frame in frames:
        slot.put(frame)
    recorder.close()
    return path


def assert_same_frame(replayed: Frame, original: Frame) -> None:
    assert replayed.seq == original.seq and replayed.source_ts == original.source_ts
    assert replayed.spacing_mm == original.spacing_mm
    assert replayed.device_name == original.device_name
    assert replayed.pixels.dtype == np.uint8
    np.testing.assert_array_equal(replayed.pixels, original.pixels)
    if original.image_to_reference is None:
        assert replayed.image_to_reference is None
    else:
        assert np.array_equal(replayed.image_to_reference, original.image_to_reference)


def test_recorded_session_replays_bit_exact_at_the_recorded_rate(tmp_path):
    frames = session_frames()
    source = FileSource(record(tmp_path / "s.igs.mha", frames), rate="recorded")
    start = time.perf_counter()
    source.start()
    replayed = []
    while (frame := source.slot.get(timeout=WAIT_S)) is not None:
        replayed.append(frame)
    elapsed = time.perf_counter() - start
    assert len(replayed) == len(frames)  # a waiting consumer misses nothing at 50 fps
    for got, original in zip(replayed, frames, strict=True):
        assert_same_frame(got, original)
    assert elapsed >= (len(frames) - 1) * PERIOD_S * 0.9
    assert source.finished and source.stats()["frames"] == len(frames)


def test_relative_timestamps_replay_on_one_wall_anchored_clock(tmp_path):
    """A PLUS tracker (or an old regseg recording) counts from 0: the replay publishes seconds since
    1970 for every frame, frame 0 included, with the recorded spacing (no 56-year jump)."""
    frames = [replace(f, source_ts=i * PERIOD_S) for i, f in enumerate(session_frames(4))]
    source = FileSource(record(tmp_path / "rel.igs.mha", frames), rate="max")
    start = time.time()
    source.start()
    replayed = []
    while (frame := source.slot.get(timeout=WAIT_S)) is not None:
        replayed.append(frame)
    stamps = [f.source_ts for f in replayed]
    assert abs(stamps[0] - start) < 5
    assert np.diff(stamps) == pytest.approx([PERIOD_S * (b.seq - a.seq) / 2 for a, b in
                                             zip(replayed, replayed[1:], strict=False)])


@pytest.mark.parametrize("ext", [".igs.nrrd", ".seq.mha"])
def test_every_format_replays_the_same_frames(tmp_path, ext):
    frames = session_frames(4)
    sequence = read_sequence(record(tmp_path / f"s{ext}", frames))
    for i, (stored, original) in enumerate(zip(sequence.frames, frames, strict=True)):
        replayed = frame_from_sequence(stored, i, 0,
                                       element_spacing_mm=sequence.element_spacing_mm)
        assert_same_frame(replayed, original)


def test_flat_out_replay_is_faster_than_recorded_and_counts_what_the_slot_skipped(tmp_path):
    frames = [replace(f, source_ts=f.source_ts + 10 * i) for i, f in enumerate(session_frames())]
    source = FileSource(record(tmp_path / "s.igs.mha", frames), rate="max")
    start = time.perf_counter()
    source.start()
    assert source.done.wait(WAIT_S)
    assert time.perf_counter() - start < 5.0  # the recording spans 70 s
    assert source.stats()["frames"] == len(frames)
    assert source.slot.put_count == len(frames)
    last = None
    while (frame := source.slot.get(timeout=WAIT_S)) is not None:
        last = frame
    assert last.seq == frames[-1].seq  # the newest always wins


def test_stop_is_prompt_while_waiting_for_a_late_frame(tmp_path):
    frames = session_frames(2)
    frames[1] = replace(frames[1], source_ts=frames[0].source_ts + 60.0)
    source = FileSource(record(tmp_path / "s.igs.mha", frames))
    source.start()
    assert source.slot.get(timeout=WAIT_S) is not None
    start = time.perf_counter()
    source.stop()
    assert time.perf_counter() - start < 1.0 and source.finished and source.slot.closed


def test_missing_or_backward_timestamps_fall_back_to_the_default_rate():
    frames = [SequenceFrame(np.zeros((1, 1), np.uint8), {"Timestamp": ts})
              for ts in ("10.0", "10.5", "10.2", "bad-is-skipped", "11.5")]
    frames[3].fields.pop("Timestamp")
    offsets = replay_offsets_ns(Sequence(frames), fps=10.0)
    assert offsets == [0, 500_000_000, 600_000_000, 700_000_000, 1_700_000_000]


def test_bad_files_and_settings_fail_before_the_pipeline_starts(tmp_path):
    with pytest.raises(InputError, match="does not start with a NRRD magic line"):
        (tmp_path / "x.seq.nrrd").write_text("hello\n")
        FileSource(tmp_path / "x.seq.nrrd")
    record(tmp_path / "empty.igs.mha", [])
    with pytest.raises(InputError, match="the sequence has no frames"):
        FileSource(tmp_path / "empty.igs.mha")
    with pytest.raises(InputError, match="replay rate 'fast'; one of recorded, max"):
        FileSource(tmp_path / "empty.igs.mha", rate="fast")


@pytest.mark.slow
def test_cli_replays_a_file_through_the_full_pipeline_and_records_it_again(tmp_path, capsys):
    """--source file:// drives the real pipeline; --record of that replay is the same file."""
    from regseg.models.checkpoint import save_checkpoint
    from regseg.models.registry import build_config, build_model, default_weights_path
    from regseg.sim.phantom import make_phantom, write_phantom
    from regseg.sim.scanner import SimulatedScanner
    from regseg.stream.cli import main

    # This test is about the plumbing, not accuracy: untrained weights do when none are shipped.
    weights = default_weights_path("alignsegnet")
    if not weights.exists():
        weights = save_checkpoint(tmp_path / "untrained.pt", "alignsegnet",
                                  build_model("alignsegnet"), build_config("alignsegnet"))

    phantom = make_phantom(0)
    mri_path, labels_path = write_phantom(phantom, tmp_path)
    scanner = SimulatedScanner(phantom, seed=0)
    frames = [replace(scanner.frame(i), truth=None, source_ts=1_700_000_000 + i / 30)
              for i in range(6)]
    session = record(tmp_path / "session.igs.mha", frames)
    again = tmp_path / "again.igs.mha"
    stats_path = tmp_path / "stats.json"
    code = main(["--mri", str(mri_path), "--mri-labels", str(labels_path),
                 "--source", f"file://{session}", "--replay-rate", "max", "--device", "cpu",
                 "--serve", "none", "--zmq", "none", "--quiet", "--threads", "1",
                 "--weights", str(weights),
                 "--record", str(again), "--record-outputs", "--stats-json", str(stats_path)])
    assert code == 0, capsys.readouterr().err
    stats = json.loads(stats_path.read_text())
    assert stats["source_stats"]["frames"] == 6 and stats["frames"] >= 1
    assert stats["recorder"]["frames"] == 6 and stats["recorder"]["dropped"] == 0
    # Every incoming frame was recorded (skipped ones too): the file is byte-identical.
    assert again.read_bytes() == session.read_bytes()
    outputs = read_sequence(tmp_path / "again_Labels.igs.mha")
    assert len(outputs.frames) == stats["frames"]
    fields = outputs.frames[-1].fields
    parse_matrix(fields["MRIToImageTransform"])
    assert fields["MRIToImageTransformStatus"] == ("INVALID" if fields["Flagged"] == "true"
                                                   else "OK")
    assert set(np.unique(outputs.frames[-1].pixels)) <= {0, 1, 2}


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--source", "file://nowhere/missing.igs.mha"], ["missing.igs.mha", "cannot read"]),
    (["--source", "file://notes.txt"], ["not a sequence file name", ".igs.mha"]),
    (["--source", "file://x.igs.mha", "--record-outputs"], ["--record-outputs needs --record"]),
    (["--source", "file://x.igs.mha", "--record", "out.mp4"], ["out.mp4", "not a sequence"]),
])
def test_cli_refuses_bad_replay_and_record_arguments(tmp_path, capsys, argv, fragments):
    from regseg.stream.cli import main

    args = ["--mri", "case.nii.gz", "--mri-labels", "labels.nii.gz", "--device", "cpu"]
    argv = [a.replace("nowhere", str(tmp_path)) for a in argv]
    assert main(args + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("regseg-stream: error: ")
    for fragment in fragments:
        assert fragment in err, err
