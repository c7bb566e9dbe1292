"""bench/calibration.py: its scoring compares with the truth and can fail."""

from __future__ import annotations

import numpy as np


def test_pivot_and_landmark_rows_measure_against_truth(load_bench, monkeypatch):
    bench = load_bench("calibration")
    row = bench.bench_pivot(2)
    assert 0 < row["mean"] < 0.3 and row["max"] >= row["mean"]
    fiducials = np.array([[35, 0, 10], [-35, 0, 10], [0, 30, -15], [0, -30, -15], [20, 20, 30.0]])
    case = (fiducials, np.array([[0.0, 0.0, 0.0]]))
    row = bench.bench_landmarks(400, case)
    assert abs(row["ratio"] - 1) < 0.1
    # twice the localisation error: the measured TRE follows it (the scoring is not a constant)
    monkeypatch.setattr(bench, "FLE_MRI_MM", 2 * bench.FLE_MRI_MM)
    monkeypatch.setattr(bench, "FLE_REFERENCE_MM", 2 * bench.FLE_REFERENCE_MM)
    doubled = bench.bench_landmarks(400, case)
    assert doubled["mean"] > 1.7 * row["mean"]
