"""bench/lc2_out_of_plane.py: its 3-D moves are rigid in mm about the gland, its cases are never
evaluation cases, and bad input exits 2."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("lc2_out_of_plane")


def test_moves_are_rigid_in_mm_and_turn_about_the_centre(bench):
    spacing, nz = (0.2, 0.5), 1.0
    move = bench.rigid_move(np.array([0.0, 0.0, 10.0, 0.0, 3.0, -2.0]), np.array([40.0, 60.0]),
                            spacing, nz)
    s = np.diag([spacing[0], spacing[1], nz])
    lin = s @ move[:3, :3] @ np.linalg.inv(s)
    assert np.allclose(lin.T @ lin, np.eye(3), atol=1e-12)  # a rotation in mm
    assert np.allclose(move @ np.array([40.0, 60.0, 0.0, 1.0]), [40.0, 60.0, 0.0, 1.0])
    shifted = bench.rigid_move(np.array([0.0, 0.0, 0.0, 2.5, 0.0, 0.0]), np.zeros(2), spacing, nz)
    assert np.allclose(shifted[:3, 3], [0.0, 0.0, 2.5])  # the normal shift, in mm


def test_cases_are_calibration_and_diagnosis_only(bench):
    for family, seed in bench.CASES:
        assert (3100 <= seed < 3200) if family == "A" else (5020 <= seed < 5100)


def test_bad_frames_exit_2(bench, capsys):
    assert bench.main(["--frames", "0"]) == 2
    assert "--frames 0" in capsys.readouterr().err
