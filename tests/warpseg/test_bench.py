"""bench/warpseg.py's scoring and its committed JSON (the README table's source)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
RESULT = BENCH / "results" / "warpseg_quick.json"


def _load_bench():
    sys.path.insert(0, str(BENCH))  # the benches import their sibling ``common``
    try:
        spec = importlib.util.spec_from_file_location("bench_warpseg", BENCH / "warpseg.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


bench = _load_bench()
GROUPS = np.array([0, 1, 1, 1])


def test_score_perfect_missed_and_partial():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:8, 2:8, 2:5] = 1
    truth[2:8, 2:8, 5:8] = 2
    truth[4:6, 4:6, 4:6] = 3
    perfect = bench.score(truth, truth, GROUPS, 1.0, bench.FINE)
    assert perfect["coarse"] == perfect["fine"] == 1.0 and perfect["hd95_mm"] == 0.0
    no_lesion = truth.copy()
    no_lesion[no_lesion == 3] = 1
    s = bench.score(no_lesion, truth, GROUPS, 1.0, bench.FINE)
    assert s["coarse"] == 1.0 and s["lesion"] == 0.0 and s["fine"] < 0.7  # a miss counts 0
    shifted = np.roll(truth, 2, axis=0)
    assert 0 < bench.score(shifted, truth, GROUPS, 1.0, bench.FINE)["coarse"] < 1
    assert bench.score(shifted, truth, GROUPS, 1.0, bench.FINE)["hd95_mm"] == pytest.approx(2.0)


@pytest.mark.skipif(not RESULT.is_file(), reason="no committed bench result yet")
def test_committed_result_has_the_issue_keys():
    result = json.loads(RESULT.read_text())
    assert set(result["dice"]) == set(bench.METHODS)
    for method in bench.METHODS:
        assert set(result["dice"][method]) == {"coarse", "fine"}
        assert 0.0 <= result["dice"][method]["coarse"] <= 1.0
    per = result["per_volume"]
    assert result["speedup_vs_registration"] == pytest.approx(
        np.mean([r["seconds"] for r in per["pseudolabels"]])
        / np.mean([r["seconds"] for r in per["warpseg"]]), rel=0.01)
