"""bench/gpu_check.sh --dry-run (what CI can check of the GPU acceptance command), its report's
verdicts, and bench/batch.py's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_report  # noqa: E402


def test_dry_run_prints_the_plan_and_checks_the_imports(tmp_path):
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr
    for step in ("env", "gpu_tests", "engines", "latency", "register_3d", "report"):
        assert f"  {step} " in run.stdout, step
    assert "bench/latency.py --quick --device cuda" in run.stdout
    assert "dry run: all import paths OK" in run.stdout
    assert (tmp_path / "gpu_check.md").read_text().count("unmeasured") == 5


def test_bad_options_are_refused(tmp_path):
    for args, message in ((["--bogus"], "unknown option --bogus"),
                          (["--data", str(tmp_path)], "no pairs.csv")):
        run = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr


def test_plcreg3d_training_script_dry_run_checks_the_model_and_command(tmp_path):
    out = tmp_path / "never"
    run = subprocess.run(["bash", "bench/gpu_train_plcreg3d.sh", "--dry-run", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "-m regseg.train.plcreg 3d" in run.stdout and "--spacing 1.5" in run.stdout
    assert "working grid 104 x 144 x 104 (K, J, I) at 1.5 mm" in run.stdout
    assert "MNI152 template:" in run.stdout and "dry run: OK" in run.stdout
    assert not out.exists()
    bad = subprocess.run(["bash", "bench/gpu_train_plcreg3d.sh", "--bogus"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    small = subprocess.run(["bash", "bench/gpu_train_plcreg3d.sh", "--dry-run", "--spacing", "0.2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert small.returncode == 2 and "--spacing: 0.2" in small.stderr


def test_report_judges_the_figures_against_the_targets(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "latency.json").write_text(json.dumps({"results": [
        {"name": "regseg @500fps", "p99_ms": 4.0, "processing_p99_ms": 2.5},
        {"name": "naive @500fps", "p99_ms": 90.0},
        {"name": "regseg flat-out", "fps": 800.0, "ratio_p50_vs_naive": 12.0}]}))
    (raw / "batch.json").write_text(json.dumps({"results": [{"register_s": 0.5}],
                                                "cases_per_s": {"1": 2.0}}))
    (raw / "engines.json").write_text(json.dumps({"results": [
        {"name": "alignsegnet/eager/bf16", "status": "ok", "p50_ms": 0.8, "p99_ms": 1.1,
         "max_rel_error_vs_eager": 0.004, "accuracy_holds": True}]}))
    (tmp_path / "steps.tsv").write_text("latency\t0\t80\nregister_3d\t0\t30\n")
    assert gpu_report.main([str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    verdicts = {k: v["verdict"] for k, v in report["targets"].items()}
    assert verdicts == {"processing_p99_ms": "MISSED", "loopback_p99_ms": "met",
                        "flat_out_fps": "met", "vs_naive": "met", "register_3d_s": "MISSED"}
    assert report["steps"][0] == {"step": "latency", "exit": 0, "seconds": 80.0}
    assert "| alignsegnet/eager/bf16 | ok | 0.8 | 1.1 | 0.004 | True |" in (
        tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow
def test_batch_bench_writes_rates_and_efficiency(tmp_path):
    """bench/batch.py on two tiny pairs (a tiny untrained model): 1 and 2 ranks."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests" / "batch"))
    from test_batch import _save, _write_csv  # noqa: PLC0415

    from regseg.models.checkpoint import save_checkpoint
    from regseg.models.plcreg import PLCReg, PLCRegConfig

    rows = []
    for n in range(2):
        blob = np.zeros((16, 16, 16), np.float32)
        blob[4 + n : 10 + n, 4:10, 5:11] = 1
        rows.append({"name": f"p{n}", "fixed": _save(tmp_path / f"f{n}.nii.gz", blob + 0.1),
                     "moving": _save(tmp_path / f"m{n}.nii.gz", np.roll(blob, 1, 0) + 0.1)})
    _write_csv(tmp_path / "pairs.csv", rows)
    cfg = PLCRegConfig(ndim=3, size=(16, 16, 16), channels=(4, 8, 8), heads=2, window=(2, 2, 2))
    save_checkpoint(tmp_path / "tiny.pt", "plcreg", PLCReg(cfg), cfg)
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "bench/batch.py", "--data", str(tmp_path), "--weights",
                          str(tmp_path / "tiny.pt"), "--affine-iterations", "2", "--json",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert set(result["cases_per_s"]) == {"1", "2"} and all(
        v > 0 for v in result["cases_per_s"].values())
    assert result["scaling_efficiency"] == pytest.approx(
        result["cases_per_s"]["2"] / (2 * result["cases_per_s"]["1"]), abs=1e-3)
    assert [r["cases"] for r in result["results"]] == [2, 2]
