"""`regseg register` / `regseg eval`: an end-to-end run, and every bad input refused clearly."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from regseg.cli import main
from regseg.models.checkpoint import save_checkpoint
from regseg.models.plcreg import PLCReg, PLCRegConfig

SHAPE = (20, 24, 18)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 2.0, 1.0])
                             if affine is None else affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A blob pair with labels and a tiny untrained 3-D checkpoint."""
    d = tmp_path_factory.mktemp("case")
    i, j, k = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    def blob(ci):
        r = np.sqrt((i - ci) ** 2 + (j - 12) ** 2 + (k - 9) ** 2)
        return (r < 6).astype(np.float32)
    fixed, moving = blob(10), blob(11)
    cfg = PLCRegConfig(ndim=3, size=(16, 16, 16), channels=(4, 8, 8), heads=2, window=(2, 2, 2))
    ckpt = save_checkpoint(d / "tiny3d.pt", "plcreg", PLCReg(cfg), cfg)
    cfg2 = PLCRegConfig(ndim=2, size=(16, 16), channels=(4, 8), heads=2, window=(4, 4))
    ckpt2 = save_checkpoint(d / "tiny2d.pt", "plcreg", PLCReg(cfg2), cfg2)
    return {
        "fixed": _save(d / "fixed.nii.gz", fixed + 0.1),
        "moving": _save(d / "moving.nii.gz", moving * 2.0 + 0.3),
        "fixed_labels": _save(d / "fixed_labels.nii.gz", fixed.astype(np.uint8)),
        "moving_labels": _save(d / "moving_labels.nii.gz", moving.astype(np.uint8)),
        "weights": str(ckpt), "weights2d": str(ckpt2), "dir": d,
    }


def ddf_affine(out):
    return nib.load(str(out / "ddf_mm.nii.gz")).affine


def _register(case, out, *extra):
    return main(["register", "--fixed", case["fixed"], "--moving", case["moving"],
                 "--out", str(out), "--weights", case["weights"], "--affine-iterations", "5",
                 "--device", "cpu", *extra])


def test_register_writes_outputs_and_report(case, tmp_path, capsys):
    rc = _register(case, tmp_path / "out", "--moving-labels", case["moving_labels"],
                   "--fixed-labels", case["fixed_labels"], "--inverse")
    assert rc == 0
    table = capsys.readouterr().out.splitlines()
    row = next(line for line in table if line.startswith("out "))  # named by its output folder
    assert "fixed.nii.gz" not in row
    out = tmp_path / "out"
    for name in ("moved.nii.gz", "moved_labels.nii.gz", "ddf_mm.nii.gz", "report.json",
                 "inverse_ddf_mm.nii.gz"):
        assert (out / name).is_file(), name
    # The inverse in the forward field's convention (issue 17: it was voxels in a .npy): mm,
    # NIfTI, same grid, and forward(x) + inverse(x + forward(x)) ~ 0 (to first order, -forward).
    fwd = np.asarray(nib.load(str(out / "ddf_mm.nii.gz")).dataobj)[:, :, :, 0]
    inv_img = nib.load(str(out / "inverse_ddf_mm.nii.gz"))
    assert inv_img.shape == (*SHAPE, 1, 3) and np.allclose(inv_img.affine, ddf_affine(out))
    inv = np.asarray(inv_img.dataobj)[:, :, :, 0]
    inner = (slice(2, -2),) * 3
    assert np.abs(fwd[inner]).max() > 0.05  # a field worth inverting
    assert np.abs(fwd[inner] + inv[inner]).mean() < 0.5 * np.abs(fwd[inner]).mean()
    report = json.loads((out / "report.json").read_text())
    for key in ("dice", "dice_mean", "hd95_mm", "hd95_mean_mm", "folding_pct", "sdlogj",
                "seconds", "timings_s"):
        assert key in report, key
    # the settings that made it: the defaults here, but the 5 affine steps asked for
    assert report["settings"] == {"affine": "learned+optimise", "affine_iterations": 5,
                                  "refine": 12, "refine_lr": 0.15, "refine_int_steps": 5,
                                  "refine_regulariser": "coarse", "refine_fine": 0,
                                  "refine_mode": "sampled"}
    ddf = nib.load(str(out / "ddf_mm.nii.gz"))
    assert ddf.shape == (*SHAPE, 1, 3)
    assert np.allclose(ddf.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert main(["eval", "--fixed-labels", case["fixed_labels"], "--moved-labels",
                 str(out / "moved_labels.nii.gz"), "--ddf", str(out / "ddf_mm.nii.gz")]) == 0


def test_fine_labels_are_warped_and_scored(case, tmp_path):
    """A second label map (a fine parcellation) through the same registration: Dice mean and the
    lowest 10 %, before and after, and the moved map written."""
    rc = _register(case, tmp_path / "out", "--moving-fine-labels", case["moving_labels"],
                   "--fixed-fine-labels", case["fixed_labels"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fine_structures"] == 1 and 0 <= report["dice_fine_low10"] <= 1
    assert report["dice_fine_mean"] == report["dice_fine_low10"]  # one structure: the same
    assert 0 < report["dice_fine_before_mean"] < 1
    moved = nib.load(str(tmp_path / "out" / "moved_fine_labels.nii.gz"))
    assert set(np.unique(np.asarray(moved.dataobj))) <= {0, 1}


def test_batch_over_a_pairs_csv(case, tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("name,fixed,moving,moving_labels,fixed_labels\n"
                        f"a,{case['fixed']},{case['moving']},{case['moving_labels']},"
                        f"{case['fixed_labels']}\n"
                        f"b,{case['moving']},{case['fixed']},,\n")
    assert main(["register", "--pairs", str(csv_path), "--out", str(tmp_path / "o"),
                 "--weights", case["weights"], "--affine-iterations", "2"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["summary"]["pairs"] == 2
    # Start-up is reported apart from the per-pair seconds (it was missing: ~20 s unaccounted).
    assert summary["summary"]["startup_s"] > 0 and summary["summary"]["threads"] >= 1
    assert summary["summary"]["wall_s"] > summary["summary"]["startup_s"]
    assert (tmp_path / "o" / "b" / "moved.nii.gz").is_file()


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_missing_file(case, tmp_path, capsys):
    err = _error(capsys, ["register", "--fixed", str(tmp_path / "nope.nii.gz"), "--moving",
                          case["moving"], "--out", str(tmp_path / "o"), "--weights",
                          case["weights"]])
    assert "nope.nii.gz" in err and "not found" in err


def test_2d_image_refused(case, tmp_path, capsys):
    flat = _save(tmp_path / "flat.nii.gz", np.zeros((20, 24), np.float32))
    err = _error(capsys, ["register", "--fixed", flat, "--moving", case["moving"],
                          "--out", str(tmp_path / "o"), "--weights", case["weights"]])
    assert "3-D volume" in err


def test_nan_refused(case, tmp_path, capsys):
    data = np.ones(SHAPE, np.float32)
    data[1, 2, 3] = np.nan
    bad = _save(tmp_path / "nan.nii.gz", data)
    err = _error(capsys, ["register", "--fixed", case["fixed"], "--moving", bad,
                          "--out", str(tmp_path / "o"), "--weights", case["weights"]])
    assert "non-finite" in err


def test_bad_labels_refused(case, tmp_path, capsys):
    frac = _save(tmp_path / "frac.nii.gz", np.full(SHAPE, 0.5, np.float32))
    err = _error(capsys, ["register", "--fixed", case["fixed"], "--moving", case["moving"],
                          "--moving-labels", frac, "--out", str(tmp_path / "o"),
                          "--weights", case["weights"]])
    assert "integer labels" in err
    other_grid = _save(tmp_path / "grid.nii.gz", np.zeros((10, 10, 10), np.uint8))
    err = _error(capsys, ["register", "--fixed", case["fixed"], "--moving", case["moving"],
                          "--moving-labels", other_grid, "--out", str(tmp_path / "o"),
                          "--weights", case["weights"]])
    assert "does not match" in err


def test_no_overlap_refused(case, tmp_path, capsys):
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[:3, 3] = 500.0
    moved_away = _save(tmp_path / "far.nii.gz", np.ones(SHAPE, np.float32), far)
    err = _error(capsys, ["register", "--fixed", case["fixed"], "--moving", moved_away,
                          "--out", str(tmp_path / "o"), "--weights", case["weights"]])
    assert "field of view" in err and "same world space" in err


def test_different_grid_and_orientation_is_resampled(case, tmp_path):
    # the moving image stored LPS-flipped at another spacing: handled, not refused
    img = nib.load(case["moving"])
    flipped = np.diag([-1.5, -1.5, 2.0, 1.0])
    flipped[:3, 3] = [40.0, 50.0, 0.0]
    data = np.asarray(img.dataobj)[::2, ::2, :]
    moving = _save(tmp_path / "lps.nii.gz", data.astype(np.float32), flipped)
    assert main(["register", "--fixed", case["fixed"], "--moving", moving, "--out",
                 str(tmp_path / "o"), "--weights", case["weights"],
                 "--affine-iterations", "2"]) == 0


def test_2d_weights_refused_for_volumes(case, tmp_path, capsys):
    err = _error(capsys, ["register", "--fixed", case["fixed"], "--moving", case["moving"],
                          "--out", str(tmp_path / "o"), "--weights", case["weights2d"]])
    assert "checkpoint of model plcreg 2-D" in err
    assert "takes a checkpoint of model plcreg 3-D" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--pairs", "x.csv", "--fixed", "f.nii.gz"], "either"),
    ([], "either"),
])
def test_argument_errors(argv, message, tmp_path, capsys):
    err = _error(capsys, ["register", "--out", str(tmp_path / "o"), *argv])
    assert message in err


def test_bad_pairs_sources(tmp_path, capsys):
    bad_csv = tmp_path / "p.csv"
    bad_csv.write_text("a,b\n1,2\n")
    assert "header" in _error(capsys, ["register", "--pairs", str(bad_csv), "--out",
                                       str(tmp_path / "o")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "nothing to register" in _error(capsys, ["register", "--pairs", str(empty),
                                                    "--out", str(tmp_path / "o")])


def test_eval_errors(case, tmp_path, capsys):
    other_grid = _save(tmp_path / "grid.nii.gz", np.zeros((10, 10, 10), np.uint8))
    assert "does not match" in _error(capsys, ["eval", "--fixed-labels", case["fixed_labels"],
                                               "--moved-labels", other_grid])
    lm = tmp_path / "lm.csv"
    lm.write_text("fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z\n0,0,0,1,1,1\n")
    assert "needs --ddf" in _error(capsys, ["eval", "--fixed-labels", case["fixed_labels"],
                                            "--moved-labels", case["fixed_labels"],
                                            "--landmarks", str(lm)])
