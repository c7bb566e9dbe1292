"""``regseg register-mri``: a simulated case's MRI registered to its sweep gives a ReferenceToMRI
the live path reads, near the truth; bad input is refused with exit 2 and nothing written."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from regseg.calibration.live import read_reference_to_mri
from regseg.cli import main
from regseg.sim.sweep import EVAL_SEEDS, make_sweep_case, write_sweep_case


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("case")
    case = make_sweep_case(EVAL_SEEDS[4])
    return case, write_sweep_case(case, folder), folder


def test_register_mri_writes_the_live_transform_near_the_truth(case_files, tmp_path):
    case, files, _ = case_files
    out = tmp_path / "reference_to_mri.tfm"
    ddf = tmp_path / "ddf.nii.gz"
    code = main(["register-mri", "--mri", files["mri"], "--mri-labels", files["mri_labels"],
                 "--sweep", files["trus"], "--initial", files["reference_to_mri_initial_tfm"],
                 "--truth", files["reference_to_mri_true_txt"], "--out", str(out),
                 "--ddf-out", str(ddf), "--method", "biregnet", "--no-progress",
                 "--threads", "1"])
    assert code == 0
    matrix = read_reference_to_mri(str(out))  # exactly what regseg-stream --reference-to-mri does
    report = json.loads(out.with_suffix(".json").read_text())
    np.testing.assert_allclose(matrix, report["reference_to_mri"], atol=1e-5)
    print(f"register-mri: TRE {report['tre_mm_initial']} -> {report['tre_mm']} mm, "
          f"{report['seconds']} s")
    assert report["tre_mm_initial"] > 8.0
    assert report["tre_mm"] < 2.0
    assert report["mind_distance_final"] < report["mind_distance_initial"]
    field = nib.load(str(ddf))
    assert field.shape == (*case.trus.data.shape, 1, 3)
    np.testing.assert_allclose(field.affine, case.trus.voxel_to_world, atol=1e-5)
    assert np.isfinite(field.get_fdata()).all()


def _bad_inputs(folder, files):
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), str(folder / "flat.nii.gz"))
    labels = nib.load(files["mri_labels"])
    nib.save(nib.Nifti1Image(np.zeros(labels.shape, np.uint8), labels.affine),
             str(folder / "empty_labels.nii.gz"))
    trus = nib.load(files["trus"])
    nib.save(nib.Nifti1Image(np.zeros(trus.shape, np.float32), trus.affine),
             str(folder / "empty_sweep.nii.gz"))
    (folder / "garbage.tfm").write_text("not a transform\n")


@pytest.mark.parametrize("change, message", [
    ({"--mri": "gone.nii.gz"}, "gone.nii.gz"),
    ({"--sweep": "flat.nii.gz"}, "3-D"),
    ({"--mri-labels": "empty_labels.nii.gz"}, "no prostate"),
    ({"--sweep": "empty_sweep.nii.gz"}, "all voxels are zero"),
    ({"--initial": "garbage.tfm"}, "garbage.tfm"),
    ({"--out": "OUT/r2m.nii.gz"}, "transform file name"),
])
def test_bad_input_exits_2_and_writes_nothing(case_files, tmp_path, capsys, change, message):
    _, files, folder = case_files
    _bad_inputs(folder, files)
    args = {"--mri": files["mri"], "--mri-labels": files["mri_labels"], "--sweep": files["trus"],
            "--out": str(tmp_path / "r2m.tfm")}
    for flag, value in change.items():
        args[flag] = value.replace("OUT", str(tmp_path)) if value.startswith("OUT") \
            else str(folder / value)
    argv = ["register-mri", "--no-progress", *[x for kv in args.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
