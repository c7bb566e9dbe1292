"""The calibration phantoms of QualityNet's thresholds, and the bootstrap interval over phantoms."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from regseg.errors import InputError
from regseg.train.quality import calibrate
from regseg.train.quality_sets import (
    CALIB_SEEDS_DEFAULT,
    blocks,
    calib_seeds,
    parse_seeds,
    threshold_interval,
)


def test_default_set_is_forty_calibration_phantoms_in_two_runs():
    seeds = parse_seeds(CALIB_SEEDS_DEFAULT)
    assert len(seeds) == 40 and seeds[:8] == list(range(3100, 3108))
    assert blocks(seeds) == [list(range(3100, 3108)), list(range(3700, 3732))]


def test_seeds_and_ranges_parse_in_order():
    assert parse_seeds("3105, 3100-3102") == [3105, 3100, 3101, 3102]
    assert blocks([3105, 3100, 3101, 3102, 3104]) == [[3105], [3100, 3101, 3102], [3104]]
    # the recipe's older option where --calib-seeds is absent (e.g. a Namespace of old code)
    assert calib_seeds(argparse.Namespace(calib_phantoms=3)) == [3100, 3101, 3102]
    assert calib_seeds(argparse.Namespace(calib_seeds="3700-3701", calib_phantoms=8)) == [3700,
                                                                                         3701]


@pytest.mark.parametrize(("spec", "says"), [
    ("31OO-3107", "'31OO-3107' is not a seed or a range"),
    ("3107-3100", "ends before it starts"),
    ("3000-3010", "seed 3000 is not a plain family-A calibration phantom"),  # training
    ("1000", "seed 1000 is not"),  # evaluation
    ("3250", "seed 3250 is not"),  # randomised training
    ("3100-3102,3102", "appears twice"),
])
def test_bad_seed_sets_are_refused_naming_the_part(spec, says):
    with pytest.raises(InputError, match="--calib-seeds") as err:
        parse_seeds(spec)
    assert says in str(err.value)


def test_quality_calibration_cli_refuses_a_training_phantom_before_any_work(tmp_path, capsys):
    from regseg.train.quality_calibrate import main

    (tmp_path / "qualitynet.pt").write_bytes(b"not read: the seeds are checked first")
    assert main(["--out", str(tmp_path), "--calib-seeds", "3090-3110"]) == 2
    assert "seed 3090" in capsys.readouterr().err


def _clustered(rng, phantoms=20, per=50):
    """Pairs whose bad estimates differ by phantom: a few phantoms' bad pairs read low."""
    tre, est, ph = [], [], []
    for p in range(phantoms):
        t = rng.uniform(0, 12, per)
        low = p % 5 == 0  # every fifth phantom's estimate reads a third of the error
        est.append(t * (0.33 if low else 1.0) + rng.normal(0, 0.2, per))
        tre.append(t)
        ph.append(np.full(per, 4000 + p))
    return np.concatenate(est), np.concatenate(tre), np.concatenate(ph)


def test_interval_covers_the_threshold_and_widens_with_clustered_phantoms():
    rng = np.random.default_rng(3)
    est, tre, ph = _clustered(rng)
    out = threshold_interval(est, tre, ph, draws=300)
    t = calibrate(est, tre)["threshold_mm"]
    assert out["phantoms"] == 20 and out["draws"] == 300
    assert out["threshold_mm_p5"] <= t <= out["threshold_mm_p95"]
    assert out["threshold_mm_p95"] - out["threshold_mm_p5"] > 0.5  # it moves with the phantoms
    assert out["detection_p5"] < 0.95 <= out["detection_p50"] + 0.02
    assert out["detection_at_mm"] == t
    # at the draws' 5th percentile (a 95 % bound), >= 95 % is kept in >= 95 % of the draws
    bound = threshold_interval(est, tre, ph, draws=300, at_p5=True)
    assert bound["detection_at_mm"] == bound["threshold_mm_p5"] == out["threshold_mm_p5"] <= t
    assert bound["detection_p5"] >= 0.949
    # the same pairs without the clusters (every phantom reads alike): a narrow interval
    same = threshold_interval(tre + rng.normal(0, 0.2, len(tre)), tre, ph, draws=300)
    assert same["threshold_mm_p95"] - same["threshold_mm_p5"] < 0.5


def test_interval_is_nan_without_bad_pairs_and_reproducible():
    tre = np.linspace(0, 4, 100)
    out = threshold_interval(tre, tre, np.repeat(np.arange(10), 10), draws=20)
    assert out["draws"] == 0 and np.isnan(out["threshold_mm_p50"])
    rng = np.random.default_rng(5)
    est, tre, ph = _clustered(rng, phantoms=8)
    assert threshold_interval(est, tre, ph, draws=50) == threshold_interval(est, tre, ph,
                                                                            draws=50)


def test_quality_live_refuses_a_bad_seed_set_before_any_work(tmp_path, capsys):
    from regseg.train.quality_live import main

    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path), "--calib-seeds", "1000-1003"])
    assert exit_.value.code == 2
    assert "seed 1000 is not a plain family-A calibration phantom" in capsys.readouterr().err
