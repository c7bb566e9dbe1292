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


def test_calibration_report_splits_plain_and_randomised_pairs():
    from regseg.train.quality_live import calibration_report

    tre = np.array([1.0, 1.5, 8.0, 9.0, 1.0, 1.8, 7.0, 6.0])
    estimate = np.array([1.0, 1.2, 8.0, 9.0, 3.5, 1.0, 7.0, 2.0])  # biased on group 1
    group = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    report = calibration_report(estimate, tre, group, threshold=3.0)
    assert report["plain"]["detection_tre_gt_5mm"] == 1.0
    assert report["plain"]["false_alarm_tre_le_2mm"] == 0.0
    assert report["randomised"]["detection_tre_gt_5mm"] == 0.5
    assert report["randomised"]["false_alarm_tre_le_2mm"] == 0.5
    assert report["all"]["bad_frames"] == 4 and report["all"]["good_frames"] == 4


def test_normalised_qualitynet_ignores_gain_and_contrast_of_trus_and_mri():
    """normalise=True: a scanner's gain (x a, + b) on the TRUS channel and another MRI contrast
    give the same estimate; the label maps and the area outside the fan are kept."""
    from regseg.models.qualitynet import standardise

    torch.manual_seed(0)
    model = QualityNet(QualityNetConfig(size=16, width=4, normalise=True)).eval()
    x = torch.rand(3, 4, 16, 16) * 0.8 + 0.1
    x[:, :, :, :3] = 0.0  # outside the fan / the MRI
    x[:, 2:] = (x[:, 2:] > 0.5).float()
    y = x.clone()
    y[:, 0] = torch.where(x[:, 0] > 0, 0.5 * x[:, 0] + 0.2, 0.0)
    y[:, 1] = torch.where(x[:, 1] > 0, 1.7 * x[:, 1] + 0.05, 0.0)
    with torch.no_grad():
        assert torch.allclose(model(x), model(y), atol=1e-4)
        z = standardise(x[:, :2])
        assert (z[..., :3] == 0).all()
        inside = z[..., 3:]
        assert inside.mean().abs() < 1e-4 and (inside.std() - 1).abs() < 0.05
    plain = QualityNet(QualityNetConfig(size=16, width=4)).eval()
    with torch.no_grad():  # the default (and old checkpoints) see the raw intensities
        assert not torch.allclose(plain(x), plain(y), atol=1e-4)
