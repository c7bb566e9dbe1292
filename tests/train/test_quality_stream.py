"""The default chain's threshold from streams of it, for the whole flag (addendum 33)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from regseg.train.quality import MAX_ERROR_MM
from regseg.train.quality_stream import flag_rates, flag_threshold


def _pairs(rng, n=2000):
    tre = rng.uniform(0, 15, n)
    estimate = tre * rng.uniform(0.3, 1.5, n)
    other = (tre > 5) & (rng.random(n) < 0.6)  # other flags catch 60 % of the bad frames
    return estimate, tre, other


def test_whole_flag_catches_the_share_and_no_higher_threshold_would():
    rng = np.random.default_rng(0)
    estimate, tre, other = _pairs(rng)
    t = flag_threshold(estimate, tre, other)
    bad = tre > 5
    rates = flag_rates(estimate, tre, other, t)
    assert rates["detection_tre_gt_5mm"] >= 0.95
    assert ((estimate > t + 1e-3) | other)[bad].mean() < 0.95  # the largest such threshold
    # the other flags let the estimate flag less than it must alone
    alone = np.sort(estimate[bad])[math.floor(0.05 * bad.sum())]
    assert t > alone
    assert rates["other_flags_detection"] == pytest.approx(other[bad].mean(), abs=1e-4)


def test_other_flags_alone_enough_leaves_the_estimate_at_its_ceiling():
    tre = np.array([6.0] * 20 + [1.0] * 20)
    other = np.array([True] * 20 + [False] * 20)
    assert flag_threshold(np.zeros(40), tre, other) == MAX_ERROR_MM


def test_stream_frames_of_a_calibration_phantom_are_what_the_chain_made():
    from regseg.models.qualitynet import WEIGHTS
    from regseg.train.quality_stream import stream_samples

    d = stream_samples(3700, seed=0, weights=WEIGHTS, sequences=1, length=3)
    assert d["x"].shape == (3, 4, 64, 64) and d["x"].dtype == torch.float16
    assert d["other"].dtype == torch.bool and d["phantom"].tolist() == [3700] * 3
    assert torch.isfinite(d["tre_mm"]).all() and (d["tre_mm"] < 30).all()
    again = stream_samples(3700, seed=0, weights=WEIGHTS, sequences=1, length=3)
    assert torch.equal(d["tre_mm"], again["tre_mm"])  # reproducible


@pytest.mark.parametrize("method", ["streams", "streams-bound"])
def test_calibration_takes_the_default_chains_threshold_from_streams(tmp_path, monkeypatch,
                                                                     method):
    import regseg.train.quality_calibrate as qc
    from regseg.models.qualitynet import QualityNet, load_qualitynet, save_qualitynet
    from regseg.train.quality_chain import DEFAULT_CHAIN

    save_qualitynet(tmp_path / "qualitynet.pt", QualityNet(), {"threshold_mm": 9.0,
                                                               "margin_factor": 1.0})
    rng = np.random.default_rng(1)
    tre = torch.tensor(rng.uniform(0, 12, 400), dtype=torch.float32)
    estimate, s_tre, other = _pairs(rng, 600)
    stream = {"x": torch.zeros(600, 4, 8, 8), "tre_mm": torch.tensor(s_tre, dtype=torch.float32),
              "other": torch.tensor(other), "phantom": torch.arange(600) // 20 + 3700}

    def fake_predict(model, x):
        return estimate if len(x) == 600 else tre.numpy()

    monkeypatch.setattr(qc, "calibration_pairs", lambda args, weights, chain: {
        "x": torch.zeros(400, 4, 8, 8), "tre_mm": tre, "group": torch.zeros(400, dtype=torch.long),
        "phantom": torch.arange(400) // 50 + 3100})
    monkeypatch.setattr(qc, "cached_streams", lambda *a, **k: stream)
    monkeypatch.setattr(qc, "predict_x", fake_predict)
    args = argparse.Namespace(out=tmp_path, threads=1, calib_seeds="3100-3107", frames=50,
                              calib_frames=None, randomised_calib_phantoms=0,
                              randomised_calib_frames=None, randomised_frames=25, cache=None,
                              seed=0, default_chain_on=method)
    qc.calibrate_chains(args, tmp_path / "qualitynet.pt", [DEFAULT_CHAIN], "test")
    _, cal = load_qualitynet(tmp_path / "qualitynet.pt")
    point = flag_threshold(estimate, s_tre, other)
    report = json.loads((tmp_path / "qualitynet.json").read_text())["chain_calibration"]
    interval = report["by_chain"][DEFAULT_CHAIN]["interval"]
    expected = point if method == "streams" else interval["threshold_mm_p5"]
    assert cal["threshold_mm"] == expected == cal["by_chain"][DEFAULT_CHAIN]["threshold_mm"]
    assert cal["by_chain"][DEFAULT_CHAIN]["method"] == method
    streams = report["by_chain"][DEFAULT_CHAIN]["streams"]
    assert streams["point_threshold_mm"] == point and streams["frames"] == 600
    assert streams["detection_tre_gt_5mm"] >= 0.95 and interval["phantoms"] == 30
    if method == "streams-bound":  # a lower threshold: flags more, never fewer
        assert expected <= point
