"""bench/frame_size.py alternates the kernels and their torch twins per size and reports medians;
bench/latency.py's --frame-size keeps the field of view."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("frame_size")


def test_rounds_alternate_and_the_speedup_is_old_over_new(bench, monkeypatch, tmp_path):
    calls = []

    def fake(size, env, out):
        calls.append((size, dict(env)))
        twin = env.get("REGSEG_NUMBA_LABELS") == "0"
        p50 = (80.0 if twin else 40.0) + len(calls)  # rounds differ, as on a busy machine
        return {"p50_ms": p50, "fps": 20.0 if twin else 30.0,
                "stages_p50_ms": {"resegment": 18.0 if twin else 10.0, "total": p50 - 10}}

    monkeypatch.setattr(bench, "one_run", fake)
    monkeypatch.setattr(bench, "kernel_rows", lambda sizes: [{"name": "k", "kernel_ms": 1.0}])
    out = tmp_path / "f.json"
    assert bench.main(["--sizes", "480x640,256x256", "--rounds", "2", "--json", str(out)]) == 0
    assert [c[0] for c in calls] == ["480x640"] * 2 + ["256x256"] * 2 + ["480x640"] * 2 + \
        ["256x256"] * 2
    assert [c[1] for c in calls[:2]] == [{}, {"REGSEG_NUMBA_LABELS": "0"}]
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    new, old = rows["480x640 kernels"], rows["480x640 torch twins"]
    assert new["p50_ms_rounds"] == [41.0, 45.0] and new["p50_ms"] == 43.0
    assert old["p50_ms"] == 84.0 and new["speedup_p50"] == pytest.approx(84.0 / 43.0)
    assert new["resegment_ms"] == 10.0 and new["deformable_ms"] is None  # not measured: null


def test_latency_frame_size_keeps_the_field_of_view(load_bench):
    import argparse

    latency = load_bench("latency")
    ap = argparse.ArgumentParser()
    cfg = latency.scanner_config(ap, "480x640")
    assert cfg.frame_hw == (480, 640) and cfg.pixel_mm == pytest.approx(0.2 * 256 / 640)
    assert latency.scanner_config(ap, None).frame_hw == (256, 256)
    for bad in ("480", "10x640", "480xabc"):
        with pytest.raises(SystemExit):
            latency.scanner_config(ap, bad)


def test_kernel_rows_time_each_kernel_against_its_twin_on_the_same_labels(bench):
    rows = bench.kernel_rows(["40x56"], calls=2)
    assert [r["name"] for r in rows] == ["40x56 labels from logits",
                                         "40x56 MRI labels on the plane",
                                         "40x56 ... through a displacement"]
    assert all(r["same_labels"] is True and r["kernel_ms"] > 0 and r["twin_ms"] > 0
               for r in rows)


def test_a_bad_size_exits_before_any_run(bench, monkeypatch):
    monkeypatch.setattr(bench, "kernel_rows", lambda sizes: pytest.fail("ran"))
    for bad in ("480", "480x20", "axb", "480x640x3"):
        with pytest.raises(SystemExit):
            bench.main(["--sizes", bad])
