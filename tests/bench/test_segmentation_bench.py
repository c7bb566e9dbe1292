"""bench/segmentation_trust.py's scoring: AUC, detection and false alarms on rows made by hand."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def trust():
    spec = importlib.util.spec_from_file_location("segmentation_trust",
                                                  BENCH / "segmentation_trust.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["segmentation_trust"] = module
    spec.loader.exec_module(module)
    return module


def row(tre, error_mm, flags, dice_unet, dice_trus):
    return {"seed": 0, "level_mm": 0.0, "tre_mm": tre, "tre_mm_trus_run": tre,
            "error_mm": error_mm, "flags_today": flags, "dice_unet": dice_unet,
            "dice_trus": dice_trus}


def test_summary_scores_each_cue(trust):
    rows = [
        row(1.0, 1.0, [], 0.95, 0.90),  # good, nothing flags
        row(1.5, 3.0, ["error_estimate"], 0.90, 0.85),  # good, a false alarm of today's check
        row(8.0, 2.0, [], 0.92, 0.30),  # bad: only the TRUS-only segmentation disagrees
        row(12.0, 6.0, ["error_estimate"], 0.40, 0.20),  # bad: everything flags
        row(3.0, 2.0, [], 0.9, 0.9),  # neither good nor bad
        row(math.nan, 1.0, [], 0.9, 0.9),  # no gland in the frame: left out
    ]
    s = trust.trust_summary(rows)
    assert (s["frames"], s["bad_frames"], s["good_frames"]) == (5, 2, 2)
    assert s["registration_same_in_both_runs"]
    assert s["detection"]["today_all_flags"] == 0.5
    assert s["detection"]["disagreement_ascseg_trus"] == 1.0
    assert s["detection"]["today_plus_ascseg_trus"] == 1.0
    assert s["false_alarm_tre_le_2mm"]["today_all_flags"] == 0.5
    assert s["false_alarm_tre_le_2mm"]["disagreement_ascseg_trus"] == 0.0
    assert s["auc"]["disagreement_ascseg_trus"] == 1.0  # 1 - Dice ranks both bad frames first
    # bad estimates (2, 6) vs good (1, 3): 3 of the 4 pairs ordered right
    assert s["auc"]["qualitynet_estimate"] == 0.75
    assert s["auc"]["disagreement_unet"] == 0.75
