"""`regseg batch`: manifests checked up front, a bad case recorded and skipped, finished cases
never redone (also across a change of rank count), 2 torchrun ranks sharing the cases."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from regseg.batch.manifest import case_digest, read_manifest
from regseg.batch.shard import shard
from regseg.cli import main
from regseg.errors import InputError
from regseg.models.checkpoint import save_checkpoint
from regseg.models.plcreg import PLCReg, PLCRegConfig

SHAPE = (20, 24, 18)
ROOT = Path(__file__).parents[2]


def _save(path: Path, data: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path.name


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Six blob pairs with labels (paths relative to the manifest) and a tiny 3-D checkpoint."""
    d = tmp_path_factory.mktemp("batch")
    i, j, k = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    rows = []
    for n in range(6):
        def blob(ci):
            return (np.sqrt((i - ci) ** 2 + (j - 12) ** 2 + (k - 9) ** 2) < 6).astype(np.float32)
        fixed, moving = blob(10), blob(10 + n % 3)
        sub = d / f"p{n}"
        sub.mkdir()
        rows.append({"name": f"p{n}",
                     "fixed": f"p{n}/" + _save(sub / "fixed.nii.gz", fixed + 0.1),
                     "moving": f"p{n}/" + _save(sub / "moving.nii.gz", moving * 2 + 0.3),
                     "fixed_labels": f"p{n}/" + _save(sub / "fixed_labels.nii.gz",
                                                      fixed.astype(np.uint8)),
                     "moving_labels": f"p{n}/" + _save(sub / "moving_labels.nii.gz",
                                                       moving.astype(np.uint8))})
    _write_csv(d / "pairs.csv", rows)
    _write_csv(d / "first3.csv", rows[:3])
    bad = [dict(r) for r in rows[:3]]
    bad[1]["moving"] = "p1/no_such.nii.gz"
    _write_csv(d / "bad.csv", bad)
    cfg = PLCRegConfig(ndim=3, size=(16, 16, 16), channels=(4, 8, 8), heads=2, window=(2, 2, 2))
    save_checkpoint(d / "tiny3d.pt", "plcreg", PLCReg(cfg), cfg)
    return d


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _args(data: Path, manifest: str, out: Path, *extra: str) -> list[str]:
    return [str(data / manifest), "--out", str(out), "--weights", str(data / "tiny3d.pt"),
            "--affine", "optimise", "--affine-iterations", "2", "--refine", "0", "--device", "cpu",
            "--threads", "1", "--no-progress", *extra]


def test_register_and_segment_defaults_are_regseg_register_and_pseudolabel_ones():
    """batch register registers as regseg register does (learned+optimise, --refine 25,
    --refine-fine 0, sampled steps); batch segment as regseg pseudolabel (optimise: Affine3D knows
    brains only)."""
    import argparse

    from regseg.batch.cli import add_batch_arguments
    from regseg.engines.affine_modes import REFINE_MODE_DEFAULT
    from regseg.register_options import REFINE_DEFAULT

    p = argparse.ArgumentParser()
    add_batch_arguments(p)
    reg = p.parse_args(["register", "m.csv", "--out", "o"])
    seg = p.parse_args(["segment", "m.csv", "--out", "o"])
    assert (reg.affine, reg.affine_iterations, reg.refine, reg.refine_fine, reg.refine_mode) == (
        "learned+optimise", None, REFINE_DEFAULT, 0, REFINE_MODE_DEFAULT)
    assert (REFINE_DEFAULT, REFINE_MODE_DEFAULT) == (12, "sampled")
    assert (seg.affine, seg.refine, seg.refine_fine) == ("optimise", REFINE_DEFAULT, 0)


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_bad_case_is_recorded_and_skipped_then_retried(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", "register", *_args(data, "bad.csv", out)]) == 1
    text = capsys.readouterr().out
    assert "2/3 cases ok" in text and "1 case(s) failed: p1" in text
    rows = _results(out)
    assert [r["name"] for r in rows] == ["p0", "p1", "p2"]
    assert rows[1]["status"] == "error" and "no_such.nii.gz" in rows[1]["error"]
    for r in (rows[0], rows[2]):
        assert r["status"] == "ok" and r["metrics"]["dice_mean"] > 0.3
        assert {"io_s", "wait_s", "compute_s"} <= set(r)
        assert sorted(r["outputs"]) == ["ddf_mm.nii.gz", "moved.nii.gz", "moved_labels.nii.gz"]
    assert not (out / "p1").exists() and not (out / ".partial").exists()
    # a rerun redoes only the failed case
    before = (out / "p0" / "result.json").stat().st_mtime_ns
    assert main(["batch", "register", *_args(data, "bad.csv", out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_finished"] == 2 and summary["ran"] == 1
    assert (out / "p0" / "result.json").stat().st_mtime_ns == before


def test_changed_options_or_half_written_cases_are_redone(data, tmp_path):
    out = tmp_path / "out"
    assert main(["batch", "register", *_args(data, "first3.csv", out, "--workers", "0")]) == 0
    # a kill mid-write leaves a partial folder and, at worst, a case folder without result.json
    (out / ".partial" / "p9.rank0").mkdir(parents=True)
    (out / "p2" / "result.json").unlink()
    assert main(["batch", "register", *_args(data, "first3.csv", out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped_finished"], summary["ran"]) == (2, 1)
    assert not (out / ".partial").exists()
    assert main(["batch", "register", *_args(data, "first3.csv", out, "--no-affine")]) == 0
    assert json.loads((out / "summary.json").read_text())["ran"] == 3  # other options


@pytest.mark.slow
def test_two_ranks_share_the_cases_and_skip_those_finished_before(data, tmp_path):
    out = tmp_path / "out"
    assert main(["batch", "register", *_args(data, "first3.csv", out)]) == 0  # "killed" run
    done = {n: (out / n / "result.json").stat().st_mtime_ns for n in ("p0", "p1", "p2")}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "regseg.batch", "register", *_args(data, "pairs.csv", out)],
        env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6/6 cases ok, 3 already done, 3 run on 2 rank(s)" in run.stdout
    assert {n: (out / n / "result.json").stat().st_mtime_ns for n in done} == done
    ranks = {}
    for r in (0, 1):
        for line in (out / "logs" / f"rank{r}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            ranks.setdefault(rec["name"], set()).add(rec["rank"])
    # round-robin over the manifest: rank 0 p0 p2 p4, rank 1 p1 p3 p5 (p0-p2 earlier, 1 rank)
    assert ranks["p3"] == {1} and ranks["p4"] == {0} and ranks["p5"] == {1}
    assert [r["status"] for r in _results(out)] == ["ok"] * 6


def test_segment_carries_the_atlas_labels(data, tmp_path):
    rows = [{"name": "t0", "image": "p0/fixed.nii.gz", "labels": "p0/fixed_labels.nii.gz"}]
    manifest = data / "targets.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "seg"
    rc = main(["batch", "segment", *_args(data, "targets.jsonl", out),
               "--atlas", str(data / "p1" / "moving.nii.gz"),
               "--atlas-labels", str(data / "p1" / "moving_labels.nii.gz")])
    assert rc == 0
    (row,) = _results(out)
    assert row["outputs"] == ["labels.nii.gz"] and row["metrics"]["dice_mean"] > 0.3
    assert nib.load(str(out / "t0" / "labels.nii.gz")).shape == SHAPE


@pytest.mark.parametrize("text, suffix, message", [
    ("fixed,moving\na.nii.gz,\n", ".csv", r"line 2: no value for \['moving'\]"),
    ("name,fixed,moving\nx,a,b\nx,c,d\n", ".csv", "line 3: name 'x' is used on line 2"),
    ("name,fixed,moving\n../up,a,b\n", ".csv", "name '../up' cannot name an output folder"),
    ("name,fixed,moving\nlogs,a,b\n", ".csv", "name 'logs' is taken by the job's own"),
    ('{"fixed": "a", "moving": "b"}\n[1]\n', ".jsonl", "line 2: a JSON list"),
    ('{"fixed": "a", "moving": \n', ".jsonl", "line 1: not JSON"),
    ("fixed,moving\n", ".csv", "no cases"),
    ("fixed,moving\na,b\n", ".txt", r"suffix '\.txt'"),
    ("[" * 100_000 + "\n", ".jsonl", "line 1: JSON nested too deeply"),  # was a RecursionError
])
def test_bad_manifests_are_refused_before_any_work(tmp_path, capsys, text, suffix, message):
    manifest = tmp_path / f"m{suffix}"
    manifest.write_text(text)
    with pytest.raises(InputError, match=message):
        read_manifest(manifest, ("fixed", "moving"), ("fixed", "moving"))
    assert main(["batch", "register", str(manifest), "--out", str(tmp_path / "o")]) == 2
    assert "regseg batch: error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_binary_manifest_is_refused_not_a_traceback(tmp_path, capsys, suffix):
    manifest = tmp_path / f"m{suffix}"
    manifest.write_bytes(b"\xff\xfe\x00fixed")  # was a UnicodeDecodeError traceback
    assert main(["batch", "register", str(manifest), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"m{suffix}: cannot read the manifest" in err and "UTF-8" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_manifest_paths_names_and_digests(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"fixed": "a.nii.gz", "moving": "/abs/b.nii.gz"}\n')
    (case,) = read_manifest(tmp_path / "m.jsonl", ("fixed", "moving"), ("fixed", "moving"))
    assert case == {"name": "case00000", "fixed": str(tmp_path / "a.nii.gz"),
                    "moving": "/abs/b.nii.gz"}
    assert case_digest("register", case, {"w": 1}) != case_digest("register", case, {"w": 2})
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == items
