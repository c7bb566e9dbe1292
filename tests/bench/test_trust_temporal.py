"""bench/trust_temporal.py: a causal filter of the error estimate, scored as trust.py scores the
flag; isolated spikes on good frames are filtered out, a persistent bad registration is not."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("trust_temporal")


def _row(seed, level, tre, est, flags=()):
    return {"seed": seed, "level_mm": level, "tre_mm": tre, "error_mm": est,
            "flags": list(flags) or (["error_estimate"] if est > 2.0 else []), "flagged": False}


def _trust():
    good = [_row(1, 0.0, 1.0, e) for e in (0.5, 0.6, 3.0, 0.5, 0.7, 0.6)]  # one isolated spike
    bad = [_row(1, 10.0, 9.0, e) for e in (6.0, 7.0, 1.0, 8.0)]  # one low estimate amid high
    jump = [_row(2, 0.0, 1.5, 0.4, flags=["jump"])]  # another cue: kept whatever the filter
    return {"threshold_mm": 2.0, "frames_detail": good + bad + jump}


def test_filters_score_as_expected(bench):
    rows, runs = bench.evaluate(_trust())
    by = {r["name"]: r for r in rows}
    shipped = by["per frame (shipped)"]
    assert shipped["bad_frames"] == 4 and shipped["good_frames"] == 7
    assert shipped["detection"] == pytest.approx(3 / 4)
    assert shipped["false_alarm"] == pytest.approx(2 / 7)  # the spike and the jump
    median3 = by["causal median of 3"]
    assert median3["detection"] == 1.0  # the low estimate sits between two high ones
    assert median3["false_alarm"] == pytest.approx(1 / 7)  # the spike is gone, the jump stays
    assert runs == [1]


def test_cli_writes_json_and_refuses_a_file_without_frames(bench, tmp_path, capsys):
    src = tmp_path / "trust.json"
    src.write_text(json.dumps(_trust()))
    out = tmp_path / "out.json"
    assert bench.main([str(src), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["name"] == "per frame (shipped)"
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"threshold_mm": 1.0}))
    with pytest.raises(SystemExit) as exc:
        bench.main([str(empty)])
    assert exc.value.code == 2 and "frames_detail" in capsys.readouterr().err
    for bad in ([1, 2], {"threshold_mm": 1.0, "frames_detail": [{"seed": 1}]}):
        empty.write_text(json.dumps(bad))
        with pytest.raises(SystemExit) as exc:
            bench.main([str(empty)])
        assert exc.value.code == 2 and "empty.json" in capsys.readouterr().err
