"""QualityNet recipe pieces: the regression step learns, calibration meets its detection rule."""

import json

import numpy as np
import pytest
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


def test_chain_calibration_stores_one_threshold_per_chain(tmp_path, monkeypatch):
    """regseg.train.quality_calibrate: each chain gets the threshold that flags >= 95 % of its
    own bad calibration frames; the default chain's is also the top-level one; a chain not
    recalibrated keeps its calibration."""
    import argparse

    import regseg.train.quality_calibrate as qc
    from regseg.models.qualitynet import load_qualitynet, save_qualitynet
    from regseg.train.quality_chain import DEFAULT_CHAIN

    model = QualityNet(QualityNetConfig(size=16, width=4))
    save_qualitynet(tmp_path / "qualitynet.pt", model, {
        "threshold_mm": 9.0, "margin_factor": 1.0,
        "by_chain": {"K3/deformable-off/multi-start-off": {"threshold_mm": 7.0,
                                                           "margin_factor": 1.5}}})
    rng = np.random.default_rng(1)
    tre = torch.tensor(rng.uniform(0, 12, 400), dtype=torch.float32)
    bias = {"K1/deformable-on/multi-start-off": 0.5, DEFAULT_CHAIN: 2.0}  # estimate = tre * bias

    chosen = {}

    def fake_pairs(args, weights, chain):
        chosen["bias"] = bias[chain]
        return {"x": torch.zeros(len(tre), 4, 16, 16), "tre_mm": tre,
                "group": torch.zeros(len(tre), dtype=torch.long),
                "phantom": torch.arange(len(tre)) // 50 + 3100}

    def fake_predict(model, x):
        return tre.numpy() * chosen["bias"]

    monkeypatch.setattr(qc, "calibration_pairs", fake_pairs)
    monkeypatch.setattr(qc, "predict_x", fake_predict)
    args = argparse.Namespace(out=tmp_path, threads=1, calib_seeds="3100-3107", frames=50,
                              default_chain_on="frames",
                              calib_frames=None, randomised_calib_phantoms=0,
                              randomised_calib_frames=None, randomised_frames=25)
    qc.calibrate_chains(args, tmp_path / "qualitynet.pt", list(bias), "test")
    _, cal = load_qualitynet(tmp_path / "qualitynet.pt")
    assert cal["chain"] == DEFAULT_CHAIN
    for chain, b in bias.items():  # >= 95 % of TRE > 5 mm flagged: threshold <= ~b * 5.35
        t = cal["by_chain"][chain]["threshold_mm"]
        assert detection(tre.numpy() * b, tre.numpy(), t)["detection_tre_gt_5mm"] >= 0.95
        assert 4.5 * b < t < 6.0 * b
    assert cal["threshold_mm"] == cal["by_chain"][DEFAULT_CHAIN]["threshold_mm"]
    assert cal["by_chain"]["K3/deformable-off/multi-start-off"]["threshold_mm"] == 7.0
    summary = json.loads((tmp_path / "qualitynet.json").read_text())["chain_calibration"]
    assert summary["calibration_sets"]["plain_seeds"] == [[3100, 3107]]
    for chain in bias:  # each calibration says how far its threshold moves with the phantoms
        interval = summary["by_chain"][chain]["interval"]
        assert interval["phantoms"] == 8 and interval["draws"] > 0
        assert interval["threshold_mm_p5"] <= cal["by_chain"][chain]["threshold_mm"] + 1e-3


def test_chain_calibration_refuses_bad_input_before_any_work(tmp_path, capsys):
    from regseg.train.quality_calibrate import main

    assert main(["--out", str(tmp_path), "--chains", "K2/deformable-on"]) == 2
    assert "--chains 'K2/deformable-on'" in capsys.readouterr().err
    assert main(["--out", str(tmp_path)]) == 2
    assert "no such QualityNet checkpoint" in capsys.readouterr().err


def test_appearance_augment_changes_only_the_trus_channel():
    from regseg.train.quality import augment

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 4, 32, 32, generator=g)
    x[:, 2:] = (x[:, 2:] > 0.5).float()
    target = torch.full((16,), 3.0)
    a, ta = augment(x, target, torch.Generator().manual_seed(1), noise_fraction=0.0,
                    appearance=True)
    b, tb = augment(x, target, torch.Generator().manual_seed(1), noise_fraction=0.0)
    assert torch.equal(ta, target) and torch.equal(tb, target)
    # MRI and label channels are only flipped, never changed in value
    for out in (a, b):
        same = [torch.equal(out[n, 1:], x[n, 1:]) or torch.equal(out[n, 1:], x[n, 1:].flip(-1))
                for n in range(16)]
        assert all(same)
    assert not torch.equal(a[:, :1], b[:, :1])  # the TRUS channel differs with appearance


def test_tre_balancing_gives_every_group_the_pooled_tre_distribution():
    from regseg.train.quality_live import TRE_BINS_MM, tre_balancing_weights

    rng = np.random.default_rng(0)
    plain = torch.tensor(rng.gamma(2.0, 0.8, 3000), dtype=torch.float32)  # mostly small errors
    rand = torch.tensor(rng.gamma(3.0, 1.2, 2000), dtype=torch.float32)  # larger errors
    tre, group = torch.cat([plain, rand]), torch.cat([torch.zeros(3000), torch.ones(2000)]).long()
    w = tre_balancing_weights(tre, group)
    assert float(w[group == 0].sum()) == pytest.approx(3000) and float(w.min()) >= 0
    bins = torch.bucketize(tre, torch.tensor(TRE_BINS_MM))
    pooled = torch.bincount(bins, minlength=7).double() / len(tre)
    for g in (0, 1):
        m = group == g
        weighted = torch.bincount(bins[m], weights=w[m], minlength=7) / w[m].sum()
        has = torch.bincount(bins[m], minlength=7) > 0  # a bin a group never reaches stays empty
        target = torch.where(has, pooled, 0.0)
        assert torch.allclose(weighted, target / target.sum(), atol=1e-9)
    # unweighted, the groups differ: the check above is not trivially true
    share0 = torch.bincount(bins[group == 0], minlength=7).double() / 3000
    assert float((share0 - pooled).abs().max()) > 0.05


def test_balance_tre_without_randomised_pairs_is_refused_before_any_work(tmp_path, capsys):
    from regseg.train.quality_live import main

    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path), "--balance-tre", "--cache", str(tmp_path / "cache")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--balance-tre" in err and "--randomised-live-phantoms" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "qualitynet.json").exists()


def test_cached_live_pairs_are_named_by_chain_and_lc2_revision(tmp_path, monkeypatch):
    """A chain's cached pairs are its own: the chain's name, and for a chain with the image-based
    refinement a revision of its implementation from 2 on, are in the file name, so a
    recalibration after a change of the refinement never reuses the pairs it made before."""
    import regseg.train.quality_live as ql

    made = []

    def live_samples(seeds, frames, **kw):
        made.append(kw["chain"])
        return {"x": torch.zeros(1)}

    monkeypatch.setattr(ql, "live_samples", live_samples)
    monkeypatch.setattr(ql, "_alignsegnet_id", lambda: "a")
    monkeypatch.setattr(ql, "_plcreg2d_id", lambda: "p")
    lc2_chain = "K2/deformable-on/multi-start-off/lc2-on"
    monkeypatch.setattr(ql, "LC2_REVISION", 1)
    for chain in (ql.UNNAMED_CACHE_CHAIN, lc2_chain, lc2_chain):
        ql.cached_live(tmp_path, [3100], 2, seed=0, weights=tmp_path, chain=chain)
    assert made == [ql.UNNAMED_CACHE_CHAIN, lc2_chain]  # the second lc2 call read the cache
    monkeypatch.setattr(ql, "LC2_REVISION", 2)  # session 17: the significance guard
    ql.cached_live(tmp_path, [3100], 2, seed=0, weights=tmp_path, chain=lc2_chain)
    assert made[-1] == lc2_chain and len(made) == 3  # a new revision: made again
    names = sorted(p.name for p in tmp_path.glob("quality-live-*.pt"))
    assert len(names) == 3
    assert any(n.endswith("-lc2-on-3100-1-2-0-a-p.pt") for n in names), names
    assert any(n.endswith("-lc2-on-r2-3100-1-2-0-a-p.pt") for n in names), names
    assert any("deformable-on" not in n for n in names), names  # the unnamed one


def test_stage_one_trains_on_restyled_pairs_beside_the_plain_ones(tmp_path):
    from regseg.train import quality

    summary = quality.train(tmp_path, minutes=1.0, seed=0, train_phantoms=1, calib_phantoms=2,
                            frames=2, errors=4, threads=1, cache_dir=None, command="test",
                            restyled_phantoms=1, steps=3)
    assert summary["steps"] == 3 and summary["restyled_phantoms"] == 1
    assert summary["train_samples"] == 2 * (2 * 4)  # one plain and one restyled phantom
    assert (tmp_path / "qualitynet.pt").is_file()
