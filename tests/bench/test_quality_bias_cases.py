"""bench/quality_bias_cases.py: the rank AUC, the splits and the case draw it reads."""

import numpy as np
import pytest


def test_rank_auc_is_the_mann_whitney_share(load_bench):
    bench = load_bench("quality_bias_cases")
    assert bench.rank_auc([3, 4], [1, 2]) == 1.0
    assert bench.rank_auc([1, 2], [3, 4]) == 0.0
    assert bench.rank_auc([1, 3], [2, 2]) == pytest.approx(0.5)
    assert np.isnan(bench.rank_auc([], [1.0]))


def test_split_uses_flags_as_they_are_and_numbers_at_their_median(load_bench):
    bench = load_bench("quality_bias_cases")
    cases = [{"properties": {"endfire": e, "fov_mm": f}, "bias_all_median_mm": b}
             for e, f, b in [(1, 40, 2.0), (1, 50, 1.5), (0, 60, 0.1), (0, 70, -0.2), (0, 80, 0.0)]]
    flag = bench.split_report(cases, "endfire")
    assert (flag["n_upper"], flag["n_lower"]) == (2, 3)
    assert flag["bias_upper_mm"] == pytest.approx(1.75) and flag["auc_upper_larger"] == 1.0
    fov = bench.split_report(cases, "fov_mm")  # median 60: upper = 70, 80
    assert (fov["n_upper"], fov["n_lower"]) == (2, 3) and fov["auc_upper_larger"] < 0.5


def test_case_properties_are_the_randomised_draw(load_bench):
    from regseg.train.data import open_randomised_scanner

    bench = load_bench("quality_bias_cases")
    props = bench.case_properties(3300, 3307)
    _, scanner = open_randomised_scanner(3300, 3307)
    cfg = scanner.cfg if hasattr(scanner, "cfg") else scanner.config
    assert props["pixel_mm"] == pytest.approx(cfg.pixel_mm)
    assert props["endfire"] == float(cfg.array == "endfire")
    assert props["linear"] == float(cfg.linear_width_mm > 0)
