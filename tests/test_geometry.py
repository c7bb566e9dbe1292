"""Property-style tests of regseg.geometry: bad matrices refused, plausible poses accepted."""

from __future__ import annotations

import numpy as np
import pytest

from regseg.errors import InputError
from regseg.geometry import FrameLimits, FrameRefused, check_affine, check_frame, check_image_pose
from regseg.types import Frame

RNG_SEEDS = range(200)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(r)))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_pose(rng: np.random.Generator) -> np.ndarray:
    """A rigid probe pose with plausible anisotropic pixel spacing, pixels -> mm."""
    spacing = rng.uniform(0.02, 2.0, size=2)
    rot = random_rotation(rng)
    m = np.eye(4)
    m[:3, 0] = rot[:, 0] * spacing[0]
    m[:3, 1] = rot[:, 1] * spacing[1]
    m[:3, 2] = rot[:, 2] * rng.uniform(0.05, 2.0) * (1 if rng.random() < 0.8 else -1)
    m[:3, 3] = rng.uniform(-500, 500, size=3)
    return m


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_valid_rigid_poses_accepted(seed):
    rng = np.random.default_rng(seed)
    pose = random_pose(rng)
    out = check_image_pose(pose, what="pose")
    assert out.dtype == np.float64 and np.array_equal(out, pose)
    rigid = np.eye(4)
    rigid[:3, :3] = random_rotation(rng)
    rigid[:3, 3] = rng.uniform(-300, 300, size=3)
    assert np.array_equal(check_affine(rigid, what="rigid"), rigid)


def _singular(rng: np.random.Generator) -> np.ndarray:
    m = np.eye(4)
    rank = int(rng.integers(0, 3))
    a = rng.normal(size=(3, rank)) @ rng.normal(size=(rank, 3)) if rank else np.zeros((3, 3))
    m[:3, :3] = a
    m[:3, 3] = rng.normal(size=3) * 100
    return m


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_singular_near_singular_nan_and_huge_refused(seed):
    rng = np.random.default_rng(seed)
    singular = _singular(rng)
    near = singular.copy()
    near[:3, :3] += rng.normal(size=(3, 3)) * 10.0 ** rng.uniform(-14, -7)
    nan = random_pose(rng)
    nan[rng.integers(0, 3), rng.integers(0, 4)] = rng.choice([np.nan, np.inf, -np.inf])
    huge = random_pose(rng)
    huge[:3, :3] *= 10.0 ** rng.uniform(4, 30)
    far = random_pose(rng)
    far[:3, 3] = rng.normal(size=3) * 10.0 ** rng.uniform(5, 30)
    bad_last_row = random_pose(rng)
    bad_last_row[3, rng.integers(0, 4)] += rng.uniform(0.1, 10)
    for bad in (singular, near, nan, huge, far, bad_last_row):
        with pytest.raises(InputError, match="^where:"):
            check_affine(bad, what="where")
        with pytest.raises(InputError, match="^where:"):
            check_image_pose(bad, what="where")


@pytest.mark.parametrize("seed", range(50))
def test_degenerate_image_axes_refused(seed):
    rng = np.random.default_rng(seed)
    pose = random_pose(rng)
    zero_i = pose.copy()
    zero_i[:3, 0] = 0
    parallel = pose.copy()
    parallel[:3, 1] = pose[:3, 0] * rng.uniform(0.5, 2) * rng.choice([-1, 1])
    zero_normal = pose.copy()
    zero_normal[:3, 2] = 0
    in_plane_normal = pose.copy()
    in_plane_normal[:3, 2] = pose[:3, 0] + pose[:3, 1]
    sheared = pose.copy()  # j rotated 20 degrees towards i
    j_dir = pose[:3, 1] / np.linalg.norm(pose[:3, 1])
    i_dir = pose[:3, 0] / np.linalg.norm(pose[:3, 0])
    t = np.radians(20)
    sheared[:3, 1] = (np.cos(t) * j_dir + np.sin(t) * i_dir) * np.linalg.norm(pose[:3, 1])
    metres = pose.copy()
    metres[:3, :2] /= 1000.0  # pixel spacing in metres: 1e-5..2e-3
    for bad in (zero_i, parallel, zero_normal, in_plane_normal, sheared, metres):
        with pytest.raises(InputError, match="^pose:"):
            check_image_pose(bad, what="pose")


def test_messages_name_value_and_expectation():
    m = np.eye(4)
    m[:3, :3] = 0
    with pytest.raises(InputError, match=r"--reference-to-mri r\.txt: singular.*condition number "
                       r"inf.*invertible 4x4 affine is expected"):
        check_affine(m, what="--reference-to-mri r.txt")
    with pytest.raises(InputError, match=r"shape \(3, 3\)"):
        check_affine(np.eye(3), what="x")
    with pytest.raises(InputError, match=r"1 non-finite"):
        check_affine(_one_nan(), what="x")
    pose = np.diag([0.2, 0.2, 0.2, 1.0])
    pose[:3, 1] = [0.2, 0.0, 0.0]
    with pytest.raises(InputError, match=r"0\.00 degrees apart; within 5\.0 degrees"):
        check_image_pose(pose, what="x")


def _one_nan() -> np.ndarray:
    m = np.eye(4)
    m[0, 3] = np.nan
    return m


def _frame(pixels, pose=None, spacing=(0.2, 0.2)) -> Frame:
    return Frame(seq=7, acquired_ns=0, pixels=pixels, spacing_mm=spacing,
                 image_to_reference=pose, device_name="Image_Reference")


def test_check_frame_reasons():
    ok = np.zeros((64, 80), np.uint8)
    pose = np.diag([0.2, 0.2, 0.2, 1.0])
    check_frame(_frame(ok, pose))
    check_frame(_frame(ok, None))  # untracked passes
    cases = {
        "bad_pixels": _frame(np.zeros((64, 80), np.float32)),
        "too_large": _frame(np.zeros((100, 100), np.uint8)),
        "bad_spacing": _frame(ok, None, spacing=(0.2, float("nan"))),
        "bad_pose": _frame(ok, np.diag([0.2, 0.2, 0.0, 1.0])),
    }
    limits = FrameLimits(max_pixels=64 * 80)
    for reason, frame in cases.items():
        with pytest.raises(FrameRefused) as info:
            check_frame(frame, limits)
        assert info.value.reason == reason
        assert "frame 7 from 'Image_Reference'" in str(info.value)
    with pytest.raises(FrameRefused, match=r"100x100 = 10000 pixels exceeds the limit of 5120"):
        check_frame(cases["too_large"], limits)
