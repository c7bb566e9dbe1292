"""StreamStats: percentiles, fps, Dice aggregation and the JSON shape the README documents."""

import json
import math

from regseg.stream.stats import StreamStats, format_summary, percentiles, write_json


def test_percentiles_of_known_values():
    p = percentiles([float(v) for v in range(1, 101)])
    assert p["p50"] == 50.5 and p["max"] == 100.0
    assert 95.0 <= p["p95"] <= 96.0
    assert math.isnan(percentiles([])["p50"])


def test_summary_json_shape(tmp_path):
    stats = StreamStats()
    for i in range(10):
        stats.add({"model": 5.0 + i, "overlay": 1.0}, 10.0 + i, done_ns=i * 100_000_000)
        stats.add_accuracy({"prostate": 0.8, "lesion": math.nan, "registered_prostate": 0.9},
                           {"registered": 1.5})
    summary = stats.summary(skipped=3)
    assert summary["frames"] == 10 and summary["skipped"] == 3
    assert abs(summary["fps"] - 10.0) < 1e-6
    assert summary["dice"] == {"prostate": 0.8, "registered_prostate": 0.9}
    assert set(summary["stages_ms"]) == {"model", "overlay"}
    assert summary["latency_ms"]["max"] == 19.0
    path = tmp_path / "s.json"
    write_json(summary, path)
    loaded = json.loads(path.read_text())
    assert loaded["latency_ms"]["p50"] == 14.5
    assert "prostate 0.800" in format_summary(summary)
