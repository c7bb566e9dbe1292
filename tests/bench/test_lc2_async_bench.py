"""bench/accuracy.py runs --lc2 async as ``lag``: the same arithmetic in order, so its numbers do
not depend on how fast this machine runs the frames (bench/latency.py passes async to the CLI)."""

from __future__ import annotations


def test_accuracy_runs_async_in_order(load_bench):
    accuracy = load_bench("accuracy")
    assert accuracy._in_order("async") == "lag"
    assert accuracy._in_order("on") == "on" and accuracy._in_order("lag") == "lag"
    assert accuracy._in_order("off") == "off"
