"""`regseg train affine3d`: one step writes loadable weights and a summary; the truth it trains
on is the affine that aligns the pair."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from regseg.cli import main
from regseg.models.reg_losses import mind_loss
from regseg.models.registry import load_model
from regseg.sim import mni
from regseg.train.affine3d import (
    AffineRange,
    brain_points,
    make_training_pair,
    point_error_mm,
)


def test_training_truth_aligns_the_pair():
    base = mni.load_base()
    pair = make_training_pair(base, brain_points(base), [7, 0, 0, 318],
                              AffineRange(20.0, 0.15, 20.0), (24, 32, 24))
    points = torch.cat([pair.points, torch.ones(len(pair.points), 1)], 1)
    truth = torch.linalg.lstsq(points, pair.targets).solution.T  # (3, 4): exact, affine truth
    extent = torch.tensor([48, 64, 48.0]) * 3.25
    assert float(point_error_mm(truth, pair, extent)) < 1e-3
    assert float(point_error_mm(torch.eye(3, 4), pair, extent)) > 3.0

    def mind_at(theta):
        grid = F.affine_grid(theta[None], list(pair.fixed.shape), align_corners=False)
        return float(mind_loss(pair.fixed, F.grid_sample(pair.moving, grid,
                                                         align_corners=False)))

    assert mind_at(truth) < mind_at(torch.eye(3, 4))


def test_one_step_writes_weights_and_summary(tmp_path):
    rc = main(["train", "affine3d", "--out", str(tmp_path), "--steps", "1", "--batch-size", "1",
               "--val-pairs", "1", "--no-progress", "--checkpoint-every", "0"])
    assert rc == 0
    summary = json.loads((tmp_path / "affine3d.json").read_text())
    assert summary["steps"] == 1 and summary["train_moving_range"]["rotation_deg"] == 20.0
    assert np.isfinite(summary["validation"]["learned_mm"])
    model = load_model(tmp_path / "affine3d.pt")
    assert model.config.size == (24, 32, 24)


def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Stopped by an error after its step-1 state, then resumed: the same weights as 2 steps in
    one go, and the summary counts both."""
    import pytest

    from regseg.train import affine3d

    args = ["train", "affine3d", "--batch-size", "1", "--val-pairs", "0", "--no-progress",
            "--checkpoint-every", "1", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    real = affine3d.make_training_pair

    def crash_at_step_1(base, brain, stream, *rest):
        if stream[1] == 1:  # drawing step 1's pair: step 0 is done and its state written
            raise RuntimeError("simulated crash")
        return real(base, brain, stream, *rest)

    monkeypatch.setattr(affine3d, "make_training_pair", crash_at_step_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*args, "--out", str(tmp_path / "b")])
    monkeypatch.setattr(affine3d, "make_training_pair", real)
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert json.loads((tmp_path / "b" / "affine3d.json").read_text())["steps"] == 2
    one = load_model(tmp_path / "a" / "affine3d.pt").state_dict()
    two = load_model(tmp_path / "b" / "affine3d.pt").state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
