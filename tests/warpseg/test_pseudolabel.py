"""``regseg pseudolabel``: pseudo-labels, quality files, resuming, and clear errors (exit 2)."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from regseg.cli import main as regseg_main
from regseg.imageio import Volume, save_volume
from regseg.pseudolabel import crop_to_box, label_box, ncc, quality_weight
from regseg.registration_metrics import dice_per_label
from regseg.sim.phantom import make_phantom

SPACING_MM = 1.6  # small phantoms: 56 x 56 x 50 voxels, a registration takes a few seconds
FAST = ["--refine", "0", "--affine-iterations", "30", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("pl")
    atlas = make_phantom(100, spacing_mm=SPACING_MM)
    save_volume(atlas.mri, root / "atlas.nii.gz")
    save_volume(atlas.labels, root / "atlas_labels.nii.gz")
    images = root / "images"
    images.mkdir()
    truth = {}
    for seed in (201, 202):
        case = make_phantom(seed, spacing_mm=SPACING_MM)
        save_volume(case.mri, images / f"c{seed}.nii.gz")
        truth[f"c{seed}"] = case.labels.data
    return root, truth


def _args(root, out):
    return ["pseudolabel", "--atlas", str(root / "atlas.nii.gz"), "--atlas-labels",
            str(root / "atlas_labels.nii.gz"), "--images", str(root / "images"), "--out",
            str(out), *FAST]


def test_pseudolabels_quality_and_resume(cases, tmp_path, capsys):
    root, truth = cases
    out = tmp_path / "out"
    assert regseg_main(_args(root, out)) == 0
    rows = {r["image"]: r for r in csv.DictReader((out / "quality.csv").open())}
    assert set(rows) == set(truth)
    for stem, labels in truth.items():
        pred = np.asarray(nib.load(out / f"{stem}_labels.nii.gz").dataobj)
        assert pred.shape == labels.shape
        dice = dice_per_label((pred > 0).astype(np.uint8), (labels > 0).astype(np.uint8), [1])[1]
        assert dice > 0.5, (stem, dice)  # another phantom's gland, moved onto this one
        assert -1 <= float(rows[stem]["ncc"]) <= 1 and float(rows[stem]["folding_pct"]) >= 0
    first = json.loads((out / "quality.json").read_text())
    assert first["meta"]["affine"] == "optimise"  # not the brain-trained learned affine stage
    mtime = (out / "c201_labels.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    assert regseg_main(_args(root, out)) == 0  # resumed: nothing redone
    assert "2 already there" in capsys.readouterr().out
    assert (out / "c201_labels.nii.gz").stat().st_mtime_ns == mtime
    assert json.loads((out / "quality.json").read_text())["images"] == first["images"]


def test_linear_interpolation_gives_the_same_label_set(cases, tmp_path):
    root, _ = cases
    out = tmp_path / "lin"
    assert regseg_main(_args(root, out) + ["--interpolation", "linear"]) == 0
    pred = np.asarray(nib.load(out / "c201_labels.nii.gz").dataobj)
    assert set(np.unique(pred).tolist()) <= {0, 1, 2} and (pred == 1).any()


@pytest.mark.parametrize("change, expect", [
    ({"--atlas": "missing.nii.gz"}, "--atlas"),
    ({"--images": "nothing_here"}, "--images"),
    ({"--images": "empty"}, "no .nii"),
    ({"--atlas-labels": "other_grid.nii.gz"}, "grid"),
])
def test_bad_input_exits_2_with_a_message(cases, tmp_path, capsys, change, expect):
    root, _ = cases
    (root / "empty").mkdir(exist_ok=True)
    other = make_phantom(100, spacing_mm=2.0).labels
    save_volume(other, root / "other_grid.nii.gz")
    args = _args(root, tmp_path / "out")
    for flag, value in change.items():
        args[args.index(flag) + 1] = str(root / value)
    assert regseg_main(args) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "out" / "quality.json").exists()


def test_helpers():
    a = np.random.default_rng(0).normal(size=(5, 6, 7))
    assert ncc(a, 2 * a + 1) == pytest.approx(1.0)
    assert quality_weight(0.2, 0.0) == 0.0 and quality_weight(0.9, 5.0) == 0.0
    assert 0 < quality_weight(0.6, 0.0) < quality_weight(0.9, 0.0) <= 1
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[4:6, 4:6, 4:6] = 1
    vol = Volume(labels, np.diag([2.0, 2.0, 2.0, 1.0]))
    lo, hi = label_box(vol, 2.0)
    assert np.allclose(lo, [6, 6, 6]) and np.allclose(hi, [12, 12, 12])
    crop, slices = crop_to_box(vol, (lo, hi))
    assert crop.data.sum() == labels.sum() and crop.voxel_to_world[0, 3] == 2 * slices[0].start
