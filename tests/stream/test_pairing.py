"""TimestampPairer: images meet the pose of their own instant, in either arrival order."""

import numpy as np
import pytest

from regseg.stream.igtl.pairing import Pose, TimestampPairer, pose_is_valid

MS = 1_000_000


def pose(ts: float, received_ns: int, valid: bool = True) -> Pose:
    m = np.eye(4)
    m[0, 3] = ts  # tells the poses apart
    return Pose(m, ts, valid, received_ns)


def test_pose_first_pairs_at_once():
    pairer: TimestampPairer[str] = TimestampPairer()
    assert pairer.add_pose(pose(10.0, 0)) == []
    [out] = pairer.add_image("a", 10.0, 1 * MS)
    assert out.item == "a" and out.pose.timestamp_s == 10.0 and out.received_ns == 1 * MS
    assert pairer.paired == 1 and pairer.deadline_ns is None


def test_untracked_sender_is_never_held():
    pairer: TimestampPairer[str] = TimestampPairer()
    for i in range(5):
        [out] = pairer.add_image(i, float(i), i * MS)
        assert out.pose is None
    assert pairer.unpaired == 5 and pairer.waited == 0


def test_pose_after_image_is_learnt_then_each_image_gets_its_own_pose():
    pairer: TimestampPairer[int] = TimestampPairer()
    # Frame 0: the image comes first and nothing is known yet: it goes out on its own matrix.
    [out] = pairer.add_image(0, 0.0, 0)
    assert out.pose is None
    assert pairer.add_pose(pose(0.0, 1 * MS)) == []
    assert pairer.late_poses == 1 and pairer.poses_follow
    # From frame 1 on, images wait for their pose and never take the previous frame's.
    for i in range(1, 6):
        t = i * 33 * MS
        assert pairer.add_image(i, i / 30, t) == []
        assert pairer.deadline_ns == t + pairer.max_wait_ns
        [out] = pairer.add_pose(pose(i / 30, t + 1 * MS))
        assert out.item == i and out.pose.timestamp_s == i / 30
    assert pairer.paired == 5 and pairer.unpaired == 1


def test_a_held_image_is_released_by_the_next_image_or_its_deadline():
    pairer: TimestampPairer[str] = TimestampPairer(max_wait_s=0.05)
    pairer.poses_follow = True
    pairer.add_pose(pose(0.0, 0))
    assert pairer.add_image("a", 1.0, 10 * MS) == []
    assert pairer.expire(59 * MS) == []
    [out] = pairer.expire(60 * MS)
    assert out.item == "a" and out.pose is None
    assert pairer.add_image("b", 2.0, 70 * MS) == []
    released = pairer.add_image("c", 3.0, 80 * MS)  # b goes first, unpaired; c is held
    assert [p.item for p in released] == ["b"]
    assert [p.item for p in pairer.flush()] == ["c"]


def test_only_poses_within_tolerance_pair_and_the_nearest_wins():
    pairer: TimestampPairer[str] = TimestampPairer(tolerance_s=0.004)
    pairer.add_pose(pose(1.000, 0))
    pairer.add_pose(pose(1.003, 0))
    [out] = pairer.add_image("a", 1.002, 1)
    assert out.pose.timestamp_s == 1.003
    [out] = pairer.add_image("b", 1.010, 2)
    assert out.pose is None


def test_a_stopped_tracker_stops_the_waiting():
    pairer: TimestampPairer[int] = TimestampPairer()
    pairer.poses_follow = True
    pairer.add_pose(pose(0.0, 0))
    for i in range(1, 4):
        pairer.add_image(i, float(i), i * MS)
        pairer.expire(i * MS + pairer.max_wait_ns)
    assert not pairer.poses_follow
    [out] = pairer.add_image(9, 9.0, 9 * MS)  # released at once again
    assert out.item == 9


@pytest.mark.parametrize(("metadata", "valid"), [
    (None, True), ({}, True), ({"TransformStatus": "OK"}, True),
    ({"TransformStatus": "INVALID"}, False), ({"TransformValid": "false"}, False),
    ({"TransformValid": "true", "TransformStatus": "OK"}, True), ({"Other": "x"}, True),
])
def test_plus_transform_status_metadata(metadata, valid):
    assert pose_is_valid(metadata) is valid


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        TimestampPairer(tolerance_s=-1)
