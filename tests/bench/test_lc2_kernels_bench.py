"""bench/lc2_kernels.py: it runs both paths of the LC2 search on the same frames, says whether they
found the same planes, and restores the shipped path; the committed run found the same planes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import regseg.lc2 as search
import regseg.lc2_score as score

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_run_compares_both_paths_and_restores_the_shipped_one(load_bench, tmp_path):
    bench = load_bench("lc2_kernels")
    out = tmp_path / "k.json"
    assert bench.main(["--quick", "--frames", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["name"] for r in rows] == list(bench.SETS)
    for r in rows:
        assert r["frames"] == 2 and r["before_p50_ms"] > 0 and r["now_p50_ms"] > 0
        assert r["same_plane"] == 2 and r["significance_max_rel_diff"] < 1e-5
    assert search.RESLICE_INTERIOR and score.NUMBA_ON_CPU  # the shipped path again


def test_same_compares_plane_and_move_and_the_gap_the_significance(load_bench):
    bench = load_bench("lc2_kernels")
    plane = np.eye(4)
    moved = plane.copy()
    moved[0, 3] = 1e-12
    assert bench.same((plane, 1.0, 2.0), (plane.copy(), 1.0, 2.5))  # significance aside
    assert not bench.same((plane, 1.0, 2.0), (moved, 1.0, 2.0))
    assert bench.same((plane, math.nan, math.nan), (plane, math.nan, math.nan))
    assert not bench.same((plane, math.nan, 2.0), (plane, 1.0, 2.0))
    assert bench.significance_gap((plane, 1.0, 2.0), (plane, 1.0, 2.2)) == pytest.approx(0.1)
    assert bench.significance_gap((plane, 1.0, math.nan), (plane, 1.0, math.nan)) == 0.0


def test_the_committed_run_found_the_same_planes():
    data = json.loads((ROOT / "bench/results/lc2_kernels.json").read_text())
    assert {r["name"] for r in data["results"]} == {"A plain", "A randomised", "B"}
    for r in data["results"]:
        assert r["same_plane"] == r["frames"] >= 60
        assert r["ratio"] > 1.0
