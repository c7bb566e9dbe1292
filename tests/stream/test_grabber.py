"""GrabberSource on a video written by cv2.VideoWriter: cropped, grey, paced, tracked when told."""

import struct
import time

import cv2
import numpy as np
import pytest

from regseg.clock import now_ns
from regseg.errors import InputError
from regseg.stream.grabber_source import GrabberSource, crop_grey, parse_crop
from regseg.stream.igtl.pairing import Pose

WAIT_S = 5.0
FPS = 25.0
N_FRAMES = 8
SCREEN_HW = (120, 160)
CROP = (40, 20, 64, 48)  # x, y, w, h of the "ultrasound image" on the "screen"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A screen capture: dark UI around a B-mode area whose brightness says the frame index."""
    path = tmp_path_factory.mktemp("video") / "screen.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS,
                             (SCREEN_HW[1], SCREEN_HW[0]))
    assert writer.isOpened()
    x, y, w, h = CROP
    for i in range(N_FRAMES):
        screen = np.full((*SCREEN_HW, 3), 15, np.uint8)
        screen[y:y + h, x:x + w] = 40 + 25 * i
        writer.write(screen)
    writer.release()
    return path


class FixedPose:
    """A pose source stand-in: ``pose()`` returns what the test set."""

    def __init__(self, pose: Pose | None) -> None:
        self.current = pose
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def pose(self) -> Pose | None:
        return self.current

    def stats(self) -> dict:
        return {"kind": "fixed"}


def drain(source: GrabberSource) -> list:
    frames = []
    while (frame := source.slot.get(timeout=WAIT_S)) is not None:
        frames.append(frame)
    return frames


def test_video_frames_are_cropped_grey_and_paced_at_the_file_rate(video):
    source = GrabberSource(str(video), crop=CROP, spacing_mm=(0.3, 0.25))
    start = time.perf_counter()
    source.start()
    frames = drain(source)
    elapsed = time.perf_counter() - start
    assert len(frames) == N_FRAMES and source.finished
    assert elapsed >= (N_FRAMES - 1) / FPS * 0.9
    for i, frame in enumerate(frames):
        assert frame.seq == i and frame.pixels.shape == (48, 64) and frame.pixels.dtype == np.uint8
        assert frame.spacing_mm == (0.3, 0.25) and frame.image_to_reference is None
        inner = frame.pixels[4:-4, 4:-4]  # JPEG blurs the edges of the area a little
        assert abs(float(inner.mean()) - (40 + 25 * i)) < 4
    assert source.stats()["frames"] == N_FRAMES and source.stats()["read_failures"] == 0


def test_flat_out_is_faster_than_the_file_rate(video):
    source = GrabberSource(str(video), crop=CROP, fps=0)
    start = time.perf_counter()
    source.start()
    drain(source)
    assert time.perf_counter() - start < (N_FRAMES - 1) / FPS
    assert source.frames == N_FRAMES


def test_a_recent_valid_pose_tracks_the_frame_and_a_stale_one_does_not(video):
    matrix = np.diag([0.25, 0.3, 1.0, 1.0])
    poses = FixedPose(Pose(matrix, 0.0, True, now_ns() + 10**12))  # "received" in the future
    source = GrabberSource(str(video), crop=CROP, pose_source=poses, fps=0)
    source.start()
    frames = drain(source)
    source.stop()
    assert poses.started and poses.stopped
    assert all(np.array_equal(f.image_to_reference, matrix) for f in frames)

    poses = FixedPose(Pose(matrix, 0.0, True, now_ns() - 10**9))  # a second old
    source = GrabberSource(str(video), crop=CROP, pose_source=poses, fps=0,
                           max_pose_age_s=0.2)
    source.start()
    frames = drain(source)
    assert frames and all(f.image_to_reference is None for f in frames)
    # every frame the source made had a stale pose, also those the newest-wins slot skipped before
    # drain() took them (flat out, on a loaded machine, the slot skips some)
    assert source.stats()["stale_poses"] == source.frames
    assert source.stats()["pose_source"] == {"kind": "fixed"}


def test_bad_video_crop_or_spacing_fail_before_the_stream_starts(video, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        GrabberSource(str(tmp_path / "missing.avi"))
    (tmp_path / "junk.avi").write_bytes(b"not a video")
    with pytest.raises(InputError, match="junk.avi"):
        GrabberSource(str(tmp_path / "junk.avi"))
    with pytest.raises(InputError, match="does not fit in the captured 160x120 image"):
        GrabberSource(str(video), crop=(100, 20, 64, 48))
    with pytest.raises(InputError, match="positive"):
        GrabberSource(str(video), spacing_mm=(0.0, 0.2))


@pytest.mark.parametrize(("text", "match"), [("1,2,3", "X,Y,W,H"), ("a,b,c,d", "X,Y,W,H"),
                                             ("0,0,0,10", "W, H > 0")])
def test_crop_text_is_checked(text, match):
    with pytest.raises(InputError, match=match):
        parse_crop(text)


def test_colour_and_alpha_captures_become_grey():
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR order
    assert crop_grey(bgr, None)[0, 0] == 76  # BT.601: 0.299 * 255
    bgra = np.dstack([bgr, np.full((4, 6), 255, np.uint8)])
    np.testing.assert_array_equal(crop_grey(bgra, (1, 1, 2, 2)), np.full((2, 2), 76, np.uint8))


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--source", "grabber://97"], ["cannot open video device 97", "grabber://0"]),
    (["--source", "VIDEO", "--grabber-crop", "1,2,3"], ["crop '1,2,3'", "X,Y,W,H"]),
    (["--source", "VIDEO", "--grabber-spacing-mm", "0.2"], ["--grabber-spacing-mm '0.2'"]),
    (["--source", "VIDEO", "--grabber-crop", "150,100,64,48"], ["does not fit"]),
])
def test_cli_refuses_bad_grabber_arguments(video, capsys, argv, fragments):
    from regseg.stream.cli import main

    # Any readable files for the case: the source is opened (and refused) before the MRI is read.
    args = ["--mri", str(video), "--mri-labels", str(video), "--device", "cpu"]
    assert main(args + [str(video) if a == "VIDEO" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regseg-stream: error: ")
    for fragment in fragments:
        assert fragment in err, err


def test_a_video_declaring_an_absurd_frame_rate_is_refused_at_start(video, tmp_path, capsys):
    """A header saying 1e-5 fps used to hold the stream after its first frame (1/fps = 28 h)."""
    data = bytearray(video.read_bytes())
    strh = data.find(b"strh")
    data[strh + 28:strh + 32] = struct.pack("<I", 2_500_000)  # dwScale: 25 / 2.5e6 = 1e-5 fps
    slow = tmp_path / "slow.avi"
    slow.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"slow.avi' declares 1e-05 frames per second"):
        GrabberSource(str(slow))
    source = GrabberSource(str(slow), crop=CROP, fps=0)  # --replay-rate max still plays it
    source.start()
    assert len(drain(source)) == N_FRAMES
    from regseg.stream.cli import main

    assert main(["--mri", str(video), "--mri-labels", str(video), "--device", "cpu",
                 "--source", str(slow)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regseg-stream: error: ") and "--replay-rate max" in err
    assert "Traceback" not in err
