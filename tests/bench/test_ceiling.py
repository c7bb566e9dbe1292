"""bench/ceiling.py and the biopsy-target scores of bench/accuracy.py: the MRI labels at the true
plane moved by exactly E mm, and the target's error in mm, each able to fail."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from regseg.types import Frame, GroundTruth


@pytest.fixture(scope="module")
def ceiling(load_bench):
    return load_bench("ceiling")


@pytest.fixture(scope="module")
def scoring(load_bench):
    load_bench("ceiling")  # puts nothing on sys.path for good; accuracy_scoring is its sibling
    return load_bench("accuracy_scoring")


def _frame(truth: np.ndarray, spacing=(0.5, 0.25)) -> Frame:
    """A frame whose true plane is the identity in the volume's index space (k = 0)."""
    return Frame(seq=0, acquired_ns=0, pixels=np.zeros(truth.shape, np.uint8),
                 spacing_mm=spacing, image_to_reference=np.eye(4),
                 truth=GroundTruth(image_to_mri=np.eye(4), labels=truth))


def _context(volume_labels: np.ndarray):
    """What true_plane_labels needs: labels (1, 1, 1, H, W) and an identity world_to_voxel."""
    return SimpleNamespace(labels=torch.from_numpy(volume_labels[None, None, None]).float(),
                           world_to_voxel=np.eye(4))


def test_moved_translates_the_true_plane_by_exactly_the_error_in_mm(ceiling):
    frame = _frame(np.zeros((4, 4), np.uint8), spacing=(0.5, 0.25))  # rows 0.5 mm, cols 0.25
    right = ceiling.moved(frame, 1.0, 0.0).truth.image_to_mri
    down = ceiling.moved(frame, 1.0, math.pi / 2).truth.image_to_mri
    assert right[0, 3] == pytest.approx(4.0) and right[1, 3] == pytest.approx(0.0)  # 4 columns
    assert down[0, 3] == pytest.approx(0.0, abs=1e-12) and down[1, 3] == pytest.approx(2.0)
    assert ceiling.moved(frame, 0.0, 1.0).truth.image_to_mri.tolist() == np.eye(4).tolist()


def test_the_ceiling_is_one_at_no_error_and_falls_with_it(ceiling):
    labels = np.zeros((24, 24), np.uint8)
    labels[4:20, 4:20] = 1
    labels[10:14, 10:14] = 2  # a 4-pixel lesion: 1 mm at 0.25 mm columns moves it by 4 pixels
    frame = _frame(labels, spacing=(0.25, 0.25))
    out = ceiling.frame_scores(_context(labels), frame, [0.0, 1.0], np.random.default_rng(0))
    assert out["prostate@0"] == pytest.approx(1.0) and out["lesion@0"] == pytest.approx(1.0)
    assert out["prostate@1"] < 0.9 and out["lesion@1"] < 0.5
    assert out["lesion_diameter_mm"] == pytest.approx(2 * math.sqrt(1.0 / math.pi))
    rows = ceiling.rows_of("B", [out, {**out, "lesion@0": math.nan, "lesion@1": math.nan,
                                       "lesion_diameter_mm": math.nan}], [0.0, 1.0])
    assert [r["lesion_frames"] for r in rows] == [1, 1] and rows[0]["frames"] == 2
    assert rows[1]["dice_prostate"] == pytest.approx(out["prostate@1"])


def test_bad_options_exit_2_with_the_value_named(ceiling, capsys):
    for argv, named in ((["--errors", "1,x"], "'1,x'"), (["--errors", "-1"], "'-1'"),
                        (["--errors", "nan"], "'nan'"), (["--errors", ""], "''"),
                        (["--frames", "0"], "--frames 0"), (["--level", "30"], "--level 30.0")):
        with pytest.raises(SystemExit) as stop:
            ceiling.main(["--a-seeds", "--b-seeds", *argv])
        assert stop.value.code == 2 and named in capsys.readouterr().err


def test_the_target_error_is_in_mm_and_the_margin_counts_only_shown_targets(scoring):
    labels = np.zeros((20, 20), np.uint8)
    labels[8:12, 8:12] = 2  # true lesion centroid (i, j) = (9.5, 9.5)
    frame = _frame(labels, spacing=(0.5, 0.25))
    true_plane = np.roll(labels, 2, axis=0)  # the MRI lesion two rows (1 mm) off
    shown = SimpleNamespace(target_ij=(13.5, 9.5), target_margin_mm=1.5, flagged=False)
    out = scoring.target_scores(shown, frame, true_plane)
    assert out["target_error_mm"] == pytest.approx(1.0)  # 4 columns x 0.25 mm
    assert out["target_in_margin"] == 1.0 and out["target_missing"] is False
    assert out["target_error_true_plane_mm"] == pytest.approx(1.0)  # 2 rows x 0.5 mm
    tight = scoring.target_scores(SimpleNamespace(target_ij=(13.5, 9.5), target_margin_mm=0.5,
                                                  flagged=False), frame, true_plane)
    assert tight["target_in_margin"] == 0.0
    flagged = scoring.target_scores(SimpleNamespace(target_ij=(13.5, 9.5), target_margin_mm=9.0,
                                                    flagged=True), frame, true_plane)
    assert math.isnan(flagged["target_in_margin"]) and flagged["target_error_mm"] == 1.0
    missing = scoring.target_scores(SimpleNamespace(target_ij=None, target_margin_mm=1.0,
                                                    flagged=False), frame, true_plane)
    assert missing["target_missing"] is True and math.isnan(missing["target_error_mm"])


def test_a_small_real_run_writes_rows_that_fall_with_the_error(ceiling, tmp_path):
    """Both simulators' frames, one case each: the ceiling at 0 mm is the true-plane Dice
    bench/accuracy.py reports, and 2 mm off is lower for the prostate in each family."""
    out = tmp_path / "ceiling.json"
    assert ceiling.main(["--a-seeds", "1000", "--b-seeds", "5000", "--frames", "2", "--errors",
                         "0,2", "--json", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["results"]}
    assert set(rows) == {"A 0 mm", "A 2 mm", "B 0 mm", "B 2 mm"} and data["level"] == 3.0
    for family in "AB":
        assert 0.5 < rows[f"{family} 0 mm"]["dice_prostate"] <= 1.0
        assert rows[f"{family} 2 mm"]["dice_prostate"] < rows[f"{family} 0 mm"]["dice_prostate"]
    assert len(data["records"]) == 4 and data["errors_mm"] == [0.0, 2.0]
