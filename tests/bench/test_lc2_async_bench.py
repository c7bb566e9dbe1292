"""The accuracy and trust benches run --lc2 async (the default since session 26) as ``lag``: the
same arithmetic in order, so their numbers do not depend on how fast this machine runs the frames
(bench/latency.py runs the CLI itself, worker thread and all)."""

from __future__ import annotations

import inspect

from regseg.stream.lc2_lag import in_order
from regseg.stream.lc2_stage import LC2_DEFAULT, build_lc2


def test_async_and_the_default_run_in_order():
    assert LC2_DEFAULT == "async" and in_order("default") == "lag"
    assert in_order("async") == "lag"
    assert [in_order(m) for m in ("on", "lag", "off", "warm")] == ["on", "lag", "off", "warm"]


def test_the_benches_build_their_stage_in_order(load_bench):
    accuracy, trust = load_bench("accuracy"), load_bench("trust")
    assert "in_order(lc2)" in inspect.getsource(accuracy.run)
    assert "in_order(args.lc2)" in inspect.getsource(trust)


def test_no_lc2_flag_reaches_the_stage_behind_the_lag():
    from regseg.sim.phantom import make_phantom
    from regseg.stream.context import build_context

    phantom = make_phantom(3100)
    lagged = build_lc2(build_context(phantom.mri, phantom.labels), "lag")
    assert lagged.unsupported(1.0)
    lagged.flag_unsupported = False  # what bench/trust.py --no-lc2-flag does
    assert not lagged.unsupported(1.0) and not lagged.stage.flag_unsupported
