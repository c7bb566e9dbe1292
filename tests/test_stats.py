"""StreamStats: percentiles, fps, Dice aggregation and the JSON shape the README documents."""

import json
import math

import numpy as np

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
    assert "cores" in loaded["machine"] and loaded["date"].endswith("UTC")  # where and when
    assert len(loaded["load_average"]) == 3  # beside what (other jobs on the cores)
    assert "prostate 0.800" in format_summary(summary)


def test_series_is_exact_until_the_reservoir_fills():
    from regseg.stream.stats import Series

    s = Series(size=1000)
    values = np.random.default_rng(1).gamma(2.0, 5.0, size=1000)
    for v in values:
        s.add(float(v))
    exact = percentiles(values)
    assert s.percentiles() == exact
    assert abs(s.mean() - values.mean()) < 1e-9


def test_memory_bounded_and_percentiles_close_over_a_million_frames():
    """1e6 adds (a 9-hour case at 30 fps): the kept sample stays at the reservoir size, counts,
    mean and max stay exact and p50/p95/p99 stay within 0.5 percentile ranks of the exact ones."""
    from regseg.stream.stats import RESERVOIR_SIZE, Series

    rng = np.random.default_rng(0)
    n = 1_000_000
    latency = rng.lognormal(mean=3.0, sigma=0.4, size=n)  # skewed, like real latencies
    series = Series()
    for v in latency.tolist():
        series.add(v)
    assert series.sample.size == RESERVOIR_SIZE and series.count == n
    assert series.sample.nbytes == RESERVOIR_SIZE * 8  # the same 80 kB after 1e6 values
    assert abs(series.mean() - latency.mean()) < 1e-6 * latency.mean()
    p = series.percentiles()
    assert p["max"] == round(latency.max(), 3)
    for q, key in ((50, "p50"), (95, "p95"), (99, "p99")):
        rank = (latency < p[key]).mean() * 100  # where the estimate sits in the exact distribution
        assert abs(rank - q) < 0.5, (key, p[key], rank)
    stats = StreamStats()  # the status line keeps the last 100 latencies, no more
    for i in range(1000):
        stats.add({"model": 1.0}, float(i), done_ns=i)
    assert list(stats.recent_latency_ms) == [float(i) for i in range(900, 1000)]


def test_failed_frames_in_summary_and_status():
    stats = StreamStats()
    stats.add({"model": 1.0}, 2.0, done_ns=0)
    stats.failed = 2
    assert stats.summary()["failed_frames"] == 2
    assert "failed 2" in stats.status_line() and "failed 2" in format_summary(stats.summary())


def test_summary_of_zero_and_one_frame_prints_no_nan():
    """Issue 17 item 6: `fps nan` and a table of NaN latencies for runs of 0-1 frames."""
    stats = StreamStats()
    text = format_summary(stats.summary())
    assert "nan" not in text.lower() and "no frame was processed" in text
    assert "n/a" in stats.status_line() and "nan fps" not in stats.status_line()
    stats.add({"model": 5.0}, 10.0, done_ns=0)
    text = format_summary(stats.summary())
    assert "fps n/a (a rate needs 2 frames)" in text and "end-to-end" in text
