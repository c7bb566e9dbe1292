"""bench/seg_context.py: each context's labels are scored against the truth, and the rows average
what the frames say."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from regseg.types import Frame, GroundTruth


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("seg_context")


def test_frame_dice_scores_each_context_against_the_truth(bench):
    truth = np.zeros((8, 8), np.uint8)
    truth[2:6, 2:6] = 1
    truth[3, 3] = 2
    frame = Frame(seq=0, acquired_ns=0, pixels=np.zeros((8, 8), np.uint8), spacing_mm=(1.0, 1.0),
                  image_to_reference=np.eye(4),
                  truth=GroundTruth(image_to_mri=np.eye(4) * 2, labels=truth))
    shifted = np.roll(truth, 2, axis=1)
    result = SimpleNamespace(frame=frame, labels=shifted, warped_labels=truth)
    pipeline = SimpleNamespace(plane=lambda f: np.eye(4))
    asked = []

    def segment_at(plane):
        asked.append(plane)
        return truth if plane[0, 0] == 2 else np.zeros_like(truth)  # right only at the truth

    out = bench.frame_dice(result, pipeline, segment_at)
    assert asked[0][0, 0] == 2 and asked[1][0, 0] == 1  # the true plane, then the tracked one
    assert out["true_plane_prostate"] == 1.0 and out["registered_prostate"] == 1.0
    assert out["tracked_prostate"] == 0.0
    assert 0.0 < out["published_prostate"] < 1.0
    assert out["true_plane_lesion"] == 1.0 and out["published_lesion"] == 0.0


def test_summarise_averages_per_family_and_ignores_frames_without_a_lesion(bench):
    def rec(family, value, lesion):
        r = {"family": family}
        for name in bench.CONTEXTS:
            r[f"{name}_prostate"], r[f"{name}_lesion"] = value, lesion
        return r

    records = [rec("B", 0.8, math.nan), rec("B", 0.6, 0.5), rec("A", 0.9, 0.7)]
    row = bench.summarise("B", records)
    assert row["frames"] == 2 and row["published_prostate"] == pytest.approx(0.7)
    assert row["true_plane_lesion"] == pytest.approx(0.5)
