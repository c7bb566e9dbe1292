"""One timestamp rule for every source (issue 17 item 6: frame 0 was wall clock, later frames the
simulator's or file's relative time, so published timestamps jumped by ~56 years)."""

import time

import pytest

from regseg.clock import EPOCH_MIN_S, SenderClock


def test_epoch_timestamps_pass_unchanged():
    clock = SenderClock()
    assert clock(1_700_000_000.25) == 1_700_000_000.25
    assert clock(1_700_000_001.25) == 1_700_000_001.25


def test_relative_timestamps_are_anchored_to_the_wall_clock_at_the_first():
    clock = SenderClock()
    before = time.time()
    first = clock(0.0)  # a relative clock starting at 0 is a timestamp, not a missing one
    assert before - 1 <= first <= time.time() + 1
    assert clock(1 / 30) - first == pytest.approx(1 / 30)
    assert clock(12.5) - first == pytest.approx(12.5)
    assert clock(12.5) >= EPOCH_MIN_S


def test_missing_timestamps_give_zero_for_the_sink_to_replace():
    clock = SenderClock()
    for missing in (None, -1.0, float("nan"), float("inf")):
        assert clock(missing) == 0.0
