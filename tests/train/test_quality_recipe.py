"""QualityNet recipe pieces: the regression step learns, calibration meets its detection rule."""

import numpy as np
import torch

from regseg.models.qualitynet import QualityNet, QualityNetConfig
from regseg.train.quality import calibrate, detection, regression_step


def test_regression_step_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = QualityNet(QualityNetConfig(size=16, width=4))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(8, 4, 16, 16)
    target_mm = torch.linspace(0.5, 12.0, 8)
    losses = [regression_step(model, optimiser, x, target_mm) for _ in range(60)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_calibrated_threshold_flags_95_percent_of_bad_frames():
    rng = np.random.default_rng(0)
    tre = rng.uniform(0, 15, 2000)
    estimate = tre * rng.uniform(0.6, 1.4, tre.size)  # an estimator right to +-40 %
    threshold = calibrate(estimate, tre)["threshold_mm"]
    rates = detection(estimate, tre, threshold)
    assert rates["detection_tre_gt_5mm"] >= 0.95
    assert rates["false_alarm_tre_le_2mm"] < 0.2
