"""bench/steps.py: the step moves every tracked pose from its frame on, in the reference frame,
along the plane of the frame at the step; rows count what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regseg.types import Frame


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("steps")


def frame(pose: np.ndarray, seq: int) -> Frame:
    return Frame(seq=seq, acquired_ns=0, pixels=np.zeros((4, 4), np.uint8), spacing_mm=(1.0, 1.0),
                 image_to_reference=pose)


def test_the_step_is_a_reference_translation_in_the_plane_from_its_frame_on(bench):
    rot = np.eye(4)
    rot[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]  # image i -> reference y, j -> z
    poses = [rot @ np.diag([0.2, 0.2, 1.0, 1.0]) for _ in range(4)]
    out = list(bench.stepped([frame(p, k) for k, p in enumerate(poses)], 6.0, 0.0, at=2))
    for k in range(2):
        assert np.array_equal(out[k].image_to_reference, poses[k])
    for k in (2, 3):
        moved = out[k].image_to_reference[:3, 3] - poses[k][:3, 3]
        assert np.allclose(moved, [0.0, 6.0, 0.0])  # along the image's column axis, 6 mm
        assert np.allclose(out[k].image_to_reference[:3, :3], poses[k][:3, :3])
    m = bench.step_matrix(poses[0], 5.0, math.pi / 2)  # along the rows: reference z
    assert np.allclose(m[:3, 3], [0.0, 0.0, 5.0])


def test_summary_counts_off_frames_flags_and_recovery(bench):
    def rec(seq, tre, flags=(), phantom=1):
        return {"family": "A", "phantom": phantom, "step_mm": 4.0, "seq": seq, "tre_mm": tre,
                "jump_mm": math.nan, "flagged": bool(flags), "flags": list(flags)}

    at = bench.STEP_AT
    records = [rec(k, 0.5, ("jump",) if k == 0 else ()) for k in range(at)]
    records += [rec(at, 6.0, ("jump",)), rec(at + 1, 3.0, ("error_estimate",)),
                rec(at + 2, 1.0), rec(at + 3, 2.5), rec(at + 4, 1.0, ("jump",)), rec(at + 5, 1.0)]
    row = bench.summarise("A", 4.0, records, at + 6)
    assert row["frames_after"] == 6 and row["off"] == 3 and row["bad"] == 1
    assert row["off_flagged"] == pytest.approx(2 / 3) and row["off_jump"] == pytest.approx(1 / 3)
    assert row["bad_flagged"] == 1.0
    assert row["recover_frames_median"] == 4.0  # back to <= 2 mm for good from the 5th frame
    assert row["false_alarm_before"] == pytest.approx(1 / at)
    assert row["false_alarm_after"] == pytest.approx(1 / 3) and row["n_good_after"] == 3
