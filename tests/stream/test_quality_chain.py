"""The flag threshold is the one calibrated on the chain that runs (issue 16): a QualityCheck picks
the calibration of its Pipeline's chain, warns and takes the lowest threshold when there is none,
and the shipped checkpoint carries a calibration for the chain regseg-stream runs by default."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from regseg.models.qualitynet import (
    WEIGHTS,
    QualityNet,
    QualityNetConfig,
    chain_key,
    load_qualitynet,
    save_qualitynet,
)
from regseg.stream.quality import QualityCheck, QualityConfig, pipeline_chain
from regseg.train.quality_chain import DEFAULT_CHAIN, GRID, chain_features, parse_chain

CONTEXT = SimpleNamespace(mri=torch.zeros(1))  # all the estimator needs of a context to load


def checkpoint(tmp_path, calibration: dict):
    path = tmp_path / "q.pt"
    save_qualitynet(path, QualityNet(QualityNetConfig(size=16, width=4)), calibration)
    return path


BY_CHAIN = {"K2/deformable-on/multi-start-off": {"threshold_mm": 1.8, "margin_factor": 2.3},
            "K1/deformable-on/multi-start-off": {"threshold_mm": 2.5, "margin_factor": 2.9}}


def test_chain_keys_round_trip_and_bad_ones_are_refused():
    assert parse_chain(chain_key(3, False, True)) == (3, False, True)
    assert DEFAULT_CHAIN in GRID
    with pytest.raises(Exception, match="K<iterations>"):
        parse_chain("K2/deformable/multi-start-off")


def test_check_uses_the_calibration_of_its_chain(tmp_path, caplog):
    path = checkpoint(tmp_path, {"threshold_mm": 1.8, "margin_factor": 2.3,
                                 "chain": "K2/deformable-on/multi-start-off",
                                 "by_chain": BY_CHAIN})
    with caplog.at_level(logging.WARNING):
        check = QualityCheck(CONTEXT, QualityConfig(weights=path),
                             chain="K1/deformable-on/multi-start-off")
    assert check.threshold_mm == 2.5 and check.margin_factor == 2.9
    assert check.calibration_info["matched"] is True
    assert not caplog.records


def test_unknown_chain_warns_and_takes_the_lowest_threshold(tmp_path, caplog):
    path = checkpoint(tmp_path, {"threshold_mm": 1.8, "margin_factor": 2.3,
                                 "chain": "K2/deformable-on/multi-start-off",
                                 "by_chain": BY_CHAIN})
    with caplog.at_level(logging.WARNING):
        check = QualityCheck(CONTEXT, QualityConfig(weights=path),
                             chain="K5/deformable-on/multi-start-off")
    assert check.threshold_mm == 1.8 and check.margin_factor == 2.9
    assert check.calibration_info["matched"] is False
    assert any("no calibration for the chain K5" in r.getMessage() for r in caplog.records)


def test_checkpoint_without_chains_warns_unless_the_threshold_is_given(tmp_path, caplog):
    path = checkpoint(tmp_path, {"threshold_mm": 2.56, "margin_factor": 2.3})
    with caplog.at_level(logging.WARNING):
        QualityCheck(CONTEXT, QualityConfig(weights=path), chain=DEFAULT_CHAIN)
    assert any("does not say which chain" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check = QualityCheck(CONTEXT, QualityConfig(weights=path, error_threshold_mm=4.0),
                             chain=DEFAULT_CHAIN)
    assert check.threshold_mm == 4.0 and not caplog.records


def test_pipeline_binds_its_chain():
    capture = SimpleNamespace(refine_iterations=3, multi_start=None)
    assert pipeline_chain(SimpleNamespace(capture=capture, deformable=None)) == \
        "K3/deformable-off/multi-start-off"
    assert pipeline_chain(SimpleNamespace(capture=SimpleNamespace(
        refine_iterations=2, multi_start=object()), deformable=object())) == \
        "K2/deformable-on/multi-start-on"


def test_shipped_checkpoint_is_calibrated_for_the_default_chain():
    _, cal = load_qualitynet(WEIGHTS)
    assert cal["chain"] == DEFAULT_CHAIN
    assert cal["threshold_mm"] == cal["by_chain"][DEFAULT_CHAIN]["threshold_mm"]
    assert set(GRID) <= set(cal["by_chain"])


def test_chain_features_of_a_result_without_deformable_stage():
    warped = np.zeros((20, 20), np.uint8)
    warped[5:15, 5:15] = 1
    labels = np.zeros_like(warped)
    labels[5:15, 5:10] = 1
    result = SimpleNamespace(warped_labels=warped, labels=labels, ddf=None, quality=0.67,
                             seg_confidence=0.9,
                             frame=SimpleNamespace(spacing_mm=(0.5, 0.25)))
    f = chain_features(None, result)
    assert f[:3] == [0.0, 0.0, 1.0] and f[3] == 0.67 and f[5] == pytest.approx(2.0)
    assert np.isfinite(f).all()
