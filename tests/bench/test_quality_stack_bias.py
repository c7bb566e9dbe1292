"""bench/quality_stack_bias.py: the per-group bias and flag rates, on made-up estimates."""

import numpy as np
import pytest


def test_group_row_counts_and_rates(load_bench):
    bench = load_bench("quality_stack_bias")
    tre = np.array([0.5, 1.0, 1.5, 3.0, 6.0, 8.0])
    est = np.array([1.5, 0.5, 3.5, 3.0, 7.0, 1.0])
    row = bench.group_row(est, tre, np.ones(6, bool), threshold=2.0)
    assert (row["frames"], row["good"], row["bad"]) == (6, 3, 2)
    assert row["bias_good_median_mm"] == pytest.approx(1.0)  # biases 1.0, -0.5, 2.0
    assert row["false_alarm_good"] == pytest.approx(1 / 3)
    assert row["detection_bad"] == pytest.approx(0.5)
    empty = bench.group_row(est, tre, np.zeros(6, bool), threshold=2.0)
    assert empty["frames"] == 0 and empty["bias_good_median_mm"] is None
