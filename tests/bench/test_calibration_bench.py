"""bench/calibration.py: its scoring compares with the truth and can fail."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_bench():
    sys.path.insert(0, str(BENCH))  # the benches import their sibling ``common``
    try:
        spec = importlib.util.spec_from_file_location("bench_calibration", BENCH / "calibration.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_pivot_and_landmark_rows_measure_against_truth(monkeypatch):
    bench = _load_bench()
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
