"""bench/follows_segmentation.py: the centroid offsets and their correlation, on made-up masks."""

import math

import numpy as np


def test_centroid_offset_is_in_mm_rows_then_columns(load_bench):
    bench = load_bench("follows_segmentation")
    truth = np.zeros((40, 50), bool)
    truth[10:20, 10:20] = True
    moved = np.zeros_like(truth)
    moved[13:23, 6:16] = True  # 3 rows down, 4 columns left
    assert np.allclose(bench.centroid_offset_mm(moved, truth, 0.5), [1.5, -2.0])
    assert np.isnan(bench.centroid_offset_mm(np.zeros_like(truth), truth, 0.5)).all()


def test_correlation_and_summary_follow_the_offsets(load_bench):
    bench = load_bench("follows_segmentation")
    rng = np.random.default_rng(0)
    seg = rng.normal(size=(30, 2))
    follows = 0.9 * seg + 0.1 * rng.normal(size=(30, 2))
    assert bench.correlation(seg, follows) > 0.95
    assert abs(bench.correlation(seg, rng.normal(size=(30, 2)))) < 0.5
    seg[0] = np.nan  # an empty segmentation is left out, not propagated
    assert math.isfinite(bench.correlation(seg, follows))
    rows = [{"case": 7, "segmented_mm": s, "registered_mm": r, "dice_segmented": 0.9,
             "gland_fraction": 0.1} for s, r in zip(seg, follows, strict=True)]
    out = bench.summarise(rows)
    assert out["frames"] == 30 and out["cases"][0]["name"] == "7"
    assert math.isclose(out["cases"][0]["registered_col_mm"], float(np.mean(follows[:, 1])))
